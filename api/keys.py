"""Typed application state: one ``web.AppKey`` per shared resource."""

from __future__ import annotations

import asyncio

from aiohttp import web

from api.metrics import Metrics
from api.ports import ApiSettings, AutoscalerPort, SchedulerPort
from api.ratelimit import LoginThrottle
from controller.auth import Auth, Claims
from controller.capability import JobClaims
from controller.jobs import JobLifecycle
from controller.membership import Membership
from controller.workloads import Workloads
from filtering.pipeline import Plans
from storage.datastore import Datastore
from storage.images import ImageStore

SETTINGS = web.AppKey("settings", ApiSettings)
STORE = web.AppKey("store", Datastore)
AUTH = web.AppKey("auth", Auth)
IMAGES = web.AppKey("images", ImageStore)
JOBS = web.AppKey("jobs", JobLifecycle)
WORKLOADS = web.AppKey("workloads", Workloads)
MEMBERSHIP = web.AppKey("membership", Membership)
SCHEDULER = web.AppKey("scheduler", SchedulerPort)
LOGIN_LIMITS = web.AppKey("login_limits", LoginThrottle)  # per (user, address) and per address
METRICS = web.AppKey("metrics", Metrics)
AUTOSCALER = web.AppKey("autoscaler", AutoscalerPort)  # set only with --autoscale
PLANS = web.AppKey("plans", Plans)  # uploads checked against their workload's pipeline (pixels, budget)
STOPPING = web.AppKey("stopping", asyncio.Event)  # set on shutdown: long-lived streams end
CLAIMS = web.RequestKey("claims", Claims)  # request-scoped: who is calling
JOB_CLAIMS = web.RequestKey("job_claims", JobClaims)  # set when the caller holds a job capability
__all__ = ["AUTH", "AUTOSCALER", "CLAIMS", "IMAGES", "JOB_CLAIMS", "JOBS", "LOGIN_LIMITS", "MEMBERSHIP", "METRICS", "PLANS", "SCHEDULER",
           "SETTINGS", "STOPPING", "STORE", "WORKLOADS", "Claims"]

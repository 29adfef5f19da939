"""The OpenAPI 3 description of the HTTP API, served at ``/openapi.json``.

Written by hand next to the routes it describes; ``tests/test_openapi.py`` keeps it true by
running schemathesis against a live server (no 5xx, every response matches its schema) and by
checking that every route of the app is described.
"""

from __future__ import annotations

from typing import Any

from common.models import ImageType, JobState, WorkloadStatus
from filtering import model, registry
from storage.thumbnails import THUMB_SIZES

BEARER = [{"bearer": []}]


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict:
    text = {400: "bad input", 401: "no valid token", 403: "not allowed with this token", 404: "not found",
            409: "conflict", 413: "too large", 415: "wrong media type", 429: "too many failed logins"}
    return {str(s): _json(_ref("Error"), text[s]) for s in statuses}


def _param(name: str, where: str, schema: dict, required: bool = False, description: str = "") -> dict:
    return {"name": name, "in": where, "required": required, "schema": schema, "description": description}


WORKLOAD_ID = _param("workload_id", "path", {"type": "string"}, True)
NULLABLE_STR = {"type": "string", "nullable": True}

STEP = {"type": "object", "required": ["name"],
        "properties": {"name": {"type": "string", "pattern": "^[a-z][a-z0-9_]{0,31}$"},
                       "params": {"type": "object", "maxProperties": 16,
                                  "additionalProperties": {"type": ["number", "string"]}}}}
FILTER_TEXT = (
    "A filter of GET /filters (grayscale by default), or a pipeline of up to 10 steps: `step|step|...`,"
    " each `name` or `name(key=value,...)`, e.g. `resize(width=800)|sharpen|grayscale`. Validated whole:"
    " a 400 names the step that is wrong, and nothing is created. A filter that this server lacks is taken"
    " when a live worker offers it (checked against that worker's declaration). Built in: "
    + ", ".join(f"`{n}`" for n in registry.REGISTRY) + ".")

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
    "Login": {"type": "object", "required": ["user", "token"],
              "properties": {"user": {"type": "string"}, "token": {"type": "string"}}},
    "Workload": {
        "type": "object",
        "required": ["workload_id", "filter", "workload_name", "status", "running_jobs", "filtered_images"],
        "properties": {
            "workload_id": {"type": "string"},
            "filter": {"type": "string", "description": "the filter's name, or a pipeline's canonical text"
                       " (every parameter written out)"},
            "steps": {"type": "array", "description": "the pipeline, one step for a single filter",
                      "items": STEP},
            "workload_name": {"type": "string"},
            "status": {"type": "string", "enum": [s.value for s in WorkloadStatus]},
            "running_jobs": {"type": "integer", "minimum": 0},
            "filtered_images": {"type": "array", "items": {"type": "integer", "minimum": 0}},
            "images": {"type": "integer", "minimum": 0},
            "failed_images": {"type": "array", "items": {
                "type": "object", "required": ["image_id", "reason"],
                "properties": {"image_id": {"type": "integer"}, "reason": NULLABLE_STR}}},
            "tags": {"type": "array", "items": {"type": "string"}},
            "meta": {"type": "object"},
            "params": {"type": "object", "description": "the filter's parameters, defaults filled in"},
            "waiting_reason": NULLABLE_STR,
        },
    },
    "Worker": {
        "type": "object",
        "required": ["name", "tags", "alive", "cpu_percent", "memory_percent", "gpu", "running_jobs", "capacity",
                     "jobs_done", "last_seen"],
        "properties": {
            "name": {"type": "string"}, "tags": {"type": "array", "items": {"type": "string"}},
            "alive": {"type": "boolean"}, "cpu_percent": {"type": "number"}, "memory_percent": {"type": "number"},
            "gpu": {"type": "object", "required": ["count"], "properties": {
                "count": {"type": "integer"}, "utilization_percent": {"type": "number"},
                "memory_percent": {"type": "number"}}},
            "running_jobs": {"type": "integer", "description": "its jobs running now (at most its capacity)"},
            "waiting_jobs": {"type": "integer", "description": "jobs sent ahead, waiting there for a slot"},
            "capacity": {"type": "integer"},
            "prefetch": {"type": "integer", "description": "jobs it takes beyond capacity, to start as others end"},
            "jobs_done": {"type": "integer"},
            "last_seen": {"type": "number"}, "rpc_address": {"type": "string", "description": "where the server sends jobs; admin only"},
            "autoscaled": {"type": "boolean", "description": "started (and to be retired) by the autoscaler"},
            "filters": {"type": "array", "description": "the filters it runs, as it declared them when it joined",
                        "items": {"type": "string"}},
            "filter_versions": {"type": "object", "additionalProperties": {"type": "string"},
                                "description": "the version of each that has one (a plugin's package)"},
            "gpu_filters": {"type": "array", "items": {"type": "string"}, "description": "those it runs on its GPU"},
        },
    },
    "Status": {
        "type": "object", "required": ["system_name", "server_time", "active_workloads", "workers"],
        "properties": {
            "system_name": {"type": "string"}, "server_time": {"type": "string"},
            "active_workloads": {"type": "array", "items": _ref("Workload")},
            "workers": {"type": "array", "items": _ref("Worker")},
            "queued_jobs": {"type": "integer"},
            "scheduler": {"type": "object", "description": "policy and counters; `leader`: whether this"
                                                           " server schedules (one of those sharing a database does)"},
            "worker_plane": {"type": "object", "description": "what this server's sessions with its workers carried:"
                                                              " messages, jobs and results, and how many per message"},
            "servers": {"type": "array", "description": "the servers of the system (several share a database)",
                        "items": {"type": "object", "properties": {
                            "name": {"type": "string"}, "api_url": {"type": "string"},
                            "alive": {"type": "boolean"}, "leader": {"type": "boolean"},
                            "this_server": {"type": "boolean"}, "last_seen": {"type": "number"},
                            "started_at": {"type": "number"}}}},
            "autoscale": {"type": "object", "nullable": True,
                          "description": "with --autoscale: bounds, its workers and their phase, the last decision"},
        },
    },
    "JobTiming": {
        "type": "object", "required": ["image_id", "state", "attempts"],
        "properties": {"image_id": {"type": "integer"}, "state": {"type": "string", "enum": [s.value for s in JobState]},
                       "attempts": {"type": "integer"}, "copies": {"type": "integer"}, "worker": NULLABLE_STR,
                       "error": NULLABLE_STR},
    },
    "Uploaded": {
        "type": "object", "required": ["workload_id", "image_id", "type"],
        "properties": {"workload_id": {"type": "string"}, "image_id": {"type": "integer"},
                       "type": {"type": "string", "enum": [t.value for t in ImageType]}},
    },
    "ImageEntry": {
        "type": "object", "required": ["image_id", "type", "workload_id"],
        "properties": {"image_id": {"type": "integer"}, "type": {"type": "string", "enum": [t.value for t in ImageType]},
                       "workload_id": {"type": "string"}, "size": {"type": "integer"}, "format": {"type": "string"}},
    },
}

def _workload_form(json_body: bool) -> dict:
    filter_ = {"type": "string", "maxLength": 1024, "description": FILTER_TEXT}
    if json_body:
        filter_ = {"description": FILTER_TEXT + " In JSON also an array of `{name, params}`.",
                   "oneOf": [{"type": "string", "maxLength": 1024},
                             {"type": "array", "minItems": 1, "maxItems": 10, "items": STEP}]}
    return {
        "type": "object",
        "properties": {
            "filter": filter_,
            "workload_name": {"type": "string", "pattern": "^[A-Za-z0-9._-]{1,64}$"},
            "tags": {"type": "string", "description": "comma-separated worker tags the jobs need"},
            "meta": {"type": "string", "description": "a JSON object of the client's, at most 4 KiB"},
            **{p.name: {"type": "integer" if p.type is int else "number", "minimum": p.minimum,
                        "maximum": p.maximum, "default": p.default,
                        "description": f"{p.help} (filter {s.name} only; the course's form: other filters take"
                                       " their parameters inside the filter, e.g. blur(radius=5))"}
               for s in (registry.REGISTRY[n] for n in registry.COURSE) for p in s.params},
        },
    }


WORKLOAD_FORM = _workload_form(False)


IMAGE_TYPE = {"type": "string", "enum": [t.value for t in ImageType]}


EVENTS_DESCRIPTION = """\
First one `event: snapshot` whose data is the whole state: `{"server_time": <unix seconds>,
"workers": [<worker>, ...] (by name), "workloads": [<workload with "filtered" and "failed"
counts>, ...] (the caller's active ones and 100 newest, oldest first), "queued_jobs": <n>,
"autoscale": <object> | null}`.

Then, every second, if anything but the time changed, one `event: changes` with only what
changed: `{"server_time": ..., "workers": {"set": [...], "removed": [names]}, "workloads":
{"set": [...], "removed": [ids]}, "queued_jobs": n, "autoscale": {...} | null}`. `server_time`
is always there; `workers` and `workloads` only if one of their entries changed, appeared or
went (`set` holds whole entries, new or changed, keyed by `name` or `workload_id`; an unchanged
entry is not resent; `removed` the keys gone, e.g. a workload out of the newest 100);
`queued_jobs` and `autoscale` only if they changed. To merge, replace a set entry in place or
append it if new, and drop the removed keys; when that would not give the server's order, the
list's object also carries `order`: every key, in order.

When nothing changed, nothing is sent but, after 15 s of silence, a comment line
`: keep-alive`. The stream ends when the token stops being valid (logout, expiry, user
removed) or the server stops; a client that reconnects gets a new snapshot."""


def spec(server_url: str | None = None) -> dict:
    paths: dict[str, Any] = {
        "/login": {
            method: {"summary": "Log in with HTTP Basic; returns a bearer token", "security": [{"basic": []}],
                     "responses": {"200": _json(_ref("Login"), "a token"), **_errors(401, 429)}}
            for method in ("get", "post")
        },
        "/logout": {"delete": {
            "summary": "Revoke the token", "security": BEARER,
            "responses": {"200": _json({"type": "object", "required": ["logout_message"],
                                        "properties": {"logout_message": {"type": "string"}}}, "revoked"),
                          **_errors(401, 403)}}},
        "/status": {"get": {
            "summary": "System name, workers and the caller's active workloads", "security": BEARER,
            "responses": {"200": _json(_ref("Status"), "status"), **_errors(401, 403)}}},
        "/filters": {"get": {
            "summary": "What the fleet offers: this server's filters and every one a live worker declared"
                       " (public; with a user token, which workers run each, and their versions)",
            "responses": {"200": _json({"type": "array", "items": {
                "type": "object", "required": ["name", "help", "params", "workers"],
                "properties": {"name": {"type": "string"}, "help": {"type": "string"},
                               "params": {"type": "array", "items": {"type": "object"}},
                               "colour": {"type": "string", "enum": list(model.COLOURS)},
                               "size": {"type": "string", "enum": list(model.SIZES)},
                               "output_format": {"type": "boolean"}, "gpu": {"type": "boolean"},
                               "version": {"type": "string"}, "builtin": {"type": "boolean"},
                               "on_server": {"type": "boolean"},
                               "workers": {"type": "integer", "description": "live workers that run it"},
                               "gpu_workers": {"type": "integer"},
                               "offered_by": {"type": "array", "items": {"type": "object"}}}}},
                "the filters"), **_errors(401)}}},
        "/workloads": {
            "post": {"summary": "Create a workload (every parameter optional)", "security": BEARER,
                     "requestBody": {"required": False, "content": {
                         "application/json": {"schema": _workload_form(True)},
                         "application/x-www-form-urlencoded": {"schema": WORKLOAD_FORM}}},
                     "responses": {"200": _json(_ref("Workload"), "the new workload"),
                                   **_errors(400, 401, 403, 409, 413)}},
            "get": {"summary": "The caller's workloads, oldest first", "security": BEARER,
                    "responses": {"200": _json({"type": "array", "items": _ref("Workload")}, "workloads"),
                                  **_errors(401, 403)}},
        },
        "/workloads/{workload_id}": {"get": {
            "summary": "One workload", "security": BEARER, "parameters": [WORKLOAD_ID],
            "responses": {"200": _json(_ref("Workload"), "the workload"), **_errors(401, 403, 404)}},
            "delete": {
                "summary": "Delete one of your workloads: its running jobs are cancelled, its jobs, images and"
                           " thumbnails removed (files and objects too)",
                "security": BEARER, "parameters": [WORKLOAD_ID],
                "responses": {"200": _json({"type": "object", "properties": {
                    "deleted": {"type": "boolean"}, "workload_id": {"type": "string"},
                    "workload_name": {"type": "string"}, "images": {"type": "integer"},
                    "filtered_images": {"type": "integer"}, "jobs": {"type": "integer"},
                    "files": {"type": "integer"}, "bytes": {"type": "integer"},
                    "jobs_cancelled": {"type": "integer"}}}, "what was removed"),
                    **_errors(401, 403, 404)}}},
        "/workloads/{workload_id}/jobs": {"get": {
            "summary": "Per image: state, attempts, copies, worker, timings", "security": BEARER,
            "parameters": [WORKLOAD_ID],
            "responses": {"200": _json({"type": "array", "items": _ref("JobTiming")}, "jobs"),
                          **_errors(401, 403, 404)}}},
        "/images": {
            "post": {"summary": "Upload an original image (multipart, file in field data)", "security": BEARER,
                     "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                         "type": "object", "required": ["data", "workload_id"],
                         "properties": {"data": {"type": "string", "format": "binary"},
                                        "workload_id": {"type": "string"},
                                        "type": IMAGE_TYPE,
                                        "image_id": {"type": "integer", "minimum": 0}}}}}},
                     "responses": {"200": _json(_ref("Uploaded"), "stored"),
                                   **_errors(400, 401, 403, 404, 409, 413, 415)}},
            "get": {"summary": "A workload's images", "security": BEARER,
                    "parameters": [_param("workload_id", "query", {"type": "string"}, True),
                                   _param("type", "query", IMAGE_TYPE)],
                    "responses": {"200": _json({"type": "array", "items": _ref("ImageEntry")}, "images"),
                                  **_errors(400, 401, 403, 404)}},
        },
        "/images/{image_id}": {"get": {
            "summary": "Download an image, or a thumbnail of it", "security": BEARER,
            "parameters": [_param("image_id", "path", {"type": "integer", "minimum": 0}, True),
                           _param("workload_id", "query", {"type": "string"}, True),
                           _param("type", "query", IMAGE_TYPE),
                           _param("size", "query", {"type": "string", "enum": list(THUMB_SIZES)},
                                  description="a thumbnail: 100, 300 or 600 px on the long side")],
            "responses": {"200": {"description": "the image bytes", "content": {
                f"image/{t}": {"schema": {"type": "string", "format": "binary"}}
                for t in ("png", "jpeg", "gif", "bmp", "webp", "tiff")}},
                **_errors(400, 401, 403, 404)}}},
        "/events": {"get": {
            "summary": "Server-sent events: a snapshot of workers and the caller's workloads, then its changes",
            "description": EVENTS_DESCRIPTION,
            "security": BEARER,
            "responses": {"200": {"description": "an event stream", "content": {"text/event-stream": {
                "schema": {"type": "string"}}}}, **_errors(401, 403)}}},
        "/metrics": {"get": {
            "summary": "Prometheus metrics (open on loopback, a user token otherwise)", "security": [{}, *BEARER],
            "responses": {"200": {"description": "Prometheus text format", "content": {"text/plain": {
                "schema": {"type": "string"}}}}, **_errors(401, 403)}}},
        "/openapi.json": {"get": {
            "summary": "This description", "security": [],
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3")}}},
        "/": {"get": {
            "summary": "The dashboard (a static page; it logs in by itself)", "security": [],
            "responses": {"200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}}}},
        "/favicon.ico": {"get": {
            "summary": "The dashboard's icon", "security": [],
            "responses": {"200": {"description": "SVG", "content": {"image/svg+xml": {"schema": {"type": "string"}}}}}}},
    }
    doc: dict[str, Any] = {
        "openapi": "3.0.3",
        "info": {"title": "DPIP", "version": "1",
                 "description": "Distributed and Parallel Image Processing: workloads of images filtered by workers."},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
                                "basic": {"type": "http", "scheme": "basic"}},
        },
    }
    if server_url:
        doc["servers"] = [{"url": server_url}]
    return doc

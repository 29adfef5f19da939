"""The HTTP application: ``create_app(settings)`` declares the routes and the middlewares.

It serves; it does not build what it serves. The datastore, the image store, the controller's
membership and the scheduler are opened and closed by the composition root
(:mod:`server.services`), which hands them over through the typed keys in :mod:`api.keys`.
Errors of every kind leave as JSON ``{"error": ...}``.
"""

from __future__ import annotations

import asyncio
import logging
import uuid

from aiohttp import web

from api import handlers, images, observe
from api.keys import AUTH, METRICS, SETTINGS, STOPPING
from api.metrics import Metrics
from api.ports import ApiSettings
from common.logs import LogLimiter
from common.models import DpipError, clipped

logger = logging.getLogger(__name__)
_store_log = LogLimiter(logger)  # an outage answers every request with a 503: a few lines say so


#: A backstop: no error body grows with the input, whatever a message quotes.
MAX_ERROR_CHARS = 500


def error_response(status: int, message: str, headers: dict | None = None) -> web.Response:
    if len(message) > MAX_ERROR_CHARS:
        message = message[:MAX_ERROR_CHARS] + "…"
    return web.json_response({"error": message}, status=status, headers=headers)


def _client_gone(request: web.Request) -> bool:
    """The client closed its connection (mid-body, typically): nothing to answer, nothing wrong."""
    return request.transport is None or request.transport.is_closing()


@web.middleware
async def fresh_users(request: web.Request, handler) -> web.StreamResponse:
    """Users removed by ``main.py users remove`` (another process) lose their tokens at once."""
    auth = request.app.get(AUTH)
    if auth is not None:
        await auth.refresh_users()
    return await handler(request)


@web.middleware
async def errors_as_json(request: web.Request, handler) -> web.StreamResponse:
    """Map domain errors and aiohttp's own HTTP errors to JSON; never leak a stack trace."""
    try:
        return await handler(request)
    except DpipError as e:
        if e.status in (503, 507):  # not a bug: a store that is down or full, said as it is
            _store_log.warning(str(e.status), "%s %s: %s", request.method, clipped(request.path), e)
            return error_response(e.status, str(e), e.headers())
        if e.status >= 500:
            return _internal_error(request)
        return error_response(e.status, str(e), e.headers())
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: v for k, v in e.headers.items() if k in ("Allow", "WWW-Authenticate", "Retry-After")}
        reason = {
            404: f"no such endpoint: {clipped(request.method)} {clipped(request.path)}",
            405: f"method {clipped(request.method)} not allowed on {clipped(request.path)};"
                 f" allowed: {e.headers.get('Allow', '')}",
            413: "request body too large",
        }.get(e.status, e.text or e.reason)
        return error_response(e.status, reason, headers)
    except ConnectionResetError as e:  # aiohttp's, when the client hangs up mid-body
        if not _client_gone(request):
            return _internal_error(request)
        logger.info("%s %s: the client %s closed the connection before sending its whole request (%s)",
                    request.method, request.path, request.remote, e)
        return error_response(400, "connection closed before the request was complete")
    except Exception:
        return _internal_error(request)


def _internal_error(request: web.Request) -> web.Response:
    """A JSON 500 whose request id finds the traceback in the log (logged with it)."""
    request_id = uuid.uuid4().hex[:12]
    logger.exception("unhandled error on %s %s (request %s)", request.method, clipped(request.path), request_id)
    return web.json_response({"error": "internal server error", "request_id": request_id}, status=500)


def create_app(settings: ApiSettings) -> web.Application:
    """The HTTP API. The services it serves (datastore, membership, scheduler, ...) are added by
    the composition root, :func:`server.services.build_app`."""
    app = web.Application(middlewares=[observe.count_requests, errors_as_json, fresh_users],
                          client_max_size=1024 * 1024)
    app[SETTINGS] = settings
    app[METRICS] = Metrics()
    app[STOPPING] = asyncio.Event()
    app.on_shutdown.append(_stop_streams)
    r = app.router
    r.add_route("GET", "/login", handlers.login)
    r.add_route("POST", "/login", handlers.login)
    r.add_route("DELETE", "/logout", handlers.logout)
    r.add_route("GET", "/status", handlers.status)
    r.add_route("POST", "/workloads", handlers.create_workload)
    r.add_route("GET", "/workloads", handlers.list_workloads)
    r.add_route("GET", "/workloads/{workload_id}", handlers.get_workload)
    r.add_route("DELETE", "/workloads/{workload_id}", handlers.delete_workload)
    r.add_route("GET", "/workloads/{workload_id}/jobs", handlers.workload_jobs)
    r.add_route("POST", "/images", images.upload_image)
    r.add_route("GET", "/images", images.list_images)
    r.add_route("GET", "/images/{image_id}", images.download_image)
    observe.add_routes(app)
    return app


async def _stop_streams(app: web.Application) -> None:
    """Event streams would hold a graceful stop for aiohttp's whole shutdown timeout."""
    app[STOPPING].set()

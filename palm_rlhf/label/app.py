"""The routes: the page, its static files, and the JSON API the page (or a script) uses.

POST /api/next    {"client"}                   -> {"item": {...} | null, "done", "progress"}
POST /api/submit  {"client", "id", <label>}    -> {"ok", "id", "tie"}   (label: see modes.py)
POST /api/skip    {"client", "id"}             -> {"ok", "id"}
POST /api/undo    {"client"}                   -> {"ok", "undone", "item"}
GET  /api/stats                                -> {"mode", "scale", "settings", "progress", ...}
Errors are 4xx with {"error": "..."} and write nothing. The session's methods block (file
syncs, waiting for generation), so they run in the thread pool, off the event loop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from palm_rlhf.label.modes import LabelError
from palm_rlhf.label.security import Guard
from palm_rlhf.label.session import CLIENT_ID, LabelSession

STATIC = Path(__file__).parent / "static"
MAX_BODY = 64 * 1024  # a label is a few hundred bytes


async def read_json(request: Request) -> dict:
    """The request's JSON object, read with a size cap (a chunked body has no length)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY:
            raise LabelError(413, f"body over {MAX_BODY} bytes")
    try:
        value = json.loads(body)
    except ValueError:
        raise LabelError(400, "body is not valid JSON") from None
    if not isinstance(value, dict):
        raise LabelError(400, f"body must be a JSON object, not {type(value).__name__}")
    client = value.get("client", "api")
    if not isinstance(client, str) or not CLIENT_ID.fullmatch(client):
        raise LabelError(400, '"client" must be 1-64 letters, digits, "-" or "_"')
    value["client"] = client
    return value


def create_app(
    session: LabelSession, settings: dict, token: Optional[str] = None, loopback_only: bool = True
) -> Guard:
    """The ASGI app for one session, behind its Guard (`token`, `loopback_only`)."""

    async def page(request: Request):
        return FileResponse(STATIC / "index.html")

    async def next_item(request: Request):
        body = await read_json(request)
        return JSONResponse(await run_in_threadpool(session.next, body["client"]))

    async def submit(request: Request):
        body = await read_json(request)
        result = await run_in_threadpool(session.submit, body["client"], body.get("id"), body)
        return JSONResponse(result)

    async def skip(request: Request):
        body = await read_json(request)
        return JSONResponse(await run_in_threadpool(session.skip, body["client"], body.get("id")))

    async def undo(request: Request):
        body = await read_json(request)
        return JSONResponse(await run_in_threadpool(session.undo, body["client"]))

    async def stats(request: Request):
        return JSONResponse({**await run_in_threadpool(session.stats), "settings": settings})

    async def label_error(request: Request, error: LabelError):
        return JSONResponse({"error": str(error)}, status_code=error.status)

    async def http_error(request: Request, error: HTTPException):
        return JSONResponse({"error": error.detail}, status_code=error.status_code)

    routes = [
        Route("/", page),
        Route("/api/next", next_item, methods=["POST"]),
        Route("/api/submit", submit, methods=["POST"]),
        Route("/api/skip", skip, methods=["POST"]),
        Route("/api/undo", undo, methods=["POST"]),
        Route("/api/stats", stats),
        Mount("/static", StaticFiles(directory=STATIC)),
    ]
    app = Starlette(
        routes=routes, exception_handlers={LabelError: label_error, HTTPException: http_error}
    )
    return Guard(app, token=token, loopback_only=loopback_only, max_body=MAX_BODY)

"""Who may talk to the label server, checked before any route runs (pure ASGI middleware).

- Host: on a loopback address only loopback Host names are served, so a web page whose DNS
  name is re-pointed at 127.0.0.1 (DNS rebinding) cannot read or post labels.
- Token: when set (always, off loopback) every request, page and API alike, must carry it: an
  ``Authorization: Bearer`` or ``X-Label-Token`` header, the ``?token=`` of the printed URL, or
  the HttpOnly, SameSite=Strict cookie the page receives on that first visit (so the page's own
  fetches and assets carry it, and the URL can drop it). Missing: 401; wrong: 403.
- Requests that change state (anything but GET/HEAD) must be ``application/json`` (which a
  cross-site HTML form cannot send) and, when they carry an Origin, come from this origin.
- Bodies over `max_body` bytes are refused with 413 before they are read.
Every response gets a strict Content-Security-Policy (no inline script, so even a text the
page mistakenly treated as markup could not run), nosniff, no-referrer and no caching.
"""

from __future__ import annotations

import ipaddress
import secrets
from typing import Optional
from urllib.parse import parse_qs

from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1"}
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "img-src 'self'; connect-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
    "x-frame-options": "DENY",
}


def is_loopback(host: str) -> bool:
    if host.strip("[]") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_name(host_header: str) -> str:
    """'127.0.0.1:8000' -> '127.0.0.1'; '[::1]:8000' -> '::1'."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


class Guard:
    def __init__(self, app, token: Optional[str], loopback_only: bool, max_body: int = 65536):
        self.app, self.token, self.loopback_only, self.max_body = (
            app,
            token,
            loopback_only,
            max_body,
        )

    def cookie_name(self, scope) -> str:
        port = (scope.get("server") or ("", 0))[1]
        return f"palm_label_{port}"  # cookies ignore ports: two servers must not share one

    def _supplied_token(self, scope, headers: Headers) -> tuple[Optional[str], bool]:
        """(token offered, whether it came in the URL)."""
        authorization = headers.get("authorization", "")
        if authorization.lower().startswith("bearer "):
            return authorization[7:].strip(), False
        if "x-label-token" in headers:
            return headers["x-label-token"], False
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        if "token" in query:
            return query["token"][0], True
        for part in headers.get("cookie", "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == self.cookie_name(scope):
                return value, False
        return None, False

    def _problem(self, scope, headers: Headers) -> Optional[tuple[int, str]]:
        host = headers.get("host", "")
        if self.loopback_only and not is_loopback(_host_name(host)):
            return 403, f"Host {host!r} refused: this server answers loopback names only"
        if self.token is not None:
            offered, _ = self._supplied_token(scope, headers)
            if offered is None:
                return 401, "this server needs its token: open the URL it printed (?token=...)"
            if not secrets.compare_digest(offered.encode(), self.token.encode()):
                return 403, "wrong token"
        if scope["method"] not in ("GET", "HEAD"):
            media_type = headers.get("content-type", "").split(";")[0].strip().lower()
            if media_type != "application/json":
                return 415, "send the body as application/json"
            origin = headers.get("origin")
            if origin is not None and origin != f"{scope.get('scheme', 'http')}://{host}":
                return 403, f"cross-origin request from {origin!r} refused"
            if headers.get("sec-fetch-site") == "cross-site":
                return 403, "cross-site request refused"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return 413, f"body over {self.max_body} bytes"
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        offered, in_url = self._supplied_token(scope, headers)
        set_cookie = self.token is not None and in_url and offered == self.token

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                response_headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    response_headers.setdefault(name, value)
                if set_cookie:
                    cookie = (
                        f"{self.cookie_name(scope)}={self.token}; HttpOnly; SameSite=Strict; Path=/"
                    )
                    response_headers.append("set-cookie", cookie)
            await send(message)

        problem = self._problem(scope, headers)
        if problem is not None:
            response = JSONResponse({"error": problem[1]}, status_code=problem[0])
            return await response(scope, receive, send_with_headers)
        return await self.app(scope, receive, send_with_headers)

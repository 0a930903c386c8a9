"""What answers before (or instead of) a route: the API key check, and every error the
framework itself would answer (unknown route, wrong method, a body that is not JSON or not
the schema, a bug of ours) in OpenAI's error shape: {"error": {"message", "type", "param",
"code"}}, never a plain-text 500 or a traceback."""
from __future__ import annotations

import hmac
import logging

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from .responses import ApiError

log = logging.getLogger("dysco_edge.server")

ROUTES = "GET /health, GET /slots, GET /v1/models, POST /v1/chat/completions and POST /v1/completions"


class RequireKey:
    """ASGI middleware: every HTTP request but those to `open_paths` (exact, or a prefix where the
    entry ends in "/" and is not "/" itself) carries
    'Authorization: Bearer <key>', checked before the route is looked up or the body read
    (so an unknown route, /openapi.json or malformed JSON without the key is a 401 too)."""

    def __init__(self, app, key: str, open_paths: tuple[str, ...] = ()):
        self.app, self.open_paths = app, open_paths
        self._expected = f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self._open(scope["path"]) and not self._allowed(scope):
            error = ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                             type="authentication_error")
            response = JSONResponse(error.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _open(self, path: str) -> bool:
        return any(path == p or (len(p) > 1 and p.endswith("/") and path.startswith(p)) for p in self.open_paths)

    def _allowed(self, scope) -> bool:
        given = next((value for name, value in scope["headers"] if name == b"authorization"), b"")
        return hmac.compare_digest(given, self._expected)


def _answer(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


async def http_error_response(request: Request, exc: HTTPException) -> JSONResponse:
    """The framework's own answers (no such route, method not allowed) as OpenAI errors."""
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404:
        error = ApiError(404, f"no route {where}; this server answers {ROUTES}", type="not_found_error")
    elif exc.status_code == 405:
        allowed = {k.lower(): v for k, v in (exc.headers or {}).items()}.get("allow")
        error = ApiError(405, f"{where}: method not allowed" + (f" (allowed: {allowed})" if allowed else ""))
    else:
        error = ApiError(exc.status_code, str(exc.detail))
    error.headers = dict(exc.headers or {})
    return _answer(error)


async def validation_error_response(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A body that is not JSON, or not the schema, as one 400 naming each field."""
    problems, params = [], []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            reason = (err.get("ctx") or {}).get("error", "")
            return _answer(ApiError(400, f"the request body is not valid JSON ({reason or 'cannot parse'})"))
        loc = ".".join(str(part) for part in err.get("loc", ()) if part != "body")
        problems.append(f"{loc or 'body'}: {str(err.get('msg', '')).removeprefix('Value error, ')}")
        params.append(loc or None)
    return _answer(ApiError(400, "; ".join(problems) or "invalid request", param=params[0] if params else None))


async def unexpected_error_response(request: Request, exc: Exception) -> JSONResponse:
    """A bug of ours: logged with its traceback here, a one-line 500 to the client."""
    log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _answer(ApiError(500, f"the server failed to answer ({type(exc).__name__}); its log has the details",
                            type="server_error"))

"""OpenAI-style errors: {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status, for every error
the server answers (its own, FastAPI's 404/405/413/422, and any bug, which is a JSON 500, never plain text)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

log = logging.getLogger("energon_hf.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """The body of every error answer (the served OpenAPI schema names it for each status)."""

    error: ErrorDetail


def engine_failed(error: BaseException) -> APIError:
    return APIError(503, f"the engine failed: {error}", kind="engine_error")


HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}


def install_error_handlers(app: FastAPI, max_body_bytes: int) -> None:
    """Every error in OpenAI's error object: ours, FastAPI's own (unknown route, wrong method, a body over the
    limit, a body that fails validation, which is 400 as in OpenAI's API) and unexpected ones (500)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        message = str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        elif exc.status_code == 413:
            message = f"the request body is over the limit of {max_body_bytes} bytes (--max-body-bytes)"
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 413:  # uvicorn closes the connection instead of reading the rest of the body
            headers["Connection"] = "close"
        return APIError(exc.status_code, message, code=HTTP_CODES.get(exc.status_code), headers=headers).response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            return APIError(400, f"the body is not valid JSON: {first.get('msg')}").response()
        # loc: ("body", field, ...), with pydantic's names of union members ("constrained-str") in between
        parts = [str(p) for p in first.get("loc", ()) if p != "body" and not ("-" in str(p) or "[" in str(p))]
        field = ".".join(parts) or None
        message = str(first.get("msg")).removeprefix("Value error, ")
        return APIError(400, f"{field or 'body'}: {message}", param=parts[0] if parts else None).response()

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").response()

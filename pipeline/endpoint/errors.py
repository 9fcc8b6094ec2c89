"""Every error the API answers, mapped in one place to OpenAI's error JSON.

Nothing a client sends may produce a 500: validation problems are 400s, and unexpected
exceptions answer a generic message with no stack trace or file path.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pipeline.config import format_validation_error
from pipeline.endpoint.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
          405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
          503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 retry_after: Optional[int] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.retry_after = status, message, param, code, retry_after


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[Any] = None) -> dict:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return ErrorResponse(error=ErrorInfo(message=message, type=_TYPES.get(status, "server_error"), param=param, code=code)).model_dump()


def error_response(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                   retry_after: Optional[int] = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after)} if retry_after else None
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def error_event(exc: BaseException) -> dict:
    """The error object sent inside an SSE stream once headers are already out."""
    status, message = (exc.status, exc.message) if isinstance(exc, APIError) else (500, "internal error")
    return error_body(status, message, code=status)


def _param(loc: tuple) -> Optional[str]:
    parts = [str(p) for p in loc if p not in ("body", "query")]
    return ".".join(parts) or None


def invalid_request(errors: list[Any]) -> APIError:
    """A request body its model refuses (FastAPI's RequestValidationError or pydantic's errors)."""
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    if first.get("type") == "json_invalid":
        return APIError(400, "request body is not valid JSON")
    message = "; ".join(f"{_param(e['loc']) or 'body'}: {e['msg']}" for e in errors[:5])
    return APIError(400, message, _param(first["loc"]))


def describe(exc: BaseException) -> APIError:
    """What the API answers for an exception raised while handling a request (HTTP and batch files)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValidationError):  # SamplingConfig refused the request's values
        return APIError(400, format_validation_error(exc))
    if isinstance(exc, ValueError):
        return APIError(400, str(exc))
    return APIError(500, "internal error")


def _answer(err: APIError) -> JSONResponse:
    return error_response(err.status, err.message, err.param, err.code, err.retry_after)


def install(app: FastAPI) -> None:
    """Register the exception handlers on ``app``."""

    @app.exception_handler(APIError)
    @app.exception_handler(ValidationError)
    @app.exception_handler(ValueError)
    async def _known(_: Request, exc: Exception) -> JSONResponse:
        return _answer(describe(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _answer(invalid_request(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unexpected error on %s", request.url.path)
        return _answer(describe(exc))

"""Errors the gateway answers with, one class per OpenAI error type and HTTP status."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


def error_body(message: str, type_: str, param: str | None = None, code: str | int | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class GatewayError(Exception):
    status = 500
    type = "api_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def response(self, headers: dict[str, str] | None = None) -> Response:
        return Response(
            orjson.dumps(error_body(self.message, self.type, self.param, self.code)),
            status_code=self.status,
            media_type="application/json",
            headers=headers,
        )


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(GatewayError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class UpstreamUnavailable(GatewayError):
    status = 502
    type = "upstream_error"
    code = "upstream_unavailable"


class UpstreamFailed(GatewayError):
    """An upstream's error without OpenAI's shape, relayed in it with the upstream's own status (502 if
    it was not an error status)."""

    type = "upstream_error"

    def __init__(self, message: str, upstream_status: int) -> None:
        super().__init__(message)
        self.status = upstream_status if upstream_status >= 400 else 502


class UpstreamTimeout(GatewayError):
    status = 504
    type = "upstream_error"
    code = "upstream_timeout"


class ServiceUnavailable(GatewayError):
    """A part of the gateway is away for now; answered with ``retry-after`` (the OpenAI SDKs honour it)."""

    status = 503
    type = "service_unavailable"
    code = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 1) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def response(self, headers: dict[str, str] | None = None) -> Response:
        return super().response({**(headers or {}), "retry-after": str(self.retry_after_s)})

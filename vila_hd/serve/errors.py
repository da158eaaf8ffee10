"""Errors a request can get, in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

from __future__ import annotations

from typing import Any

from vila_hd.errors import VilaHDError

TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error"}


class APIError(VilaHDError):
    """A request refused with ``status``; ``param`` names the body field at fault (``None`` if none)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers, self.type = headers or {}, type

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code, self.type)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None,
               type: str | None = None) -> dict[str, Any]:
    """The body; ``type`` defaults to the status's (OpenAI's model_not_found 404 is an invalid_request_error)."""
    return {"error": {"message": message, "type": type or TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}

"""JSON errors: every client mistake gets a 4xx naming the problem; nothing ever returns an HTML page."""
from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger("server")


class APIError(Exception):
    """An error with an HTTP status and a message that names the problem and the fix."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


def bad_request(msg: str) -> APIError:
    return APIError(400, msg)


def error_body(status: int, message: str) -> dict:
    return {"error": message, "status": status}


def retry_headers(retry_after: float | None) -> list[tuple[str, str]]:
    return [] if retry_after is None else [("Retry-After", str(max(1, int(round(retry_after)))))]


def unexpected_message(exc: Exception) -> str:
    return f"internal server error ({type(exc).__name__}); see the server log"


def error_response(status: int, message: str, retry_after: float | None = None):
    resp = jsonify(error_body(status, message))
    resp.status_code = status
    resp.headers.extend(retry_headers(retry_after))
    return resp


def http_error_message(exc: HTTPException, max_request_bytes: int | None) -> str:
    if exc.code == 413:
        return f"request body too large (limit {max_request_bytes} bytes, --max-request-bytes)"
    return exc.description or exc.name


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(APIError)
    def _api_error(exc: APIError):
        return error_response(exc.status, exc.message, exc.retry_after)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        return error_response(exc.code or 500, http_error_message(exc, app.config.get("MAX_CONTENT_LENGTH")))

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, unexpected_message(exc))

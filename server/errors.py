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


def error_response(status: int, message: str, retry_after: float | None = None):
    resp = jsonify({"error": message, "status": status})
    resp.status_code = status
    if retry_after is not None:
        resp.headers["Retry-After"] = str(max(1, int(round(retry_after))))
    return resp


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(APIError)
    def _api_error(exc: APIError):
        return error_response(exc.status, exc.message, exc.retry_after)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        msg = exc.description or exc.name
        if exc.code == 413:
            limit = app.config.get("MAX_CONTENT_LENGTH")
            msg = f"request body too large (limit {limit} bytes, --max-request-bytes)"
        return error_response(exc.code or 500, msg)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, f"internal server error ({type(exc).__name__}); see the server log")

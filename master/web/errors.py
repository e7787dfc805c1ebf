"""The API's error answer: {"error": {"code", "message", "field"?...}} with the HTTP status of its code."""
from __future__ import annotations

from typing import Any

from ticketfarm.errors import TicketfarmError

#: HTTP status of each error code (the master's control replies use the same codes).
STATUS_OF_CODE = {"bad_request": 400, "unauthorized": 401, "forbidden": 403, "not_found": 404,
                  "method_not_allowed": 405, "not_acceptable": 406, "conflict": 409, "gone": 410,
                  "too_large": 413, "unsupported_media_type": 415, "internal": 500, "not_implemented": 501,
                  "bad_gateway": 502, "unavailable": 503, "gateway_timeout": 504}
#: The code answered for a status the API does not raise itself (a framework's own 404, 405, ...).
CODE_OF_STATUS = {status: code for code, status in STATUS_OF_CODE.items()}


class ApiError(TicketfarmError):
    """An error answered as JSON with the code's HTTP status; `extra` (e.g. field) joins the body."""

    def __init__(self, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.code = code
        self.message = message
        self.extra = extra

    @property
    def status(self) -> int:
        return STATUS_OF_CODE[self.code]

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, **self.extra}}

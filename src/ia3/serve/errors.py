"""The errors the server answers with: an HTTP status and a JSON body `{"error": {"type": ..., "message": ...}}`
(plus `param` and `code` where they apply, as OpenAI's API has them, so its clients read the errors too)."""

from __future__ import annotations


class ApiError(Exception):
    """An error meant for the client: `status` (HTTP), `type` (a stable machine-readable word), `message`."""

    def __init__(
        self,
        status: int,
        type: str,
        message: str,
        headers: dict[str, str] | None = None,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.type = type
        self.message = message
        self.headers = headers or {}
        self.param = param
        self.code = code

    def body(self) -> dict:
        error = {"type": self.type, "message": self.message}
        if self.param is not None:
            error["param"] = self.param
        if self.code is not None:
            error["code"] = self.code
        return {"error": error}


def adapter_not_found(name: str, known: list[str] | None = None) -> ApiError:
    extra = f"; loaded: {known}" if known is not None else ""
    return ApiError(404, "adapter_not_found", f"Adapter {name!r} is not loaded (use '__base__' for no adapter){extra}")


class QueueFull(ApiError):
    def __init__(self, capacity: int) -> None:
        super().__init__(
            503,
            "overloaded",
            f"The request queue is full ({capacity} requests waiting); retry shortly",
            headers={"Retry-After": "1"},
        )


class ShuttingDown(ApiError):
    def __init__(self) -> None:
        super().__init__(503, "shutting_down", "The server is shutting down")

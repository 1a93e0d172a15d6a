"""Engine errors that the API maps to HTTP answers."""


class QueueFullError(RuntimeError):
    """The waiting queue holds `max_waiting` requests: the API answers 503 with Retry-After."""

    def __init__(self, max_waiting: int) -> None:
        super().__init__(
            f"the server is overloaded: {max_waiting} requests are already waiting; retry later"
        )
        self.max_waiting = max_waiting


class ShuttingDownError(RuntimeError):
    """The server stops and its graceful-shutdown bound has passed: open requests end with it
    (503; a stream gets an error event, then `data: [DONE]`)."""

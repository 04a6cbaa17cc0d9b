"""Stops that end the CLI with one line naming the problem, not a traceback."""


class InputError(SystemExit):
    """Unusable input (data folder, images, device spec, checkpoint); exits with this message and no traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(f"ms-splatfacto: {message}")


class TrainingStopped(InputError):
    """Training that cannot go on (values no longer finite); exits like InputError."""

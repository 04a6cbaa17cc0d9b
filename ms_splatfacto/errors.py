"""Refusals of bad user input that end the CLI with one line naming the problem, not a traceback."""


class InputError(SystemExit):
    """Unusable input (data folder, images, device spec); exits with this message and no traceback."""

    def __init__(self, message: str) -> None:
        super().__init__(f"ms-splatfacto: {message}")

"""User-facing errors. `InputError` is bad input: the CLI prints its one-line message and exits 2."""


class InputError(ValueError):
    """Bad user input (file, key, shape). The message is one line and names what is wrong."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))

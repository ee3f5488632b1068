"""The one exception type the tool raises for bad input; the CLI prints it as one line."""


class SurgeryError(Exception):
    """A user-facing error: the message says what is wrong and, where possible, what to do."""

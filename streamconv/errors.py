"""The one exception type users see: a problem with the input or the request, worded as a fix."""


class ConversionError(Exception):
    """Bad input or arguments. The CLI prints the message as one line and exits with code 2."""

"""The one exception type users see: a message that names the file or setting and the fix."""


class TLExtractError(Exception):
    """A user-facing error. The CLI prints its message and exits with status 2."""

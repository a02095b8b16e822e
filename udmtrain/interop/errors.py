"""The one base class of every interop error (the CLIs print it as one ``udmtrain: ...`` line)."""


class InteropError(ValueError):
    """A foreign checkpoint or an export that cannot be mapped exactly; the message names the key/file."""

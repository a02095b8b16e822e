"""The data family's user-facing error type."""

from __future__ import annotations


class DataError(Exception):
    """Bad data input: missing shards, corrupt members, a manifest that does not match the recipe.

    The message always names the file, pattern or key at fault and says what to do about it.
    """

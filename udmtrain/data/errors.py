"""The data family's user-facing error type."""

from __future__ import annotations


class DataError(Exception):
    """Bad data input: missing shards, corrupt members, a manifest that does not match the recipe.

    The message always names the file, pattern or key at fault and says what to do about it.
    """

    rebuild_fixes = True
    """Whether rebuilding the shards (``tools/prepare_data.py``) is a fix: False for problems that a new
    data set would not cure (a damaged tokenizer file, a shard listed twice), so no rebuild is suggested."""

    def __init__(self, message: str, *, rebuild_fixes: bool = True) -> None:
        super().__init__(message)
        self.rebuild_fixes = rebuild_fixes

"""Errors a user can cause. The CLI prints their message in one line and exits 2."""
from . import exit_codes


class UsageError(Exception):
    """Bad input: a spec value, a missing or corrupt file, a dataset that cannot be used."""

    exit_code = exit_codes.BAD_INPUT.code


def relative_to_cwd(path: str) -> str:
    """' (relative to /the/working/folder)' for a relative path, '' for an absolute one or a URI.

    Appended to "not found" messages so the user sees which folder a relative path was looked up in.
    """
    import os

    if not path or os.path.isabs(path) or "://" in path:
        return ""
    return f" (relative to {os.getcwd()})"

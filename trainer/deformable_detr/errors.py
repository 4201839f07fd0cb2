"""Errors a user can cause. The CLI prints their message in one line and exits 2."""
from . import exit_codes


class UsageError(Exception):
    """Bad input: a spec value, a missing or corrupt file, a dataset that cannot be used."""

    exit_code = exit_codes.BAD_INPUT.code


class FeatureUnavailable(UsageError):
    """Something this machine cannot do (a TensorRT engine without tensorrt or a GPU): exit code 3."""

    exit_code = exit_codes.UNAVAILABLE_FEATURE.code


class Diverged(UsageError):
    """Training's loss or weights became NaN or infinite: exit code 4, permanent (a restart repeats it)."""

    exit_code = exit_codes.DIVERGED.code


def one_line(err: BaseException) -> str:
    """`Type: first line of the message`, for logs and records that must stay one line."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def relative_to_cwd(path: str) -> str:
    """' (relative to /the/working/folder)' for a relative path, '' for an absolute one or a URI.

    Appended to "not found" messages so the user sees which folder a relative path was looked up in.
    """
    import os

    if not path or os.path.isabs(path) or "://" in path:
        return ""
    return f" (relative to {os.getcwd()})"

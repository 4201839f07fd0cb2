"""Errors a user can cause. The CLI prints their message in one line and exits 2."""


class UsageError(Exception):
    """Bad input: a spec value, a missing or corrupt file, a dataset that cannot be used."""

    exit_code = 2

"""Errors a user can act on. The CLI prints their message on one line, with no traceback."""


class StillroomError(Exception):
    """An expected failure (a corrupt store, a missing file): exit code 1."""

    exit_code = 1


class UsageError(StillroomError):
    """Bad input from the user (an unknown name, an id out of range): exit code 2."""

    exit_code = 2


class DataError(StillroomError):
    """A sample that cannot be read (not an image, truncated, unreadable): names the file or row."""


class StoreError(StillroomError):
    """The store on disk is missing, corrupt or not what the caller asked for."""

"""Errors a user can cause and fix. The CLI prints them as one line and exits non-zero."""


class UserInputError(Exception):
    """Bad input from the user (a path, a file's content, an option). The message names the
    thing and the reason, on one line, e.g. ``shards/000003.tar: truncated (ends at byte 81920)``.
    """

    exit_code = 2

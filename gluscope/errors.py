"""Errors shared by the command-line tools."""


class UserError(Exception):
    """A mistake the user can fix (bad name, bad path, bad option): printed as one line, no traceback."""

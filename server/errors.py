"""The one error shape of the server.

Views raise `ParameterError`; app.py turns it (and FastAPI's own validation
and routing errors) into the body below, as JSON or as an HTML error page:

    {"error": {"status": 404, "parameter": "layer", "message": "...", "valid": "0..31"}}

`parameter` names the offending path or query parameter (null for an unknown
URL); `valid` says what would have been accepted: a range, a list, or null.
"""

from __future__ import annotations

from typing import Any


class ParameterError(Exception):
    """A request named something that does not exist (404) or is malformed (422)."""

    def __init__(self, status: int, parameter: str | None, message: str, valid: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.parameter = parameter
        self.message = message
        self.valid = valid

    def __reduce__(self):
        # Raised in a reader process and re-raised in the front one: pickle all four fields.
        return type(self), (self.status, self.parameter, self.message, self.valid)

    def body(self) -> dict[str, Any]:
        return {"error": {"status": self.status, "parameter": self.parameter,
                          "message": self.message, "valid": self.valid}}


def out_of_range(parameter: str, value: int, stop: int) -> ParameterError:
    """404 for an index outside 0..stop-1."""
    valid = f"0..{stop - 1}" if stop > 0 else "none (the database holds no " + parameter + ")"
    return ParameterError(404, parameter, f"{parameter} {value} does not exist; valid: {valid}", valid)


def not_one_of(parameter: str, value: str, choices: list[str], status: int = 422) -> ParameterError:
    shown = value if len(value) <= 40 else value[:40] + "…"
    return ParameterError(status, parameter, f"unknown {parameter} {shown!r}; valid: {', '.join(choices)}", choices)

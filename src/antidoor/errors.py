"""The one exception users see: a clear, one-line message about bad input."""

from __future__ import annotations

from pydantic import ValidationError


class AntidoorError(ValueError):
    """Bad input from the user: a parameter, a file or a combination we cannot honour.

    The message names what was wrong, the value given and what is allowed. The CLI prints it
    on one line and exits with code 2, without a traceback.
    """


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line: each bad key with its value and what is allowed."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        if e["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        elif e["type"] == "value_error":  # our own AntidoorError from a validator: already a full sentence
            parts.append(str(e["ctx"]["error"]))
        else:
            parts.append(f"{loc} = {e.get('input')!r}: {e['msg']}")
    return "; ".join(parts)

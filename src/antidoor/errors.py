"""The one exception users see: a clear, one-line message about bad input."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

P = TypeVar("P", bound=BaseModel)


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


def validate_params(params_model: type[P], params: dict[str, Any], section: str, name: str) -> P:
    """Build a method's parameter model, turning pydantic's errors into one line that names the
    bad key, its value, what is allowed and every parameter the method takes."""
    try:
        return params_model(**params)
    except ValidationError as e:
        takes = ", ".join(params_model.model_fields)
        raise AntidoorError(f"{format_validation_error(e, section)} ({section} {name!r} takes: {takes})") from None

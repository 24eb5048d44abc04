"""The one exception users see: a clear, one-line message about bad input."""

from __future__ import annotations

import reprlib
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

P = TypeVar("P", bound=BaseModel)

EXCERPT_CHARS = 80  # the most of a user's value an error message repeats

# reprlib stops descending after a few levels and items, so even a value built from YAML aliases
# (billions of elements sharing a few lists) is summarised in a few steps
_repr = reprlib.Repr()
_repr.maxlevel, _repr.maxlist, _repr.maxtuple, _repr.maxdict, _repr.maxset = 3, 4, 4, 4, 4
_repr.maxstring, _repr.maxother, _repr.maxlong = 40, 40, 40


class AntidoorError(ValueError):
    """Bad input from the user: a parameter, a file or a combination we cannot honour.

    The message names what was wrong, the value given and what is allowed. The CLI prints it
    on one line and exits with code 2, without a traceback.
    """


def clip(text: str, limit: int = 400) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def excerpt(value: Any, limit: int = EXCERPT_CHARS) -> str:
    """A short, one-line ``repr`` of ``value``: at most ``limit`` characters, whatever its size or depth."""
    try:
        text = _repr.repr(value)
    except Exception:  # a hostile object's own __repr__: name its type only
        text = f"<{type(value).__name__}>"
    return clip(text, limit)


MAX_REPORTED = 5  # validation errors named in one message; the rest are counted


def format_validation_error(err: ValidationError, prefix: str = "") -> str:
    """One line: each bad key with its value and what is allowed."""
    parts = []
    errors = err.errors()
    for e in errors[:MAX_REPORTED]:
        loc = ".".join(clip(str(p), 40) for p in (prefix, *e["loc"]) if p != "")  # a key may be as hostile as a value
        if e["type"] == "extra_forbidden":
            parts.append(f"{loc}: unknown key")
        elif e["type"] == "missing":  # pydantic's input here is the enclosing section, not a value of this key
            parts.append(f"{loc}: required, not given")
        elif e["type"] == "value_error":  # our own AntidoorError from a validator: already a full sentence
            parts.append(clip(str(e["ctx"]["error"])))
        else:
            parts.append(f"{loc} = {excerpt(e.get('input'))}: {clip(e['msg'], 200)}")
    if len(errors) > MAX_REPORTED:
        parts.append(f"and {len(errors) - MAX_REPORTED} more")
    return "; ".join(parts)


FLOAT32_MAX = 3.4028234663852886e38  # torch casts a learning rate or a bound to the tensors' float32
MAX_CHECKED = 10_000  # values a settings check looks at: a validated config holds far fewer


def check_numbers(values: Any, where: str) -> None:
    """Refuse a float setting that is NaN, infinite or beyond float32's range: pydantic lets them through,
    and torch would fail mid-run with a traceback (an lr of 1e300 cannot become a float32) or train on NaN."""
    stack, seen = [(where, values)], 0
    while stack and seen < MAX_CHECKED:
        key, value = stack.pop()
        seen += 1
        if isinstance(value, dict):
            stack.extend((f"{key}.{clip(str(k), 40)}" if key else clip(str(k), 40), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{key}[{i}]", v) for i, v in enumerate(value))
        elif isinstance(value, float) and not abs(value) <= FLOAT32_MAX:  # NaN fails every comparison
            raise AntidoorError(f"{key} = {value!r} is not a usable number; allowed: finite values within "
                                f"+-{FLOAT32_MAX:.4g} (float32's range)")


def validate_params(params_model: type[P], params: dict[str, Any], section: str, name: str) -> P:
    """Build a method's parameter model, turning pydantic's errors into one line that names the
    bad key, its value, what is allowed and every parameter the method takes."""
    try:
        built = params_model(**params)
    except ValidationError as e:
        takes = ", ".join(params_model.model_fields)
        raise AntidoorError(f"{format_validation_error(e, section)} ({section} {name!r} takes: {takes})") from None
    check_numbers(built.model_dump(), section)
    return built

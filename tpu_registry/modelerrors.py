"""pydantic validation errors as ``Problem``s: the field, the line it is on, and the fix."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from .errors import Problem
from .tomlfile import locate

_HINTS = {
    "extra_forbidden": "unknown key: check its spelling against `tpu-registry schema`",
    "missing": "add this required field",
    "greater_than": "check the value and its unit",
    "greater_than_equal": "check the value and its unit",
    "less_than": "check the value and its unit (GB/s, not Gbps; GiB, not bytes)",
    "less_than_equal": "check the value and its unit (GB/s, not Gbps; GiB, not bytes)",
}
_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")
# Field names carry their unit; a range error on a field without one is not a unit slip.
_UNIT_MARKERS = ("_gb_s", "_gib", "_mib", "_kib", "_tflops", "_tops")
_HINTS_NO_UNIT = {
    "greater_than": "check the value against the allowed range",
    "greater_than_equal": "check the value against the allowed range",
    "less_than": "check the value against the allowed range",
    "less_than_equal": "check the value against the allowed range",
    "int_parsing": "write a whole number without quotes",
    "int_type": "write a whole number without quotes",
    "int_from_float": "write a whole number",
    "float_parsing": "write a number without quotes",
    "float_type": "write a number without quotes",
    "finite_number": "write a finite number (not nan or inf)",
    "bool_type": "write true or false",
    "bool_parsing": "write true or false",
    "string_type": "write a quoted string",
    "list_type": "write a list: [ ... ]",
    "literal_error": "use one of the allowed values",
    "string_pattern_mismatch": "see `tpu-registry schema` for the allowed form",
    "too_short": "add at least one entry",
    "model_type": "write a table",
    "dict_type": "write a table",
}


# Error type of the registry's own validators: they say what is wrong, how to fix it and, with
# ``at``, which key below the validated value is at fault (so the line can be found).
DATA_ERROR = "registry_data"


def data_error(message: str, hint: str = "", at: tuple = ()) -> PydanticCustomError:
    """An error for a validator to raise: ``message`` is shown as is, ``hint`` as the fix,
    ``at`` is appended to the location pydantic reports (a field validator's field, or a model
    validator's model)."""
    return PydanticCustomError(
        DATA_ERROR, "{message}", {"message": message, "hint": hint, "at": tuple(at)}
    )


def validate(
    model: type[BaseModel], doc: dict, text: str, path: Path, prefix: tuple = ()
) -> tuple[BaseModel | None, list[Problem]]:
    try:
        return model.model_validate(doc), []
    except ValidationError as e:
        return None, problems_from(e, text, str(path), prefix)


def problems_from(err: ValidationError, text: str, shown: str, prefix: tuple = ()) -> list[Problem]:
    out = []
    for item in err.errors(include_url=False):
        loc = prefix + tuple(item["loc"])
        if item["type"] == DATA_ERROR:
            ctx = item.get("ctx") or {}
            loc += tuple(ctx.get("at", ()))
            out.append(
                Problem(
                    shown,
                    locate(text, loc),
                    dotted(loc),
                    str(ctx.get("message", item["msg"])),
                    str(ctx.get("hint", "")),
                )
            )
            continue
        field = dotted(loc)
        msg = item["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if (
            item["type"] not in ("missing", "extra_forbidden", "model_type")
            and "input" in item
            and not isinstance(item["input"], (dict, list))
        ):
            got = item["input"]
            as_toml = str(got).lower() if isinstance(got, bool) else repr(got)
            msg = f"{msg} (got {as_toml})"
        hint = _HINTS.get(item["type"], "")
        if item["type"] in _RANGE_ERRORS and not any(
            m in str(loc[-1] if loc else "") for m in _UNIT_MARKERS
        ):
            hint = _HINTS_NO_UNIT[item["type"]]
        if item["type"] == "int_type" and isinstance(item.get("input"), bool):
            hint = "write a whole number, not true or false"
        if item["type"] == "extra_forbidden":
            msg = "unknown key"
        out.append(Problem(shown, locate(text, loc), field, msg, hint))
    return out


def dotted(loc: tuple) -> str:
    parts: list[str] = []
    for p in loc:
        if isinstance(p, int):
            parts.append(f"[{p}]")
        else:
            parts.append(("." if parts else "") + str(p))
    return "".join(parts)

"""What the config files' pydantic models share: refusals in the house's words, one line.

The broker's config (``enclave/broker/config.py``) and the BoM spec
(``vault/bom_spec.py``) are pydantic models, strict (YAML gives ints, floats,
bools, strings and datetimes: ``"8443"`` is not a port, ``"yes"`` is not
true). A field says what it expects in its own words (:func:`says`), a
validator refuses with :func:`fail`, and :func:`explain` turns pydantic's
``ValidationError`` into the one line the CLI prints: the field's path, then
the problem (``tenants.acme.artifacts.m.tdx.collateral: required``).

Imported only where a file is read or a schema exported: importing pydantic
costs ~0.1 s.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Collection
from typing import Any

from pydantic import ValidationError, ValidatorFunctionWrapHandler, WrapValidator
from pydantic_core import PydanticCustomError

__all__ = ["JSON_SCHEMA_DIALECT", "explain", "fail", "says", "schema_text", "write_schema"]

JSON_SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
_OWN = "sealstore"  # the error type of a refusal in the house's words


def fail(message: str, at: str | None = None) -> PydanticCustomError:
    """A refusal in the house's words; *at*: the field, under the model it is raised in."""
    return PydanticCustomError(_OWN, message, {"at": at} if at else None)


def says(message: str, *, own_only: bool = False) -> WrapValidator:
    """Report a failure of the annotated type (wrong type, out of range) as *message*.

    A refusal of a validator of the field's own (:func:`fail`) is kept. With
    *own_only*, the errors of a list's items or a mapping's values keep their
    own (deeper) messages; only the container's own are replaced.
    """

    def check(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        try:
            return handler(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            if first["type"] == _OWN or (own_only and first["loc"]):
                raise  # a check of the field's own said what is wrong, or an item's did
            raise fail(message) from None

    return WrapValidator(check)


def explain(exc: ValidationError, *, number_keyed: Collection[str] = (), path: bool = True) -> str:
    """The first of pydantic's errors as one line: the field's path, then the problem.

    ``tenants.acme.artifacts.m.tdx.collateral: give exactly one of dir and pccs_url``;
    ``top level`` for the document itself. List items are ``[i]``; the keys of
    the mappings named in *number_keyed* (RTMR indexes, ...) are ``.K``. Without
    *path*, the problem alone (for messages that name their field themselves).
    """
    err = exc.errors(include_url=False)[0]
    loc: list[Any] = list(err["loc"])
    if "[key]" in loc:  # a mapping's key is wrong: named at the mapping
        loc = loc[: loc.index("[key]") - 1]
    if err["type"] == "missing":
        message = f"missing field {loc.pop()!r}"
    elif err["type"] == "extra_forbidden":
        message = f"unknown field {loc.pop()!r}"
    elif err["type"] == _OWN:
        message = err["msg"]
        at = (err.get("ctx") or {}).get("at")
        loc += [at] if at else []
    else:  # every field says its own; should one not, pydantic's words
        message = err["msg"][:1].lower() + err["msg"][1:]
    return f"{_path(loc, number_keyed)}: {message}" if path else message


def _path(loc: list[Any], number_keyed: Collection[str]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if isinstance(part, int) and not (i and loc[i - 1] in number_keyed):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "top level"


def schema_text(schema: dict[str, Any]) -> str:
    """A JSON Schema as the CLI prints it and docs/schemas/ holds it (stable, diffable)."""
    return json.dumps(schema, indent=2, ensure_ascii=True) + "\n"


def write_schema(schema: dict[str, Any], output: str) -> None:
    """Print *schema* (``output`` ``-``) or write it to the file *output*."""
    text = schema_text(schema)
    if output == "-":
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    from sealstore.fsutil import atomic_file

    with atomic_file(output, mode=0o644) as fp:
        fp.write(text.encode())

"""The BoM spec (``push --bom FILE.yaml``) as a pydantic model: its fields, types and rules.

Imported by :func:`sealstore.vault.bom.load_bom_spec` only when a spec file is
given, so a push without one never imports pydantic. The same model is the
JSON Schema ``sealstore bom schema`` prints for editors.
"""

from __future__ import annotations

import datetime as dt
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from sealstore.docmodel import JSON_SCHEMA_DIALECT, fail, says
from sealstore.vault.bom import APPROACHES, KINDS, MODEL_ONLY

__all__ = ["BomSpecDoc", "json_schema"]


def _text(name: str) -> Any:
    return Annotated[str, says(f"{name} must be a string")]


def _one_of(allowed: tuple[str, ...], message: str) -> Any:
    def check(value: str) -> str:
        if value not in allowed:
            raise fail(message)
        return value

    return AfterValidator(check)


def _strings(name: str) -> Any:
    return Annotated[list[str], says(f"{name} must be a list of strings")]


def _plain_values(value: Any) -> Any:
    """Training parameters: a flat mapping, each value kept as its text (``2`` -> ``"2"``)."""
    if not isinstance(value, dict) or any(isinstance(v, dict | list) for v in value.values()):
        raise fail("training must map names to plain values")
    return {str(k): str(v) for k, v in value.items()}


_Scalar = str | int | float | bool | dt.date | dt.datetime | None


class BomSpecDoc(BaseModel):
    """What a user says about a version (``push --bom FILE.yaml``); every field optional.

    An absent text field is None (its default is not validated); given, it must
    be a string: ``task:`` with no value is refused, not taken as absent.
    """

    model_config = ConfigDict(
        extra="forbid", strict=True, frozen=True, title="sealstore BoM spec (push --bom)"
    )

    kind: Annotated[
        str, _one_of(KINDS, "kind must be model or dataset"), says("kind must be a string")
    ] = Field("model", json_schema_extra={"enum": list(KINDS)})
    description: _text("description") = None
    task: _text("task") = None
    architecture_family: _text("architecture_family") = None
    model_architecture: _text("model_architecture") = None
    approach: Annotated[
        str,
        _one_of(APPROACHES, f"approach must be one of {', '.join(APPROACHES)}"),
        says("approach must be a string"),
    ] = Field(None, json_schema_extra={"enum": list(APPROACHES)})
    datasets: _strings("datasets") = Field(
        default_factory=list,
        description="Store references (NAME:VERSION or NAME@TAG) in the same tenant: "
        "what a model was trained on, or what a dataset was derived from.",
    )
    training: Annotated[dict[str, str], BeforeValidator(_plain_values)] = Field(
        default_factory=dict,
        description="Training parameters: names to plain values (numbers, strings, ...).",
        json_schema_extra={
            "additionalProperties": {"type": ["string", "number", "boolean", "null"]}
        },
    )
    license: _text("license") = None
    authors: _strings("authors") = Field(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _a_mapping_of_known_fields(cls, data: Any) -> Any:
        if data is None:
            return {}  # an empty file: every default
        if not isinstance(data, dict):
            raise fail("the file must be a mapping of fields")
        known = sorted(cls.model_fields)
        unknown = sorted(str(k) for k in data if k not in known)
        if unknown:
            raise fail(f"unknown field(s) {', '.join(unknown)} (known: {', '.join(known)})")
        return data

    @model_validator(mode="after")
    def _a_dataset_is_no_model(self) -> BomSpecDoc:
        if self.kind == "dataset":
            given = [k for k in MODEL_ONLY if getattr(self, k)]
            if given:
                raise fail(f"a dataset has no {', '.join(given)} (fields of a model)")
        return self


def json_schema() -> dict[str, Any]:
    """The BoM spec's JSON Schema (for editors: ``sealstore bom schema``)."""
    return {"$schema": JSON_SCHEMA_DIALECT, **BomSpecDoc.model_json_schema()}

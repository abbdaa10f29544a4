"""The Model Bill of Materials: a CycloneDX 1.6 ML-BOM (JSON) per artifact version.

cyclonedx-python-lib builds the document (components, hashes, pedigree,
dependencies) and serialises it; it has no model-card support yet, so the
``modelCard`` of the model component -- task, architecture, datasets,
training parameters -- is added to its JSON output here, and the whole
document is then validated against the bundled CycloneDX 1.6 schema before
it is stored. Its SHA-256 is in the signed manifest.

The BoM carries plaintext hashes and file names, never key material; it is
stored unencrypted beside the manifest so auditors can read it without a key.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sealstore.errors import FormatError

__all__ = ["BomSpec", "build_bom", "check_spec", "load_bom_spec", "validate_bom"]

# The spec's fields are vault/bom_spec.py's model (imported only when a spec is read).
KINDS = ("model", "dataset")
MODEL_ONLY = ("task", "architecture_family", "model_architecture", "approach", "training")
APPROACHES = (
    "reinforcement-learning",
    "self-supervised",
    "semi-supervised",
    "supervised",
    "unsupervised",
)


@dataclass
class BomSpec:
    """What the user says about a version (``--bom FILE.yaml``); every field optional.

    ``kind`` is ``model`` (the default) or ``dataset``: a dataset's BoM has a
    CycloneDX ``data`` component where a model's has a
    ``machine-learning-model`` one, and no model card. ``datasets`` are store
    references (``NAME:VERSION`` or ``NAME@TAG``) in the same tenant: what a
    model was trained on, or what a dataset was derived from; ``training``
    is a flat mapping of training parameters.
    """

    kind: str = "model"
    description: str | None = None
    task: str | None = None
    architecture_family: str | None = None
    model_architecture: str | None = None
    approach: str | None = None
    datasets: list[str] = field(default_factory=list)
    training: dict[str, str] = field(default_factory=dict)
    license: str | None = None
    authors: list[str] = field(default_factory=list)


def load_bom_spec(path: str | os.PathLike[str]) -> BomSpec:
    """Read a BoM spec from YAML (or JSON), checked against ``bom_spec.BomSpecDoc``.

    Raises:
        ValueError: unreadable, or unknown or ill-typed fields (named), one line.
    """
    import yaml
    from pydantic import ValidationError

    from sealstore.docmodel import explain
    from sealstore.vault.bom_spec import BomSpecDoc

    try:
        doc = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"cannot read BoM spec {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"BoM spec {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    try:
        spec = BomSpecDoc.model_validate(doc)
    except ValidationError as exc:
        # Each refusal names its field itself ("task must be a string"): the spec is flat.
        raise ValueError(f"BoM spec {path}: {explain(exc, path=False)}") from None
    return BomSpec(**spec.model_dump())


def check_spec(spec: BomSpec, where: str = "BoM spec") -> None:
    """Refuse a spec that mixes kinds: a dataset has no task, architecture or training.

    Raises:
        ValueError: an unknown kind, or model fields on a dataset (named).
    """
    if spec.kind not in KINDS:
        raise ValueError(f"{where}: kind must be model or dataset")
    if spec.kind == "dataset":
        given = [k for k in MODEL_ONLY if getattr(spec, k)]
        if given:
            raise ValueError(f"{where}: a dataset has no {', '.join(given)} (fields of a model)")


@dataclass(frozen=True)
class DatasetRef:
    """A dataset resolved in the store: name, version and its manifest's SHA-256."""

    name: str
    version: str
    manifest_sha256: str


def build_bom(
    *,
    tenant: str,
    name: str,
    version: str,
    files: Sequence[tuple[str, int, str]],
    parent: str | None,
    datasets: Sequence[DatasetRef] = (),
    spec: BomSpec | None = None,
    store_id: str,
    signature: Mapping[str, str] | None = None,
) -> bytes:
    """The CycloneDX 1.6 ML-BOM of a version, as JSON bytes.

    Args:
        files: (path, plaintext size, plaintext sha256 hex) per file.
        parent: the version this one derives from, if any.
        signature: the version's verified OMS model signature, as
            ``OmsSignature.record()`` gives it: recorded as ``sealstore:oms:*``
            properties of the model component.

    Raises:
        FormatError: two files share a path (a bug, never user input).
    """
    from cyclonedx.model import Property
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentType, Pedigree
    from cyclonedx.output.json import JsonV1Dot6

    spec = spec or BomSpec()
    check_spec(spec)
    dataset = spec.kind == "dataset"
    model = Component(
        type=ComponentType.DATA if dataset else ComponentType.MACHINE_LEARNING_MODEL,
        name=name,
        version=version,
        bom_ref=f"{spec.kind}:{name}:{version}",
        description=spec.description,
    )
    for key, value in (("tenant", tenant), ("store", store_id), ("artifact", name)):
        model.properties.add(Property(name=f"sealstore:{key}", value=value))
    for key, value in sorted((signature or {}).items()):
        model.properties.add(Property(name=f"sealstore:oms:{key}", value=value))
    if parent:
        ancestor = Component(
            type=model.type,
            name=name,
            version=parent,
            bom_ref=f"parent:{name}:{parent}",
        )
        model.pedigree = Pedigree(ancestors=[ancestor])
    bom = Bom()
    bom.metadata.component = model
    data_components = []
    for ds in datasets:
        comp = Component(
            type=ComponentType.DATA,
            name=ds.name,
            version=ds.version,
            bom_ref=f"dataset:{ds.name}:{ds.version}",
        )
        comp.properties.add(Property(name="sealstore:ref", value=f"{ds.name}:{ds.version}"))
        comp.properties.add(Property(name="sealstore:manifest-sha256", value=ds.manifest_sha256))
        bom.components.add(comp)
        data_components.append(comp)
    bom.register_dependency(model, data_components)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the library warns about incomplete graphs
        doc = json.loads(JsonV1Dot6(bom).output_as_string())
    if files:
        # Written as JSON, not as the library's objects: its sorted sets
        # compare components in Python, seconds for a dataset of thousands of
        # files. Same fields, same order (by name) as the library writes.
        doc["metadata"]["component"]["components"] = [
            {
                "bom-ref": f"file:{path}",
                "hashes": [{"alg": "SHA-256", "content": digest}],
                "name": path,
                "properties": [{"name": "sealstore:size", "value": str(size)}],
                "type": "file",
            }
            for path, size, digest in sorted(files)
        ]
    if dataset:
        # CycloneDX's componentData: what the files of this component are.
        doc["metadata"]["component"]["data"] = [{"type": "dataset", "name": name}]
    card = _model_card(spec, [f"dataset:{d.name}:{d.version}" for d in datasets])
    if card and not dataset:
        doc["metadata"]["component"]["modelCard"] = card
    elif dataset and (spec.license or spec.authors):
        props = doc["metadata"]["component"].setdefault("properties", [])
        props += card["properties"]
        props.sort(key=lambda p: (p["name"], p["value"]))
    refs = [c["bom-ref"] for c in doc["metadata"]["component"].get("components", [])]
    if len(set(refs)) != len(refs):
        raise FormatError("generated BoM does not validate: file components are not unique")
    # No JSON-schema check here: loading the validator costs over a second per
    # push (jsonschema compiles dozens of grammars on import), and it could
    # only catch a bug in this generator -- every user-given field is checked
    # when the spec is read. The tests validate each shape this writes.
    return json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"


def _model_card(spec: BomSpec, dataset_refs: list[str]) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if spec.approach:
        params["approach"] = {"type": spec.approach}
    if spec.task:
        params["task"] = spec.task
    if spec.architecture_family:
        params["architectureFamily"] = spec.architecture_family
    if spec.model_architecture:
        params["modelArchitecture"] = spec.model_architecture
    if dataset_refs:
        params["datasets"] = [{"ref": r} for r in dataset_refs]
    card: dict[str, Any] = {}
    if params:
        card["modelParameters"] = params
    props = [{"name": f"sealstore:training:{k}", "value": v} for k, v in spec.training.items()]
    props += [{"name": "sealstore:license", "value": spec.license}] if spec.license else []
    props += [{"name": "sealstore:author", "value": a} for a in spec.authors]
    if props:
        card["properties"] = props
    return card


def validate_bom(data: bytes | str) -> str | None:
    """None if *data* is a valid CycloneDX 1.6 JSON document, else the first line of the problem."""
    from cyclonedx.schema import SchemaVersion
    from cyclonedx.validation.json import JsonStrictValidator

    text = data.decode() if isinstance(data, bytes) else data
    error = JsonStrictValidator(SchemaVersion.V1_6).validate_str(text)
    if error is None:
        return None
    return str(error).strip().splitlines()[0]


def summarize(doc: Mapping[str, Any]) -> dict[str, Any]:
    """The human-relevant facts of a BoM (for ``bom show``)."""
    comp = doc.get("metadata", {}).get("component", {})
    card = comp.get("modelCard", {})
    params = card.get("modelParameters", {})
    return {
        "kind": "dataset" if comp.get("type") == "data" else "model",
        "model": f"{comp.get('name')}:{comp.get('version')}",
        "files": [
            (c.get("name"), (c.get("hashes") or [{}])[0].get("content"))
            for c in comp.get("components", [])
        ],
        "parent": [a.get("version") for a in comp.get("pedigree", {}).get("ancestors", [])],
        "datasets": [
            f"{c.get('name')}:{c.get('version')}"
            for c in doc.get("components", [])
            if c.get("type") == "data"
        ],
        "task": params.get("task"),
        "training": {
            p["name"].removeprefix("sealstore:training:"): p["value"]
            for p in card.get("properties", [])
            if p.get("name", "").startswith("sealstore:training:")
        },
    }

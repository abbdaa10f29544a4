"""The broker config and the BoM spec as pydantic models: one-line errors, schemas, cost.

No service is needed: the configs here name files of their own (TLS files
are only checked to exist at load) and keys of a local keyring.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from sealstore.docmodel import schema_text
from sealstore.enclave.broker import config as broker_config
from sealstore.enclave.broker.config import BrokerConfig
from sealstore.errors import FormatError
from sealstore.vault import bom_spec
from sealstore.vault.bom import load_bom_spec
from tests.test_cli import fails, ok, run

ROOT = Path(__file__).resolve().parent.parent
SCHEMAS = ROOT / "docs" / "schemas"
SHA = "ab" * 32
M48 = "00" * 48
TCB = {"bootloader": 1, "tee": 0, "snp": 8, "microcode": 100}


def _doc(tmp_path: Path) -> dict[str, Any]:
    """A config that loads: token identities, an SNP rule and a TDX one."""
    for name in ("cert.pem", "key.pem"):
        (tmp_path / name).write_text("placeholder: only checked to exist at load\n")
    (tmp_path / "collateral").mkdir(exist_ok=True)
    return {
        "server": {"tls_cert": "cert.pem", "tls_key": "key.pem", "port": 9443},
        "identities": {
            "trainer": {"token_sha256": SHA},
            "ops": {
                "tokens": [{"sha256": "cd" * 32, "not_after": "2030-01-01T00:00:00Z"}],
                "roles": {"*": "admin"},
            },
        },
        "tenants": {
            "acme": {
                "keys": [f"local:{tmp_path / 'keyring'}"],
                "artifacts": {
                    "minilm": {
                        "identities": ["trainer"],
                        "evidence": ["snp"],
                        "snp": {"measurements": [M48], "min_tcb": dict(TCB)},
                    },
                    "llama": {
                        "identities": ["trainer"],
                        "evidence": ["tdx"],
                        "tdx": {
                            "mrtd": [M48],
                            "rtmrs": {0: [M48], 1: [M48]},
                            "collateral": {"dir": "collateral"},
                        },
                    },
                },
            }
        },
    }


def _load(tmp_path: Path, doc: Any) -> BrokerConfig:
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(doc))
    return BrokerConfig.load(tmp_path / "b.yaml")


def test_a_config_loads_with_its_defaults(tmp_path: Path) -> None:
    config = _load(tmp_path, _doc(tmp_path))
    assert (config.host, config.port, config.challenge_ttl) == ("127.0.0.1", 9443, 60.0)
    assert config.max_challenges == 100_000 and config.max_challenges_per_identity == 64
    assert config.tls_cert == tmp_path / "cert.pem" and config.client_ca is None
    assert config.state_url is None and config.state_prefix == "sealstore:"
    assert config.audit_log == str(tmp_path / "audit")
    assert config.audit_key == tmp_path / "audit.key"
    assert config.detectors == broker_config.Detectors()
    assert config.reload_watch and config.reload_interval == 2.0
    assert config.signing_key is None
    trainer, ops = config.identities["trainer"], config.identities["ops"]
    assert trainer.token_sha256 == bytes.fromhex(SHA) and trainer.tokens[0].not_after is None
    assert trainer.roles == {"acme": "reader"}  # least privilege: where a rule names it
    assert ops.roles == {"*": "admin"} and ops.tokens[0].not_after == 1893456000.0
    rule = config.tenants["acme"].rule("minilm")
    assert rule is not None and rule.snp is not None and rule.evidence == ("snp",)
    assert rule.snp.measurements == (M48,) and rule.snp.min_tcb.fmc is None
    assert rule.snp.max_vmpl == 0 and rule.snp.host_data == "" and rule.snp.revocation is None
    tdx = config.tenants["acme"].artifacts["llama"].tdx
    assert tdx is not None and set(tdx.rtmrs) == {0, 1} and tdx.policy.accept == {"UpToDate"}


def _set(path: str, value: Any) -> Any:
    """A change to the document: set (or with ... delete) the field at the dotted path."""

    def change(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            doc = doc[int(p)] if isinstance(doc, list) else doc[p]
        if value is ...:
            del doc[last]
        else:
            doc[last] = value

    return change


RULE = "tenants.acme.artifacts.minilm"
TDX = "tenants.acme.artifacts.llama.tdx"


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (lambda d: d.clear(), "top level: missing field 'server'"),
        (_set("server.port", "9443"), "server.port: expected an integer from 0 to 65535"),
        (_set("server.port", True), "server.port: expected an integer from 0 to 65535"),
        (_set("server.port", 70000), "server.port: expected an integer from 0 to 65535"),
        (_set("server.tls_cert", ...), "server: missing field 'tls_cert'"),
        (_set("server.tls_cert", "none.pem"), "server.tls_cert: "),
        (_set("server.require_client_cert", True), "require_client_cert: needs server.client_ca"),
        (_set("server", ["x"]), "server: expected a mapping"),
        (_set("challenge_ttl", 0), "challenge_ttl: expected seconds from 1 to 3600"),
        (_set("state", None), "state: expected a mapping"),
        (_set("state", {"url": "http://x"}), "state.url: expected memory:, redis://"),
        (_set("alerts", {"webhook": "ftp://x"}), "alerts.webhook: expected an http:// or"),
        (
            _set("detectors", {"release_rate": {"floor": 0}}),
            "detectors.release_rate.floor: expected an integer from 1 to 1000000000",
        ),
        (
            _set("detectors", {"attestation_failures": {"window": "5m"}}),
            "detectors.attestation_failures.window: expected a positive number of seconds",
        ),
        (_set("reload", {"watch": "yes"}), "reload.watch: expected true or false"),
        (
            _set("identities.trainer.token_sha256", "abc"),
            "identities.trainer.token_sha256: expected a 32-byte hex string",
        ),
        (
            _set("identities.ops.tokens", [{"sha256": "zz", "not_after": "2030-01-01T00:00Z"}]),
            "identities.ops.tokens[0].sha256: expected a 32-byte hex string",
        ),
        (_set("identities.ops.roles", {"acme": "owner"}), "identities.ops.roles: expected tenant"),
        (_set("identities.ops.roles", {"beta": "admin"}), "tenant 'beta' is not under tenants"),
        (_set("identities.trainer", {}), "identities.trainer: needs tokens, token_sha256"),
        (
            lambda d: d["identities"].update({7: {"token_sha256": SHA}}),
            "identities: a name must be a string (quote one YAML reads as a number)",
        ),
        (
            _set(f"{RULE}.tpm", {"pcrs": ["7"], "reference": {}}),
            f"{RULE}.tpm.pcrs: expected a PCR selection",
        ),
        (_set(f"{TDX}.collateral", {"pccs_url": ["x"]}), f"{TDX}.collateral.pccs_url: expected"),
        (_set("identities.trainer.tpm_ak", None), "identities.trainer.tpm_ak: expected a file"),
        (_set("tenants", {}), "tenants: expected a mapping of tenant -> policy"),
        (_set("tenants.acme.keys", ["x25519:abc"]), "tenants.acme.keys[0]: 'x25519:abc' cannot"),
        (_set(f"{RULE}.evidence", "snp"), f"{RULE}.evidence: expected a non-empty list"),
        (_set(f"{RULE}.evidence", ["tdx"]), f"{RULE}: evidence 'tdx' needs its reference"),
        (_set(f"{RULE}.snp.measurements", [M48, "00"]), f"{RULE}.snp.measurements[1]: expected"),
        (_set(f"{RULE}.snp.min_tcb.snp", 256), f"{RULE}.snp.min_tcb.snp: expected an integer"),
        (_set(f"{RULE}.snp.min_tcb.tcb", 1), f"{RULE}.snp.min_tcb: unknown field 'tcb' (known: "),
        (_set(f"{RULE}.snp.max_vmpl", 4), f"{RULE}.snp.max_vmpl: expected an integer from 0 to 3"),
        (_set(f"{RULE}.snp.allow_debug", 1), f"{RULE}.snp.allow_debug: expected true or false"),
        (_set(f"{RULE}.snp.crl_grace", 5), f"{RULE}.snp.crl_grace: needs crl_file or crl_url"),
        (_set(f"{TDX}.rtmrs", {4: [M48]}), f"{TDX}.rtmrs: expected an integer from 0 to 3"),
        (_set(f"{TDX}.rtmrs", {1: ["00"]}), f"{TDX}.rtmrs.1[0]: expected a 48-byte hex string"),
        (_set(f"{TDX}.collateral", ...), f"{TDX}.collateral: missing (dir: FOLDER"),
        (_set(f"{TDX}.collateral.min_evaluation", -1), f"{TDX}.collateral.min_evaluation: "),
        (_set(f"{TDX}.collateral.dir", "nowhere"), f"{TDX}.collateral.dir: expected an existing"),
    ],
)
def test_each_error_is_one_line_naming_the_field(tmp_path: Path, change: Any, line: str) -> None:
    doc = _doc(tmp_path)
    change(doc)
    with pytest.raises(FormatError) as err:
        _load(tmp_path, doc)
    message = str(err.value)
    assert message.startswith(f"broker config {tmp_path / 'b.yaml'}: "), message
    assert line in message, message
    assert "\n" not in message and "pydantic" not in message and "Input should" not in message


def test_a_document_that_is_no_mapping(tmp_path: Path) -> None:
    (tmp_path / "b.yaml").write_text("- server\n")
    with pytest.raises(FormatError, match=r"b\.yaml: top level: expected a mapping$"):
        BrokerConfig.load(tmp_path / "b.yaml")


def test_an_unknown_field_lists_the_known_ones(tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    doc["tenants"]["acme"]["artifacts"]["minilm"]["nvgpu"] = {}
    with pytest.raises(FormatError) as err:
        _load(tmp_path, doc)
    assert str(err.value).endswith(
        f"{RULE}: unknown field 'nvgpu' (known: evidence, identities, nvidia-gpu, snp, tdx, tpm)"
    )


def test_the_cli_prints_the_line(tmp_path: Path) -> None:
    doc = _doc(tmp_path)
    _set("server.port", "9443")(doc)
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(doc))
    line = fails(run("broker", "check", "--config", tmp_path / "b.yaml"), 3)
    assert line.endswith("server.port: expected an integer from 0 to 65535"), line


# -- the schemas ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "schema", "argv"),
    [
        ("broker-config", broker_config.json_schema, ("broker", "schema")),
        ("bom-spec", bom_spec.json_schema, ("bom", "schema")),
    ],
)
def test_the_committed_schemas_are_current(name: str, schema: Any, argv: tuple[str, ...]) -> None:
    """docs/schemas/ holds what the CLI prints; a model change without a new file fails.

    Refresh: ``sealstore broker schema -o docs/schemas/broker-config.schema.json``
    and ``sealstore bom schema -o docs/schemas/bom-spec.schema.json``.
    """
    committed = (SCHEMAS / f"{name}.schema.json").read_text()
    assert committed == schema_text(schema()), f"docs/schemas/{name}.schema.json is stale"
    assert ok(run(*argv)).stdout.decode() == committed
    jsonschema.Draft202012Validator.check_schema(json.loads(committed))


def test_the_broker_schema_agrees_with_the_loader(tmp_path: Path) -> None:
    """What loads validates against the schema; what an editor would flag is refused too."""
    validator = jsonschema.Draft202012Validator(broker_config.json_schema())
    doc = json.loads(json.dumps(_doc(tmp_path)))  # as an editor sees it: keys are strings
    tdx = doc["tenants"]["acme"]["artifacts"]["llama"]["tdx"]
    assert list(validator.iter_errors(doc)) == []
    for change in (
        _set("server.port", "9443"),
        _set("server.tls_certs", "x"),
        _set(f"{RULE}.snp.measurements", ["00"]),
        _set(f"{RULE}.snp.min_tcb", {"tee": 0}),
        _set("identities.ops.roles", {"*": "owner"}),
    ):
        bad = json.loads(json.dumps(doc))
        change(bad)
        assert list(validator.iter_errors(bad)), change
        bad["tenants"]["acme"]["artifacts"]["llama"]["tdx"] = tdx
        with pytest.raises(FormatError):
            _load(tmp_path, bad)


def test_the_bom_schema_agrees_with_the_loader(tmp_path: Path) -> None:
    validator = jsonschema.Draft202012Validator(bom_spec.json_schema())
    good = {"task": "fill-mask", "approach": "supervised", "training": {"epochs": 2, "lr": 0.1}}
    assert list(validator.iter_errors(good)) == []
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(good))
    assert load_bom_spec(tmp_path / "s.yaml").training == {"epochs": "2", "lr": "0.1"}
    for bad in ({"trainig": {}}, {"approach": "magic"}, {"kind": "table"}, {"authors": "me"}):
        assert list(validator.iter_errors(bad)), bad
        (tmp_path / "s.yaml").write_text(yaml.safe_dump(bad))
        with pytest.raises(ValueError, match=r"^BoM spec .*s\.yaml: "):
            load_bom_spec(tmp_path / "s.yaml")


# -- the BoM spec -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("trainig: {}\n", "unknown field(s) trainig (known: approach, architecture_family, "),
        ("kind: table\n", "kind must be model or dataset"),
        ("kind: 3\n", "kind must be a string"),
        ("task:\n", "task must be a string"),
        ("license: [MIT]\n", "license must be a string"),
        ("approach: magic\n", "approach must be one of reinforcement-learning, self-supervised"),
        ("datasets: [1]\n", "datasets must be a list of strings"),
        ("authors: me\n", "authors must be a list of strings"),
        ("training: {a: [1]}\n", "training must map names to plain values"),
        ("training: [1]\n", "training must map names to plain values"),
        ("- task\n", "the file must be a mapping of fields"),
        ("kind: dataset\ntask: x\ntraining: {e: 3}\n", "a dataset has no task, training"),
    ],
)
def test_bom_spec_errors(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "bom.yaml").write_text(text)
    with pytest.raises(ValueError) as err:
        load_bom_spec(tmp_path / "bom.yaml")
    assert str(err.value).startswith(f"BoM spec {tmp_path / 'bom.yaml'}: {message}"), err.value
    assert "\n" not in str(err.value) and "Input should" not in str(err.value)


def test_bom_spec_values(tmp_path: Path) -> None:
    (tmp_path / "bom.yaml").write_text(
        "kind: dataset\ndescription: d\nlicense: MIT\nauthors: [a, b]\ndatasets: ['raw:1']\n"
    )
    spec = load_bom_spec(tmp_path / "bom.yaml")
    assert (spec.kind, spec.description, spec.license) == ("dataset", "d", "MIT")
    assert spec.authors == ["a", "b"] and spec.datasets == ["raw:1"] and spec.task is None
    (tmp_path / "bom.yaml").write_text("")
    assert load_bom_spec(tmp_path / "bom.yaml").kind == "model"


def test_a_push_without_a_spec_never_imports_pydantic() -> None:
    """pydantic's import and the models' build cost a push a few tenths of a second."""
    code = (
        "import sys, sealstore.vault.push, sealstore.vault.bom, sealstore.cli.main\n"
        "print('pydantic' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert out.stdout.decode().strip() == "False", out.stderr.decode()

"""The broker's tdx rule: Intel's collateral is required, read from a folder or a PCCS."""

from __future__ import annotations

import datetime as dt
import hashlib
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from sealstore.enclave.attestation import tdx
from sealstore.enclave.attestation.tdx_pccs import CollateralDir, Pccs
from sealstore.enclave.broker.config import BrokerConfig
from sealstore.errors import AttestationError, FormatError

DATA = Path(__file__).parent / "data" / "tdx"
V5 = DATA / "quotes" / "go-tdx-guest_quote_v5_sample.dat"


def _config(tmp_path: Path, collateral: Any) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    for name in ("tls.pem", "tls.key"):
        (tmp_path / name).write_text("not read at load\n")
    shutil.copytree(DATA / "dcap-qvl-2026", tmp_path / "tdx-collateral", dirs_exist_ok=True)
    q = tdx.TdxQuote.parse(V5.read_bytes())  # the sample's own values: only report_data differs
    rule: dict[str, Any] = {"mrtd": [q.mrtd.hex()], "rtmrs": {2: [q.rtmrs[2].hex()]}}
    if collateral is not None:
        rule["collateral"] = collateral
    doc = {
        "server": {"tls_cert": "tls.pem", "tls_key": "tls.key"},
        "identities": {"cvm": {"token_sha256": hashlib.sha256(b"cvm").hexdigest()}},
        "tenants": {
            "acme": {
                "keys": ["local:/nonexistent/keyring.json"],
                "artifacts": {"llama": {"identities": ["cvm"], "evidence": ["tdx"], "tdx": rule}},
            }
        },
    }
    path = tmp_path / "broker.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _rule(path: Path) -> tdx.TdxReference:
    rule = BrokerConfig.load(path).tenants["acme"].rule("llama")
    assert rule is not None and rule.tdx is not None
    return rule.tdx


def test_collateral_folder_and_policy(tmp_path: Path) -> None:
    ref = _rule(_config(tmp_path, {"dir": "tdx-collateral", "grace_hours": 24 * 365 * 20}))
    assert isinstance(ref.collateral, CollateralDir)
    assert ref.policy.accept == frozenset({"UpToDate"})
    assert ref.policy.grace == dt.timedelta(days=365 * 20)
    # What the broker does with the rule: the quote is judged by the collateral
    # (now, long after its nextUpdate: a grace of 20 years lets it through).
    q = tdx.verify_quote(V5.read_bytes(), collateral=ref.collateral, policy=ref.policy)
    assert q.tcb is not None and q.tcb.status == "UpToDate"
    strict = _rule(_config(tmp_path, {"dir": "tdx-collateral"}))
    with pytest.raises(AttestationError) as err:  # now, without grace: long expired
        tdx.verify_quote(V5.read_bytes(), collateral=strict.collateral, policy=strict.policy)
    assert err.value.code == "tdx-collateral-stale"


def test_collateral_folder_is_read_at_load_as_signed_sources(tmp_path: Path) -> None:
    """The folder's files are config sources (signed, watched); a file changed later is
    not seen by the running config, only by a reload."""
    path = _config(tmp_path, {"dir": "tdx-collateral", "grace_hours": 24 * 365 * 20})
    config = BrokerConfig.load(path)
    folder = tmp_path / "tdx-collateral"
    for name in ("qe-identity.json", "tcb-info-90c06f000000.json", "root-ca-crl.crl"):
        assert str(folder / name) in config.sources
        assert folder / name in config.watched()
    rule = config.tenants["acme"].rule("llama")
    assert rule is not None and rule.tdx is not None
    ref = rule.tdx
    (folder / "qe-identity.json").write_bytes(b"{}")  # swapped behind its back
    (folder / "root-ca-crl.crl").unlink()
    q = tdx.verify_quote(V5.read_bytes(), collateral=ref.collateral, policy=ref.policy)
    assert q.tcb is not None
    again = _rule(path)
    with pytest.raises(AttestationError) as err:
        tdx.verify_quote(V5.read_bytes(), collateral=again.collateral, policy=again.policy)
    assert err.value.code == "tdx-collateral-unavailable"


def test_pccs_url(tmp_path: Path) -> None:
    ref = _rule(
        _config(
            tmp_path,
            {"pccs_url": "https://pccs.internal:8081", "accept": ["UpToDate", "SWHardeningNeeded"]},
        )
    )
    assert isinstance(ref.collateral, Pccs) and ref.collateral.url == "https://pccs.internal:8081"
    assert ref.policy.accept == frozenset({"UpToDate", "SWHardeningNeeded"})


@pytest.mark.parametrize(
    ("collateral", "message"),
    [
        (None, r"collateral: missing \(dir: FOLDER or pccs_url: URL"),
        ({}, "give exactly one of dir and pccs_url"),
        ({"dir": "tdx-collateral", "pccs_url": "https://x"}, "give exactly one"),
        ({"dir": "nowhere"}, "collateral.dir: expected an existing folder"),
        ({"pccs_url": "ftp://pccs"}, "collateral.pccs_url: a PCCS URL must be http"),
        ({"dir": "tdx-collateral", "accept": ["UpToDate", "Revoked"]}, "cannot be accepted"),
        ({"dir": "tdx-collateral", "accept": ["Fine"]}, "unknown TCB status 'Fine'"),
        ({"dir": "tdx-collateral", "accept": "UpToDate"}, "expected a list of TCB statuses"),
        ({"dir": "tdx-collateral", "grace_hours": -1}, "grace_hours: expected a number"),
        ({"dir": "tdx-collateral", "grace": 1}, "unknown field 'grace'"),
    ],
)
def test_collateral_config_errors(tmp_path: Path, collateral: Any, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        BrokerConfig.load(_config(tmp_path, collateral))


def test_broker_refusals_with_collateral(tmp_path: Path) -> None:
    """Stale collateral is the broker's problem (503, no lockout); a bad quote is the caller's."""
    import nacl.public

    from sealstore.enclave.broker import release
    from sealstore.enclave.broker.server import Broker, BrokerRefusal

    def attempt(b: Broker) -> BrokerRefusal:
        who = b.config.identities["cvm"]
        ch = b.challenge(who, "acme", "llama")
        public = bytes(nacl.public.PrivateKey.generate().public_key)
        req = {
            "tenant": "acme",
            "artifact": "llama",
            "nonce": ch["nonce"],
            "public_key": release.b64e(public),
            "evidence": {"kind": "tdx", "quote": release.b64e(V5.read_bytes())},
            "slot": {},
            "context": {},
        }
        with pytest.raises(BrokerRefusal) as err:
            b.release(who, req)
        return err.value

    def broker(folder: Path, collateral: dict[str, Any]) -> Broker:
        path = _config(folder, collateral)
        doc = yaml.safe_load(path.read_text())
        doc["detectors"] = {"attestation_failures": {"max": 1}}
        path.write_text(yaml.safe_dump(doc))
        return Broker(BrokerConfig.load(path))

    stale = broker(tmp_path / "stale", {"dir": "tdx-collateral"})
    for _ in range(2):  # not locked out after the first
        refused = attempt(stale)
        assert (refused.code, refused.status) == ("tdx-collateral-stale", 503)
    fresh = broker(tmp_path / "fresh", {"dir": "tdx-collateral", "grace_hours": 24 * 365 * 20})
    # Collateral passes; the sample quote's report_data does not bind this challenge.
    refused = attempt(fresh)
    assert (refused.code, refused.status) == ("tdx-report-data", 403)
    with pytest.raises(BrokerRefusal) as err:  # that one counted: max 1, locked out
        fresh.challenge(fresh.config.identities["cvm"], "acme", "llama")
    assert err.value.code == "locked-out"

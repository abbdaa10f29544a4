"""TPM 2.0 quotes: the signed TPMS_ATTEST structure (``enclave/attestation/tpm_quote.py``).

The verifier parses TPMS_ATTEST only after the AK's signature verifies, so
each input is signed here with an attestation key of our own (registered as
the verifier's AK) and verified against a nonce, the PCR selection 7,16 and
reference values. The seed is laid out as TPM2_Quote returns it (TPM 2.0
Library Part 2, TPMS_ATTEST and TPMS_QUOTE_INFO): with the right nonce and
PCR digest, so the fuzzer starts from a quote that verifies.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sealstore.enclave.attestation.tpm import PcrPolicy
from sealstore.enclave.attestation.tpm_quote import TpmQuote, verify_quote
from sealstore.errors import AttestationError

NAME = "tpm_attest"
EXPECTED = (AttestationError,)
_AK = ec.derive_private_key(0x7E5A, ec.SECP256R1())
_AK_PEM = _AK.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
)
_POLICY = PcrPolicy.parse("7,16")
_NONCE = hashlib.sha256(b"sealstore fuzz nonce").digest()
_PCRS = {7: bytes(32), 16: b"\x16" * 32}


def _sized(b: bytes) -> bytes:
    return struct.pack(">H", len(b)) + b


def seeds() -> Iterator[bytes]:
    digest = hashlib.sha256(b"".join(_PCRS[p] for p in sorted(_PCRS))).digest()
    signer = b"\x00\x0b" + hashlib.sha256(b"ak").digest()  # a TPM2B_NAME: nameAlg || digest
    for firmware in (0x2000_0000_0001_0000, 0):
        yield (
            struct.pack(">IH", 0xFF544347, 0x8018)  # magic, TPM_ST_ATTEST_QUOTE
            + _sized(signer)
            + _sized(_NONCE)  # extraData
            + struct.pack(">QIIB", 123456, 3, 0, 1)  # TPMS_CLOCK_INFO
            + struct.pack(">Q", firmware)
            + _POLICY.selection()  # TPML_PCR_SELECTION
            + _sized(digest)
        )


def one_input(data: bytes) -> None:
    signature = _AK.sign(data, ec.ECDSA(hashes.SHA256()))
    quote = TpmQuote(attest=data, signature=signature, pcrs=dict(_PCRS))
    verify_quote(quote, _AK_PEM, _NONCE, _POLICY, {7: bytes(32)})

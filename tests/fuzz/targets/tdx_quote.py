"""Intel TDX quotes v4/v5 (``enclave/attestation/tdx.py``): parse, judge, verify.

Each input is a quote. It is parsed, checked against reference values and
verified as sent (a mutated quote fails its signature); then it is re-signed
with an attestation key of our own and its QE report made to bind that key,
so the verifier goes on to parse the PCK certificate chain the quote carries
-- which a caller controls just as much, since the attestation key is in the
quote itself.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
from collections.abc import Iterator

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from sealstore.enclave.attestation.tdx import TdxQuote, TdxReference, verify_quote
from sealstore.errors import AttestationError
from tests.fuzz.harness import shared_data

NAME = "tdx_quote"
EXPECTED = (AttestationError,)
_TDX = shared_data() / "attestation" / "tdx" / "trustee"
_AT = dt.datetime(2025, 6, 1, tzinfo=dt.UTC)
_KEY = ec.derive_private_key(0x5EA1, ec.SECP256R1())
_XY = _KEY.public_key().public_bytes(
    serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
)[1:]
_REFERENCE = TdxReference(mrtd=("00" * 48,), rtmrs={0: ("00" * 48,)}, mrconfigid="00" * 48)


def seeds() -> Iterator[bytes]:
    for path in sorted(_TDX.glob("tdx_quote_*.dat")):
        yield path.read_bytes()


def _resigned(q: TdxQuote) -> bytes:
    """*q*'s bytes with our attestation key, its signature, and a QE report binding the key."""
    raw = bytearray(q.raw)
    sig = len(q.signed) + 4  # the signature data follows the signed part and its length
    raw[sig + 64 : sig + 128] = _XY
    qe = sig + 134
    raw[qe + 320 : qe + 352] = hashlib.sha256(_XY + q.qe_auth_data).digest()
    raw[qe + 352 : qe + 384] = bytes(32)
    r, s = decode_dss_signature(_KEY.sign(bytes(raw[: len(q.signed)]), ec.ECDSA(hashes.SHA256())))
    raw[sig : sig + 64] = r.to_bytes(32, "big") + s.to_bytes(32, "big")
    return bytes(raw)


def one_input(data: bytes) -> None:
    q = TdxQuote.parse(data)
    with contextlib.suppress(AttestationError):
        _REFERENCE.check(q, b"\x01" * 64)
    with contextlib.suppress(AttestationError):
        verify_quote(q, at=_AT)
    verify_quote(_resigned(q), at=_AT)

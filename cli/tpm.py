"""``sealstore tpm ...``: KEKs sealed to the TPM under PCR policies."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from sealstore.cli.commands import command, emit, group, json_mode

__all__ = ["register"]

_TCTI_HELP = "the TPM (default: $SEALSTORE_TPM_TCTI, else device:/dev/tpmrm0)"


def register(sub: Any) -> None:
    tsub = group(sub, "tpm", "keys sealed to this machine's TPM (PCR policies)")

    seal = command(
        tsub,
        "seal",
        _seal,
        help="make a KEK sealed to the TPM; prints its key URI (tpm:FILE)",
        description="Generate a fresh KEK and seal it under TPM2_PolicyPCR: it unseals only "
        "while the PCRs hold the current values, or those in --expect. Use the printed "
        "tpm:FILE URI with -k / --key like any other key.",
    )
    seal.add_argument("--pcrs", required=True, help="PCR list, e.g. 7,16 or sha256:0,2,4,7")
    seal.add_argument(
        "--expect",
        type=Path,
        metavar="FILE",
        help='JSON {"PCR": "hex value"}: seal for these values (e.g. after an update) '
        "instead of the current ones",
    )
    seal.add_argument("--tcti", help=_TCTI_HELP)
    seal.add_argument("--force", action="store_true", help="overwrite an existing KEK file")
    seal.add_argument("output", type=Path, help="the KEK file to write")

    pol = command(
        tsub,
        "policy",
        _policy,
        help="print the PolicyPCR digest for the current or expected PCR values",
    )
    pol.add_argument("--pcrs", required=True)
    pol.add_argument("--expect", type=Path, metavar="FILE")
    pol.add_argument("--tcti", help=_TCTI_HELP)

    ak = command(
        tsub,
        "ak",
        _ak,
        help="print the attestation key's public key (PEM), to register with a verifier",
    )
    ak.add_argument("--tcti", help=_TCTI_HELP)

    # Its output is JSON already: --json is accepted and changes nothing.
    pcrs = command(tsub, "pcrs", _pcrs, help="print PCR values as JSON (the --expect format)")
    pcrs.add_argument("--pcrs", required=True)
    pcrs.add_argument("--tcti", help=_TCTI_HELP)


def _expected(path: Path | None) -> dict[int, bytes] | None:
    if path is None:
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        return {int(k): bytes.fromhex(v) for k, v in doc.items()}
    except (ValueError, AttributeError, TypeError) as exc:
        raise ValueError(f'{path}: expected JSON {{"PCR": "hex value"}} ({exc})') from None


def _seal(args: argparse.Namespace) -> int:
    from sealstore.enclave.attestation.tpm import PcrPolicy
    from sealstore.enclave.attestation.tpm_kek import seal_kek

    policy = PcrPolicy.parse(args.pcrs)
    kek = seal_kek(
        args.output, policy, expect=_expected(args.expect), tcti=args.tcti, overwrite=args.force
    )
    if json_mode(args):
        emit(args, {"key_uri": kek.key_id, "file": str(args.output), "pcrs": args.pcrs})
        return 0
    print(kek.key_id)
    return 0


def _policy(args: argparse.Namespace) -> int:
    from sealstore.enclave.attestation import tpm

    policy = tpm.PcrPolicy.parse(args.pcrs)
    values = _expected(args.expect)
    if values is None:
        with tpm.connect(args.tcti) as ectx:
            values = tpm.read_pcrs(ectx, policy)
    digest = policy.digest(values).hex()
    if json_mode(args):
        emit(args, {"pcrs": args.pcrs, "policy_digest": digest})
        return 0
    print(digest)
    return 0


def _pcrs(args: argparse.Namespace) -> int:
    from sealstore.enclave.attestation import tpm

    policy = tpm.PcrPolicy.parse(args.pcrs)
    with tpm.connect(args.tcti) as ectx:
        values = tpm.read_pcrs(ectx, policy)
    print(json.dumps({str(k): v.hex() for k, v in values.items()}, indent=2))
    return 0


def _ak(args: argparse.Namespace) -> int:
    import sys

    from sealstore.enclave.attestation.tpm_quote import ak_public

    pem = ak_public(args.tcti).decode()
    if json_mode(args):
        emit(args, {"public_key_pem": pem})
        return 0
    sys.stdout.write(pem)
    return 0

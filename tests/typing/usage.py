"""Checked by mypy (scripts/typecheck.sh), never run: the facade's names are typed.

``from sealstore import ...`` resolves to the real signatures although the names are
imported lazily at run time. Each ``assert_type`` fails the check if a name lost its
type (became ``Any``, or its return type changed); each ``type: ignore[...]`` on a misuse
fails it too (warn_unused_ignores) if the misuse stopped being an error -- which is
what happens when a signature takes ``**kwargs: Any`` or the name is untyped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO, assert_type

import sealstore
from sealstore import (
    AuthenticationError,
    DataKey,
    Header,
    InferenceRefused,
    Refused,
    SealedFile,
    SealReader,
    SealstoreError,
    Store,
    Terminated,
    Unwrapper,
    Wrapper,
    create_keyring,
    generate_identity,
    inspect_file,
    load_file,
    load_identity,
    open_reader,
    open_sealed,
    safe_open,
    save_file,
    seal_file,
    unseal_file,
    verify_file,
    wrapper_for,
)
from sealstore.fileobj import SealedBufferedReader, SealedIO
from sealstore.kms.hpke import HpkeIdentity
from sealstore.kms.local import LocalKeyring
from sealstore.loaders.safetensors import SafeOpen
from sealstore.vault.manifest import Manifest
from sealstore.vault.pull import VerifyResult


def files(src: Path, dst: Path, fp: BinaryIO) -> None:
    keyring = create_keyring(src, passphrase="correct horse")
    assert_type(keyring, LocalKeyring)
    assert_type(generate_identity(src), HpkeIdentity)
    assert_type(load_identity(src), Unwrapper)
    assert_type(wrapper_for("local:"), Wrapper)
    assert_type(seal_file(src, dst, [keyring], chunk_size=1 << 20), Header)
    assert_type(unseal_file(dst, src, [keyring]), int)
    assert_type(verify_file(dst, [keyring]), Header)
    assert_type(open_sealed(dst, [keyring]), SealedFile)
    assert_type(open_reader(fp, [keyring]), SealReader)
    assert_type(inspect_file(dst), dict[str, Any])
    assert_type(sealstore.open(dst), SealedIO | SealedBufferedReader)
    assert_type(DataKey.generate(), DataKey)
    seal_file(src, dst, [keyring], chunk_sise=1 << 20)  # type: ignore[call-arg]
    unseal_file(dst, src, [keyring], threads="4")  # type: ignore[arg-type]


def tensors(src: Path, tensors: dict[str, Any]) -> None:
    save_file(tensors, src, keys=["local:"], metadata={"format": "pt"})
    assert_type(safe_open(src), SafeOpen)
    load_file(src, threads=4, prefer="cpu-decrypt")
    load_file(src, thread=4)  # type: ignore[call-arg]
    save_file(tensors, src)  # type: ignore[call-arg]


def store(root: Path, model: Path) -> None:
    s = Store.open(f"file://{root}")
    assert_type(Store.init(root), Store)
    assert_type(s.push(model, "bert:1.0", keys=["local:"], threads=4), Manifest)
    assert_type(s.pull("bert:1.0", model, force=True), Manifest)
    assert_type(s.verify("bert:1.0"), list[VerifyResult])
    assert_type(s.rotate("bert:1.0", ["local:"]), Manifest)
    assert_type(s.shred("bert:1.0"), Manifest)
    s.push(model, "bert:1.0", key=["local:"])  # type: ignore[call-arg]
    s.pull("bert:1.0", model, threads=None)  # type: ignore[arg-type]


def errors(exc: BaseException) -> None:
    # The errors users catch are all reachable from the facade, under the base class.
    if isinstance(exc, InferenceRefused):
        assert_type(exc.code, str)
        assert_type(exc.caller, str | None)
    if isinstance(exc, Terminated):
        assert_type(exc.signum, int)
    refused: type[SealstoreError] = Refused
    auth: type[SealstoreError] = AuthenticationError
    del refused, auth

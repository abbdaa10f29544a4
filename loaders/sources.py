"""Where a sealed artifact comes from: a file, an fsspec URL, or a store reference.

Every loader takes the same ``src``:

* a path (``str`` / ``os.PathLike``) or ``file://`` URL of a sealed file;
* an ``s3://BUCKET/KEY`` (or other fsspec) URL of a sealed file (on S3: read
  with many ranged GETs at once, see ``sealstore.ranged``);
* a store reference: ``sealstore+URL#NAME[:VERSION|@TAG][/FILE]`` -- e.g.
  ``sealstore+file:///srv/store#minilm:3/model.safetensors`` or
  ``sealstore+s3://models/prod#minilm@known-good`` -- or ``NAME[:VERSION|@TAG]``
  with ``store=`` given (a :class:`~sealstore.vault.Store` or its URL).

A store reference is opened through ``sealstore.vault.pull.open_file``: the
store config, manifest and tag signatures, and the object's header and
context are checked before a single chunk is decrypted, and the object's
digest -- hashed on its own thread while the first read decrypts -- before
any plaintext is returned.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sealstore.dekcache import DekCache
from sealstore.errors import AuthenticationError, NotFound
from sealstore.kms.envelope import IdentitySpec, open_sealed
from sealstore.stream import SealedFile

__all__ = ["open_source"]

PREFIX = "sealstore+"


def _pick_file(manifest: Any, suffix: str) -> str:
    paths = [f.path for f in manifest.files]
    matches = [p for p in paths if p.endswith(suffix)]
    if len(matches) == 1:
        return matches[0]
    preferred = "model" + suffix
    if preferred in matches:
        return preferred
    raise NotFound(
        f"{manifest.name}:{manifest.version} has {len(matches)} {suffix} files "
        f"({', '.join(matches[:5]) or 'none'}): name one, e.g. #{manifest.name}:"
        f"{manifest.version}/{matches[0] if matches else 'FILE'}"
    )


def split_store_ref(text: str) -> tuple[str, str | None]:
    """``NAME[:VERSION|@TAG][/FILE]`` -> (ref, file or None)."""
    ref, sep, path = text.partition("/")
    return ref, (path if sep else None)


def open_source(
    src: Any,
    *,
    store: Any = None,
    tenant: str | None = None,
    identities: Sequence[IdentitySpec] = (),
    suffix: str = ".safetensors",
    check_digest: bool = True,
    storage_options: dict[str, Any] | None = None,
    cache: DekCache | None = None,
    verify_signature: bool = False,
    public_key: Any = None,
) -> SealedFile:
    """A :class:`SealedFile` (random access, every chunk authenticated on read) for *src*.

    Args:
        suffix: in a store artifact with several files and none named, the
            one file with this suffix (or ``model`` + suffix).
        check_digest: store objects: hash the whole object against the signed
            manifest before any plaintext is returned (see
            ``sealstore.vault.pull.open_file``); the hash runs on its own thread
            beside the first read's decryption.
        cache: store objects: a ``DekCache`` the version's key is taken from or
            stored in (a dataset's shards share one key: one unwrap, not one each).
        verify_signature: store objects: check the version's OMS model
            signature with *public_key* (or ``$SEALSTORE_OMS_PUBLIC_KEY``), and
            the file's plaintext against it as it is decrypted; a read that
            does not cover the whole file then fails.

    Raises:
        NotFound, AuthenticationError, KeyUnavailable, FormatError.
    """
    text = os.fspath(src) if isinstance(src, (str, os.PathLike)) else None
    key = None
    if verify_signature:
        from sealstore.vault.oms import public_key_from

        if text is None or not (text.startswith(PREFIX) or store is not None):
            raise ValueError(
                "verify_signature checks a store version's model signature: "
                "name one (sealstore+URL#NAME... or store=)"
            )
        key = public_key_from(public_key)
    if isinstance(src, SealedFile):
        return src
    if text is not None and text.startswith(PREFIX):
        url, sep, fragment = text[len(PREFIX) :].partition("#")
        if not sep or not fragment:
            raise ValueError(f"a store reference names the artifact after '#': {text!r}")
        return _from_store(
            url, fragment, tenant, identities, suffix, check_digest, storage_options, cache, key
        )
    if store is not None and text is not None:
        return _from_store(
            store, text, tenant, identities, suffix, check_digest, storage_options, cache, key
        )
    if text is not None and text.startswith(("s3://", "s3a://")):
        return _from_s3(text, identities, storage_options)
    if text is not None and "://" in text and not text.startswith("file://"):
        import fsspec

        fp = fsspec.open(text, "rb", **(storage_options or {})).open()
        try:
            sealed = open_sealed(fp, identities)
        except BaseException:
            fp.close()
            raise
        sealed._owned = fp  # closed with it
        return sealed
    if text is not None and text.startswith("file://"):
        text = text[len("file://") :]
    if text is not None and not Path(text).exists():
        raise NotFound(f"{text} does not exist")
    return open_sealed(text if text is not None else src, identities)


def _from_s3(
    url: str, identities: Sequence[IdentitySpec], storage_options: dict[str, Any] | None
) -> SealedFile:
    """A sealed object on S3, read with many ranged GETs at once (``sealstore.ranged``).

    Through the store's S3 backend, so a plain URL gets the same endpoint,
    credentials, timeouts and retries as a store on S3.
    """
    from sealstore.vault.storage import open_storage

    bucket, _, key = url.partition("://")[2].partition("/")
    if not bucket or not key:
        raise ValueError(f"an s3:// URL names a bucket and a key: {url!r}")
    storage = open_storage(f"s3://{bucket}", **(storage_options or {}))
    src = storage.open_ranged(key)  # type: ignore[attr-defined]
    try:
        return open_sealed(src, identities)
    except BaseException:
        src.close()
        raise


def _from_store(
    store: Any,
    fragment: str,
    tenant: str | None,
    identities: Sequence[IdentitySpec],
    suffix: str,
    check_digest: bool,
    storage_options: dict[str, Any] | None,
    cache: DekCache | None = None,
    public_key: Any = None,
) -> SealedFile:
    """*public_key* (not None): check the version's OMS signature and the plaintext."""
    from sealstore.vault.pull import hash_beside, open_file, served
    from sealstore.vault.store import Store, default_tenant

    if not isinstance(store, Store):
        store = Store.open(store, **(storage_options or {}))
    ref, path = split_store_ref(fragment)
    if path is None:
        m = served(store, ref, tenant or default_tenant(), "load", granted=False)
        path = _pick_file(m, suffix)
        ref = f"{m.name}:{m.version}"  # resolved once: the file and its version match
    _m, _entry, fp, pre, dek = open_file(
        store,
        ref,
        path,
        tenant=tenant,
        identities=identities,
        check_digest=False,
        cache=cache,
    )
    try:
        # The object's digest is hashed beside the first read's decryption and
        # checked before that read returns anything.
        check = hash_beside(store, _m, _entry, fp) if check_digest else None
        with dek:
            sealed = SealedFile(fp, dek, preamble=pre, close_src=True)
    except BaseException:
        fp.close()
        raise
    if check is not None:
        sealed.check_beside(check)
    if public_key is not None:
        from sealstore.vault.oms import of_version, watch

        try:
            watch(sealed, of_version(_m, public_key), _entry.path, f"{ref}/{_entry.path}")
        except BaseException:
            sealed.close()
            raise
    # What the inference guard records findings against (loaders/inference_guard.py).
    sealed.source_store, sealed.source_manifest = store, _m
    sealed.source_path = _entry.path
    return sealed


def signature_of(sealed: SealedFile, public_key: Any) -> tuple[Any, str, str]:
    """(the verified OMS signature, the file's path, its name for errors) of a file
    :func:`open_source` opened from a store version (without *verify_signature*).

    Raises:
        ValueError: *sealed* is not a file of a store version.
        AuthenticationError: no signature, it does not verify with *public_key*,
            or it does not cover the file.
    """
    from sealstore.vault.oms import of_version

    m = getattr(sealed, "source_manifest", None)
    path = getattr(sealed, "source_path", None)
    if m is None or path is None:
        raise ValueError(
            "verify_signature checks a store version's model signature: "
            "name one (sealstore+URL#NAME... or store=)"
        )
    where = f"{m.name}:{m.version}/{path}"
    sig = of_version(m, public_key)
    if not sig.covers(path):
        raise AuthenticationError(f"{where} is not covered by the model signature")
    return sig, path, where


def verify_at_open(sealed: SealedFile, public_key: Any, *, threads: int = 1) -> None:
    """A random-access reader's signature check: one streaming pass over the whole file.

    *sealed* was opened from a store version (:func:`open_source` without
    *verify_signature*, which would refuse any read short of the whole
    file); its version's OMS signature is verified with *public_key* (a key
    ``sealstore.vault.oms.public_key_from`` loaded) and the file's plaintext
    hashed against it (``sealstore.vault.oms.verify_stream``).

    Raises:
        ValueError: *sealed* is not a file of a store version.
        AuthenticationError: no signature, it does not verify, or the plaintext differs.
    """
    from sealstore.vault.oms import verify_stream

    sig, path, where = signature_of(sealed, public_key)
    verify_stream(sealed, sig, path, where, threads=threads)

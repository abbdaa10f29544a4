"""A sealed model artifact -- one store version, or a sealed folder -- and its weights.

The loaders that take a whole Hugging Face directory (``from_pretrained``,
``load_tokenizer``, ``load_file`` without a file named) read it through an
:class:`Artifact`: its file list, small files in memory, and its
safetensors weights, one file or the shards a
``model.safetensors.index.json`` names.

* :class:`StoreArtifact` is one verified version of a store artifact; one
  unwrap of the version's key serves every file.
* :class:`SealedFolder` is a local folder as ``save_pretrained`` writes it:
  every file ``REL`` of the Hugging Face directory sealed on its own as
  ``REL.seal``, each with its own data key (so ``sealstore decrypt`` opens
  any one of them) and the encryption context ``{"artifact": <folder name at
  save>, "version": <a random id of that save>, "path": REL}``. A file is
  read only if its (authenticated) context names the path it is read as and
  the same save as the folder's ``config.json``: a file renamed, or brought
  in from another save, is refused. Unlike a store version nothing signs
  the folder's file list: a file deleted from the folder is simply absent.
"""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sealstore.dekcache import DekCache
from sealstore.errors import FormatError, NotFound, SealstoreError
from sealstore.fileobj import named
from sealstore.kms.envelope import IdentitySpec, open_sealed
from sealstore.loaders.sources import PREFIX
from sealstore.stream import SealedFile

__all__ = [
    "INDEX",
    "SUFFIX",
    "Artifact",
    "SealedFolder",
    "StoreArtifact",
    "iter_weight_shards",
    "load_partition",
    "load_weights",
    "open_artifact",
    "resolve_artifact",
    "whole_artifact",
]

INDEX = "model.safetensors.index.json"
SUFFIX = ".seal"


class Artifact:
    """The files of one sealed model directory (see the module docstring).

    Attributes:
        where: how errors name it (``NAME:VERSION``, or the folder).
        paths: the relative paths of its files, sorted.
        manifest, store: the store version (None for a folder).
    """

    where: str
    paths: list[str]
    manifest: Any = None
    store: Any = None
    # The version's verified OMS model signature, when the loader was asked to
    # check it: every file opened is hashed against it beside its decryption.
    signature: Any = None

    def open(self, path: str) -> SealedFile:
        """One file, for random access (closed by the caller).

        Raises:
            NotFound: no such file.
            AuthenticationError: a folder file sealed as another path or another save.
        """
        raise NotImplementedError

    def name(self, path: str) -> str:
        """How a loader's *src* names one file of it (for error lines)."""
        return f"{self.where}/{path}"

    def read(self, path: str) -> bytes:
        """The plaintext of one (small) file, in memory."""
        with self.open(path) as sf:
            return sf.read_range(0, sf.size)

    def json(self, path: str) -> dict[str, Any]:
        """A JSON object file.

        Raises:
            FormatError: not valid JSON, or not an object.
        """
        try:
            doc = json.loads(self.read(path))
        except ValueError:
            raise FormatError(f"{self.where}/{path} is not valid JSON") from None
        if not isinstance(doc, dict):
            raise FormatError(f"{self.where}/{path} is not a JSON object")
        return doc

    def close(self) -> None:
        """Forget the keys kept for this artifact's files."""

    def __enter__(self) -> Artifact:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StoreArtifact(Artifact):
    """One verified version of a store artifact; its DEK unwrapped once for every file."""

    def __init__(
        self,
        store: Any,
        manifest: Any,
        identities: Sequence[IdentitySpec] = (),
        *,
        signature: Any = None,
    ) -> None:
        self.store, self.manifest, self.identities = store, manifest, identities
        self.signature = signature
        self.where = f"{manifest.name}:{manifest.version}"
        self.paths = sorted(f.path for f in manifest.files)
        self._cache = DekCache(ttl=600, max_uses=1 << 20, max_entries=4)

    def read(self, path: str) -> bytes:
        if self.signature is None:
            return super().read(path)
        from sealstore.vault.oms import check_bytes

        # A small file read whole: hashed once it is in memory, before it is returned.
        with self._open(path, watch=False) as sf:
            data = sf.read_range(0, sf.size)
        return check_bytes(data, self.signature, path, self.name(path))

    def open(self, path: str) -> SealedFile:
        return self._open(path, watch=True)

    def _open(self, path: str, *, watch: bool) -> SealedFile:
        from sealstore.vault.pull import hash_beside, open_file

        m = self.manifest
        _m, entry, fp, pre, dek = open_file(
            self.store,
            self.where,
            path,
            tenant=m.tenant,
            identities=self.identities,
            cache=self._cache,
            check_digest=False,
        )
        try:
            # The object digest is hashed beside the decryption and checked
            # before the first read returns anything. The object is mapped; each
            # decrypted run's ciphertext leaves the resident set as the lanes go.
            check = hash_beside(self.store, _m, entry, fp)
            with dek:
                sealed = SealedFile(fp, dek, preamble=pre, close_src=True)
        except BaseException:
            fp.close()
            raise
        sealed.check_beside(check)
        if watch and self.signature is not None:
            from sealstore.vault.oms import watch as watch_plaintext

            try:
                watch_plaintext(sealed, self.signature, path, self.name(path))
            except BaseException:
                sealed.close()
                raise
        return sealed

    def close(self) -> None:
        self._cache.clear()


class SealedFolder(Artifact):
    """A local folder of ``REL.seal`` files (see the module docstring)."""

    def __init__(self, folder: str | os.PathLike[str], identities: Sequence[IdentitySpec] = ()):
        self.root = Path(folder)
        self.identities = identities
        self.where = str(self.root)
        found = []
        for dirpath, _dirs, files in os.walk(self.root):
            rel_dir = os.path.relpath(dirpath, self.root)
            for name in files:
                if name.endswith(SUFFIX):
                    rel = name[: -len(SUFFIX)]
                    found.append(rel if rel_dir == "." else posixpath.join(rel_dir, rel))
        if not found:
            raise NotFound(f"{self.root} holds no sealed files (*{SUFFIX})")
        self.paths = sorted(found)
        self._version: str | None = None

    def name(self, path: str) -> str:
        return str(self.root / (path + SUFFIX))

    def open(self, path: str) -> SealedFile:
        if path not in self.paths:
            raise NotFound(f"{self.where} has no {path}{SUFFIX}")
        if self._version is None and path != "config.json" and "config.json" in self.paths:
            # Every file must come from the save config.json came from.
            self.open("config.json").close()
        expect = {"path": path}
        if self._version is not None:
            expect["version"] = self._version
        fp = open(self.root / (path + SUFFIX), "rb")  # noqa: SIM115 (closed with the SealedFile)
        try:
            sealed = open_sealed(fp, self.identities, expect_context=expect)
        except BaseException:
            fp.close()
            raise
        sealed._owned = fp  # closed with it
        if self._version is None:
            version = sealed.header.context.get("version")
            if not version:
                sealed.close()
                raise FormatError(
                    f"{self.where}/{path}{SUFFIX} names no save (version) in its context"
                )
            self._version = version
        return sealed


def resolve_artifact(
    src: str | os.PathLike[str],
    store: Any,
    tenant: str | None,
    revision: str | None = None,
    *,
    caller: str = "from_pretrained",
) -> tuple[Any, Any]:
    """(Store, verified manifest) of ``sealstore+URL#REF`` or ``REF`` with *store*.

    Args:
        caller: the loader's name, for the error lines.

    Raises:
        ValueError: no store, or a reference to one file rather than an artifact.
    """
    from sealstore.vault.pull import served
    from sealstore.vault.store import Store, default_tenant

    src = os.fspath(src)
    if src.startswith(PREFIX):
        url, sep, ref = src[len(PREFIX) :].partition("#")
        if not sep or not ref:
            raise ValueError(f"a store reference names the artifact after '#': {src!r}")
        store = Store.open(url)
    elif store is None:
        raise ValueError(f"{caller} needs a store reference (sealstore+URL#NAME) or store=")
    else:
        ref = src
        if not isinstance(store, Store):
            store = Store.open(store)
    if "/" in ref:
        raise ValueError(f"{caller} takes a whole artifact (NAME[:VERSION|@TAG]), not a file")
    ref = _with_revision(ref, revision)
    return store, served(store, ref, tenant or default_tenant(), "load", granted=False)


def _with_revision(ref: str, revision: str | int | None) -> str:
    """*ref* with transformers' ``revision`` as its version (digits) or tag."""
    if revision is None or revision == "main":  # transformers' default: the latest
        return ref
    revision = str(revision)
    wanted = f":{revision}" if revision.isdigit() else f"@{revision}"
    if ":" in ref or "@" in ref:
        if not ref.endswith(wanted):
            raise ValueError(f"revision={revision!r} conflicts with the reference {ref!r}")
        return ref
    return ref + wanted


def open_artifact(
    src: str | os.PathLike[str],
    store: Any,
    tenant: str | None,
    revision: str | int | None,
    identities: Sequence[IdentitySpec],
    *,
    caller: str,
    verify_signature: bool = False,
    public_key: Any = None,
) -> Artifact:
    """A store reference's version, or a local sealed folder.

    Args:
        verify_signature: check the version's OMS model signature with
            *public_key* (or ``$SEALSTORE_OMS_PUBLIC_KEY``): its signature now,
            each file's plaintext as it is decrypted.

    Raises:
        ValueError: no store for a bare name, a reference to one file, a
            revision given for a folder; *verify_signature* for a folder or
            without a public key.
        AuthenticationError: *verify_signature* and the version has no
            signature, or it does not verify.
    """
    text = os.fspath(src)
    if store is None and not text.startswith(PREFIX) and Path(text).is_dir():
        if revision not in (None, "main"):
            raise ValueError(f"{caller}: revision= names a store version, not a folder's")
        if verify_signature:
            raise ValueError(f"{caller}: verify_signature checks a store version's signature")
        return SealedFolder(text, identities)
    key = None
    if verify_signature:
        from sealstore.vault.oms import public_key_from

        key = public_key_from(public_key)  # before the store is read
    store, m = resolve_artifact(text, store, tenant, revision, caller=caller)
    signature = None
    if verify_signature:
        from sealstore.vault.oms import of_version

        signature = of_version(m, key)
    return StoreArtifact(store, m, identities, signature=signature)


def weight_files(
    art: Artifact, weights: str | None, *, how: str = "with weights="
) -> tuple[str | None, list[str]]:
    """(index path or None, the safetensors files to load) of an artifact.

    transformers' order: ``model.safetensors``, else ``model.safetensors.index.json``,
    else the one ``*.safetensors.index.json``, else the one ``.safetensors`` file.

    Args:
        how: how the caller names one file, for the error line.

    Raises:
        NotFound: *weights* is not a file of it, or no single set of weights.
    """
    paths = art.paths
    if weights is not None:
        if weights not in paths:
            raise NotFound(f"{art.where} has no file {weights}")
        return (weights, []) if weights.endswith(".index.json") else (None, [weights])
    if "model.safetensors" in paths:
        return None, ["model.safetensors"]
    if INDEX in paths:
        return INDEX, []
    indexes = [p for p in paths if p.endswith(".safetensors.index.json")]
    singles = [p for p in paths if p.endswith(".safetensors")]
    if len(indexes) == 1:
        return indexes[0], []
    if len(singles) == 1 and not indexes:
        return None, singles
    found = ", ".join((indexes or singles)[:5]) or "none"
    raise NotFound(f"{art.where} has no single set of weights ({found}): name one {how}")


def shards(art: Artifact, index: str) -> tuple[dict[str, str], list[str]]:
    """(tensor -> shard path, shard paths in order) of a ``*.safetensors.index.json``.

    Raises:
        FormatError: no weight_map, or a shard named outside the artifact.
        NotFound: a shard the index names is not in the artifact.
    """
    where = f"{art.where}/{index}"
    weight_map = art.json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FormatError(f"{where} has no weight_map")
    paths = set(art.paths)
    base = posixpath.dirname(index)
    by_tensor: dict[str, str] = {}
    for tensor, name in weight_map.items():
        if not isinstance(tensor, str) or not isinstance(name, str):
            raise FormatError(f"{where}: weight_map maps names to file names")
        path = posixpath.normpath(posixpath.join(base, name))
        if path.startswith(("/", "../")) or path == ".." or not name.endswith(".safetensors"):
            raise FormatError(f"{where} names a shard outside the artifact: {name!r}")
        if path not in paths:
            raise NotFound(f"{art.where} lacks the shard {path} its index names")
        by_tensor[tensor] = path
    return by_tensor, list(dict.fromkeys(by_tensor.values()))


def iter_weight_shards(
    art: Artifact,
    weights: str | None = None,
    *,
    threads: int | None = None,
    device: str = "cpu",
    prefer: str = "gpu-direct",
) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(shard path, its tensors)`` for each safetensors file of the artifact's weights.

    One shard is decrypted at a time, each tensor into its own storage, so a
    caller that moves the tensors away (vLLM copies each into its parameter)
    holds one shard at most. The index is checked against what the shards
    hold as they come; the last check (no indexed tensor left out) runs
    after the last shard.

    Args:
        device, prefer: as for ``load_file``, shard by shard.

    Raises:
        FormatError: the shards do not hold what the index says (a tensor
            twice, one missing, one in another shard than indexed).
    """
    from sealstore.loaders.safetensors import load_file

    index, files = weight_files(art, weights)
    by_tensor: dict[str, str] | None = None
    if index is not None:
        by_tensor, files = shards(art, index)
    seen: set[str] = set()
    for path in files:
        with art.open(path) as sealed:
            try:
                part = load_file(sealed, device, threads=threads, prefer=prefer)
            except SealstoreError as exc:
                # A chunk's error ("chunk 43 failed authentication") names no file.
                raise named(exc, art.name(path)) from None
        for name in part:
            if name in seen:
                raise FormatError(f"{art.where}: tensor {name} is in two shards")
            if by_tensor is not None and by_tensor.get(name) != path:
                raise FormatError(
                    f"{art.where}/{path} holds {name}, which its index does not put there"
                )
        seen.update(part)
        yield path, part
    if by_tensor is not None and len(seen) != len(by_tensor):
        lost = next(k for k in by_tensor if k not in seen)
        raise FormatError(f"{art.where}: the index names {lost}, which no shard holds")


def load_weights(
    art: Artifact,
    weights: str | None = None,
    *,
    threads: int | None = None,
    device: str = "cpu",
    prefer: str = "gpu-direct",
) -> dict[str, Any]:
    """Every tensor of the artifact's weights (see :func:`iter_weight_shards`)."""
    state: dict[str, Any] = {}
    for _path, part in iter_weight_shards(
        art, weights, threads=threads, device=device, prefer=prefer
    ):
        state.update(part)
    return state


def load_partition(
    art: Artifact,
    index: str,
    plan: Any,
    *,
    threads: int | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """A tensor-parallel rank's part of a sharded model: only the shards holding its tensors.

    Args:
        plan: a ``PartitionPlan`` (``sealstore.loaders.partition``).
        threads, device: as for ``load_file``.

    Returns:
        name -> this rank's slice, shard by shard in index order.

    Raises:
        TensorNotFound: the plan names a tensor the index lacks, or a shard
            lacks a tensor its index puts there.
        ValueError: a plan slice outside its tensor.
    """
    from sealstore.loaders.partition import PartitionPlan
    from sealstore.loaders.safetensors import load_file

    by_tensor, files = shards(art, index)
    plan.check_names(by_tensor, f"{art.where}/{index}")
    wanted: dict[str, list[str]] = {}
    for name, path in by_tensor.items():
        if plan.slice_for(name) is not None:
            wanted.setdefault(path, []).append(name)
    state: dict[str, Any] = {}
    for path in files:
        if path not in wanted:
            continue  # never opened: no key use, no read, no digest
        names = set(wanted[path])
        # Only the tensors the index puts in this shard, and every one of them.
        part = PartitionPlan(
            lambda n, names=names: plan.slice_for(n) if n in names else None,
            required=wanted[path],
        )
        with art.open(path) as sealed:
            try:
                state.update(load_file(sealed, device, threads=threads, plan=part))
            except SealstoreError as exc:
                raise named(exc, art.name(path)) from None
    return state


def whole_artifact(
    src: Any,
    store: Any,
    tenant: str | None,
    identities: Sequence[IdentitySpec],
    *,
    caller: str,
    verify_signature: bool = False,
    public_key: Any = None,
) -> Artifact | None:
    """The artifact *src* names as a whole -- a store reference without ``/FILE``,
    or a local folder -- or None when it names one file (see :func:`open_artifact`
    for *verify_signature*)."""
    if not isinstance(src, (str, os.PathLike)):
        return None
    text = os.fspath(src)
    if text.startswith(PREFIX):
        fragment = text.partition("#")[2]
        whole = bool(fragment) and "/" not in fragment
    elif store is not None:
        whole = "/" not in text
    else:
        if verify_signature and Path(text).is_dir():
            raise ValueError(f"{caller}: verify_signature checks a store version's signature")
        return SealedFolder(text, identities) if Path(text).is_dir() else None
    if not whole:
        return None
    return open_artifact(
        text,
        store,
        tenant,
        None,
        identities,
        caller=caller,
        verify_signature=verify_signature,
        public_key=public_key,
    )

"""vLLM serves a sealed model: ``vllm serve REF --load-format sealstore``.

A ``vllm.general_plugins`` entry point (``register``), run by vLLM in each of
its processes, registers the ``sealstore`` load format. ``REF`` is a store
reference (``sealstore+URL#NAME[:VERSION|@TAG]``), or a local store
directory (``PATH#NAME[...]``, or ``PATH`` alone when the tenant has one
artifact). This module is the only one that imports vLLM.

vLLM reads ``config.json``, the tokenizer and the sentence-transformers
files (``modules.json``, the pooling config) from a directory, in the API
server, before any loader runs. So, in the API server, the reference is
resolved to one version, its objects are checked against the signed manifest
(no key needed, so a tampered artifact is refused in seconds, before vLLM's
heavy start-up), and its non-weight files are decrypted into a private
scratch folder (``sealstore.loaders.scratch``: memory-backed, 0700, removed
at exit). vLLM is then given that folder as the model and the version's
pinned reference as ``model_weights`` -- the field vLLM keeps for a model
whose files were brought to a local folder while its weights stay remote.
No vLLM hook resolves a model name before ``EngineArgs`` reads its config,
so two of vLLM 0.32's functions are wrapped for the ``sealstore`` load
format only: ``EngineArgs.create_engine_config`` (the redirect above) and the
``HF_HUB_OFFLINE`` snapshot lookup, which passes a sealstore reference
through instead of asking the Hugging Face cache for it.

In the worker, the loader resolves the pinned reference again (signatures
and digests checked there too) and streams the weights shard by shard
(``iter_weight_shards``: each chunk authenticated, each tensor decrypted into
its own memory) into ``model.load_weights``, then checks that every
parameter was loaded. No weight ever reaches a file.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sealstore.errors import AuthenticationError, NotFound, SealstoreError
from sealstore.loaders.artifact import (
    StoreArtifact,
    iter_weight_shards,
    resolve_artifact,
    weight_files,
)
from sealstore.loaders.scratch import ScratchFolder, is_weight, scratch_root
from sealstore.loaders.sources import PREFIX

__all__ = ["LOAD_FORMAT", "Options", "is_reference", "open_version", "prepare", "register"]

LOAD_FORMAT = "sealstore"
CALLER = "--load-format sealstore"
_SCRATCH_PREFIX = "sealstore-vllm-"
_folders: list[ScratchFolder] = []  # this process's prepared models, removed at exit
# A child of vLLM's logger: the line appears in vLLM's log format, beside its own timings.
log = logging.getLogger("vllm.model_executor.model_loader.sealstore")


@dataclasses.dataclass(frozen=True)
class Options:
    """``--model-loader-extra-config`` for the ``sealstore`` load format.

    Attributes:
        tenant: the store tenant (default ``$SEALSTORE_TENANT``, else ``default``).
        identities: identity files to unwrap the version's key with (besides
            the local keyring and the configured key providers).
        threads: chunks decrypted in parallel (default: the CPU count, at most 8).
        weights: the safetensors file or index to load (default as
            ``from_pretrained``: ``model.safetensors``, else the index).
        scratch_dir: the memory-backed directory for the decrypted configs and
            tokenizer (default ``/dev/shm``).
        verify_before_start: hash every object of the version against the
            signed manifest in the API server, before vLLM starts its engine
            (default true; the worker checks the weights' digests again as it
            loads them either way).
        verify_signature: check the version's OMS model signature with
            *public_key* before anything is decrypted, the configs and
            tokenizer against it in the API server, and each weight file's
            plaintext beside its one decryption in the worker (default false).
        public_key: the signer's EC public key (PEM file), or a PEM file of
            root certificates for a certificate-signed model (default
            ``$SEALSTORE_OMS_PUBLIC_KEY``).
    """

    tenant: str | None = None
    identities: tuple[str, ...] = ()
    threads: int | None = None
    weights: str | None = None
    scratch_dir: str | None = None
    verify_before_start: bool = True
    verify_signature: bool = False
    public_key: str | None = None

    @classmethod
    def parse(cls, extra: Any) -> Options:
        """The options from vLLM's ``model_loader_extra_config`` (a dict or None).

        Raises:
            ValueError: an unknown key or a value of the wrong type.
        """
        if extra is None:
            return cls()
        if not isinstance(extra, dict):
            raise ValueError(f"{CALLER}: --model-loader-extra-config must be a JSON object")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(extra) - known)
        if unknown:
            raise ValueError(
                f"{CALLER}: unknown --model-loader-extra-config key {unknown[0]!r} "
                f"(known: {', '.join(sorted(known))})"
            )
        for name in ("tenant", "weights", "scratch_dir", "public_key"):
            if extra.get(name) is not None and not isinstance(extra[name], str):
                raise ValueError(f"{CALLER}: {name} must be a string")
        threads = extra.get("threads")
        if threads is not None and not (
            isinstance(threads, int) and not isinstance(threads, bool) and threads > 0
        ):
            raise ValueError(f"{CALLER}: threads must be a positive integer")
        identities = extra.get("identities", ())
        if isinstance(identities, str):
            identities = (identities,)
        if not all(isinstance(i, str) for i in identities):
            raise ValueError(f"{CALLER}: identities must be a list of identity file paths")
        verify = extra.get("verify_before_start", True)
        if not isinstance(verify, bool):
            raise ValueError(f"{CALLER}: verify_before_start must be true or false")
        signed = extra.get("verify_signature", False)
        if not isinstance(signed, bool):
            raise ValueError(f"{CALLER}: verify_signature must be true or false")
        return cls(
            tenant=extra.get("tenant"),
            identities=tuple(identities),
            threads=threads,
            weights=extra.get("weights"),
            scratch_dir=extra.get("scratch_dir"),
            verify_before_start=verify,
            verify_signature=signed,
            public_key=extra.get("public_key"),
        )


def is_reference(model: Any) -> bool:
    """True for a store reference or a local store directory (``PATH[#NAME...]``)."""
    if not isinstance(model, str):
        return False
    return model.startswith(PREFIX) or Path(model.partition("#")[0]).is_dir()


def _store_ref(src: str, tenant: str | None) -> str:
    """``sealstore+URL#REF`` of a reference or a local store directory."""
    if src.startswith(PREFIX):
        return src
    path, sep, ref = src.partition("#")
    url = f"file://{os.path.abspath(path)}"
    if not sep:
        from sealstore.vault.store import Store

        names = Store.open(url).artifacts(tenant=tenant)
        if len(names) != 1:
            raise NotFound(
                f"{path} holds {len(names)} artifacts for this tenant: name one as {path}#NAME"
            )
        ref = names[0]
    return f"{PREFIX}{url}#{ref}"


def open_version(src: str, options: Options) -> StoreArtifact:
    """The version *src* names, as an artifact whose reads check the model signature
    when *options* ask for it (verified here, before any key is asked for).

    Raises:
        ValueError: *verify_signature* without a public key.
        AuthenticationError: the version has no signature, or another signer's.
        NotFound, FormatError.
    """
    key = None
    if options.verify_signature:
        from sealstore.vault.oms import public_key_from

        key = public_key_from(options.public_key)  # before the store is read
    store, m = resolve_artifact(src, None, options.tenant, caller=CALLER)
    signature = None
    if key is not None:
        from sealstore.vault.oms import of_version

        signature = of_version(m, key)
    return StoreArtifact(store, m, options.identities, signature=signature)


def prepare(src: str, options: Options) -> tuple[str, str]:
    """Check the version and decrypt its non-weight files into a private scratch folder.

    The folder lives until this process exits (or is swept by a later start
    if the process is killed).

    Args:
        src: the model as given to vLLM: a store reference or a store directory.

    Returns:
        (the scratch folder, the version's pinned reference ``sealstore+URL#NAME:V``).

    Raises:
        AuthenticationError: an object does not match the signed manifest.
        NotFound: no such artifact, or no safetensors weights in it.
        ValueError: no usable scratch directory.
        KeyUnavailable, FormatError.
    """
    from sealstore.vault.pull import verify

    root = scratch_root(options.scratch_dir, CALLER)  # before any key is asked for
    art = open_version(_store_ref(src, options.tenant), options)
    store, m = art.store, art.manifest
    where = f"{m.name}:{m.version}"
    if options.verify_before_start:
        for result in verify(store, where, tenant=m.tenant, decrypt=False):
            if result.problems:
                raise AuthenticationError(result.problems[0])
    with art:
        weight_files(art, options.weights)  # no weights: refused now, not after vLLM's start-up
        folder = ScratchFolder(root, prefix=_SCRATCH_PREFIX, caller=CALLER)
        try:
            for path in art.paths:
                # README.md is the model card: vLLM does not read it. With a model
                # signature, only what it covers (not the git metadata it leaves out).
                signed = art.signature is None or art.signature.covers(path)
                if not is_weight(path) and path != "README.md" and signed:
                    folder.write(path, art.read(path))
        except BaseException:
            folder.remove()
            raise
    _folders.append(folder)
    return str(folder.path), f"{PREFIX}{store.url}#{where}"


def _redirect(args: Any) -> None:
    """Point vLLM's *args* at the prepared folder, the pinned reference as ``model_weights``."""
    options = Options.parse(args.model_loader_extra_config)
    if args.tensor_parallel_size > 1 or args.pipeline_parallel_size > 1:
        raise ValueError(
            f"{CALLER} loads on one worker: tensor and pipeline parallelism are not supported"
        )
    if args.trust_remote_code:
        raise ValueError(
            "--trust-remote-code is refused: code shipped in a sealed artifact never runs"
        )
    src = args.model
    start = time.perf_counter()
    folder, pinned = prepare(src, options)
    took = time.perf_counter() - start
    log.info("sealstore: %s checked, configs and tokenizer in %s (%.2f s)", pinned, folder, took)
    if args.served_model_name is None:
        args.served_model_name = src  # clients name the model as it was given
    if args.tokenizer in (None, src):
        args.tokenizer = folder
    args.model, args.model_weights = folder, pinned


def _wrap_engine_args() -> None:
    from vllm.engine import arg_utils

    engine_args = arg_utils.EngineArgs
    if getattr(engine_args.create_engine_config, "_sealstore", False):
        return  # vLLM loads plugins once per process; this keeps a second call harmless
    create = engine_args.create_engine_config
    lookup = arg_utils.get_model_path

    def create_engine_config(self: Any, *args: Any, **kwargs: Any) -> Any:
        if self.load_format == LOAD_FORMAT and not self.model_weights:
            if not is_reference(self.model):
                raise SystemExit(
                    f"{CALLER}: {self.model} is not a store reference (sealstore+URL#NAME) "
                    "or a store directory"
                )
            try:
                _redirect(self)
            except (SealstoreError, ValueError) as exc:
                # One line, not a traceback: the server refuses to start.
                raise SystemExit(f"{CALLER}: refused to start: {exc}") from None
        return create(self, *args, **kwargs)

    def get_model_path(model: Any, revision: Any = None) -> Any:
        # HF_HUB_OFFLINE: vLLM looks a model id up in the Hugging Face cache
        # before it builds its config; a sealed model is resolved above instead.
        if isinstance(model, str) and model.startswith(PREFIX):
            return model
        return lookup(model, revision)

    create_engine_config._sealstore = True  # type: ignore[attr-defined]
    engine_args.create_engine_config = create_engine_config  # type: ignore[method-assign]
    arg_utils.get_model_path = get_model_path


def _check_loaded(model: Any, loaded: Any, where: str) -> None:
    """Every parameter of *model* was loaded from the sealed weights.

    Raises:
        ValueError: the model does not report what it loaded, or some
            parameter was left as initialised.
    """
    if loaded is None:
        raise ValueError(
            f"{where}: {type(model).__name__}.load_weights does not report the weights it "
            f"loaded, so {CALLER} cannot check that every one was"
        )
    missing = sorted({name for name, _ in model.named_parameters()} - set(loaded))
    if missing:
        raise ValueError(
            f"{where}: {len(missing)} parameter(s) of {type(model).__name__} are not in the "
            f"sealed weights, e.g. {missing[0]}"
        )


def _loader_class() -> type:
    from vllm.model_executor.model_loader import BaseModelLoader

    class SealstoreModelLoader(BaseModelLoader):
        """Streams a sealed artifact's safetensors weights into vLLM's model."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.options = Options.parse(load_config.model_loader_extra_config)

        def download_model(self, model_config: Any) -> None:
            """Nothing to download: the weights stream from the store as they load."""

        def load_weights(self, model: Any, model_config: Any) -> None:
            """Decrypt the pinned version's weights, shard by shard, into *model*.

            Raises:
                ValueError: the model was not prepared by this plugin, or a
                    parameter is missing from the weights.
                AuthenticationError, KeyUnavailable, NotFound, FormatError.
            """
            src = model_config.model_weights
            if not src.startswith(PREFIX):
                raise ValueError(
                    f"{CALLER}: {model_config.model} was not prepared from a sealed artifact"
                )
            opts = self.options
            # With verify_signature each shard's plaintext is hashed beside its
            # decryption and checked before its tensors are handed to vLLM.
            art = open_version(src, opts)
            m = art.manifest
            count, size, start = 0, 0, time.perf_counter()

            def weights() -> Iterator[tuple[str, Any]]:
                nonlocal count, size
                shards = iter_weight_shards(art, opts.weights, threads=opts.threads)
                for _path, part in shards:
                    # Popped as vLLM copies each into its parameter: one shard at most.
                    for name in list(part):
                        tensor = part.pop(name)
                        count, size = count + 1, size + tensor.nbytes
                        yield name, tensor

            with art:  # its DEK cache cleared after the load
                loaded = model.load_weights(weights())
            _check_loaded(model, loaded, f"{m.name}:{m.version}")
            took = time.perf_counter() - start
            what = f"{m.name}:{m.version}: {count} weights ({size / 2**20:.1f} MiB)"
            signed = "; every file matched its model signature" if art.signature else ""
            log.info("sealstore: %s decrypted and loaded in %.2f s%s", what, took, signed)

    return SealstoreModelLoader


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register ``--load-format sealstore``."""
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, register_model_loader

    _wrap_engine_args()
    if LOAD_FORMAT not in _LOAD_FORMAT_TO_MODEL_LOADER:  # idempotent, without vLLM's warning
        register_model_loader(LOAD_FORMAT)(_loader_class())

"""The peers ``sealstore bench --compare`` loads the same state dict with, where installed.

Each peer writes its own file of the same tensors into the folder of
:func:`sealstore.bench.tensors.prepare_folder` (outside the clock; a key it
needs goes into a file there, read before the clock), and loads it into CPU
tensors in the same rounds as the plaintext safetensors baseline, so each is
reported as a ratio to that baseline in the same run:

* ``cryptotensors``  -- CryptoTensors (AES-256-GCM per tensor, an Ed25519-signed
  header), its keys registered (``register_direct_key_provider``) before the clock;
* ``tensorizer_enc`` -- CoreWeave tensorizer, encrypted (``EncryptionParams.random()``);
  ``tensorizer`` -- its plaintext file;
* ``runai_streamer`` -- Run:ai Model Streamer's ``SafetensorsStreamer`` over the
  plaintext file (it has no encryption), every tensor copied out of its buffer;
* ``fastsafetensors`` -- ``fastsafetensors.fastsafe_open`` of the plaintext file
  (no encryption either), every tensor copied.

A peer that is not importable, or that fails to write or read back the same
tensors, is recorded as skipped with the reason; the run goes on.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["PEERS", "peer_loader", "prepare_peer", "versions"]

PEERS = ("cryptotensors", "tensorizer", "runai_streamer", "fastsafetensors")
_PACKAGES = {
    "cryptotensors": "cryptotensors",
    "tensorizer": "tensorizer",
    "runai_streamer": "runai-model-streamer",
    "fastsafetensors": "fastsafetensors",
}
_PLAIN = "model.safetensors"


class Skipped(Exception):
    """A peer that cannot run here; the message says why."""


def _same(state: dict[str, Any], got: dict[str, Any]) -> None:
    import torch

    if got.keys() != state.keys() or not all(torch.equal(got[k], state[k]) for k in state):
        raise Skipped("did not give back the same tensors")


def _write_cryptotensors(state: dict[str, Any], folder: Path) -> list[str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptotensors.torch import save_file as ct_save

    def b64(b: bytes) -> str:
        return base64.b64encode(b).decode()  # CryptoTensors reads standard base64

    enc = {"kty": "oct", "alg": "aes256gcm", "kid": "bench-enc", "k": b64(os.urandom(32))}
    sk = Ed25519PrivateKey.generate()
    raw = serialization.Encoding.Raw
    d = sk.private_bytes(raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    x = sk.public_key().public_bytes(raw, serialization.PublicFormat.Raw)
    sign = {"kty": "okp", "alg": "ed25519", "crv": "Ed25519", "kid": "bench-sign"}
    ct_save(
        state,
        folder / "cryptotensors.safetensors",
        config={"enc_key": enc, "sign_key": {**sign, "d": b64(d), "x": b64(x)}},
    )
    keys = folder / "ct-keys.json"
    keys.touch(0o600)
    keys.write_text(json.dumps([enc, {**sign, "x": b64(x)}]))
    return ["cryptotensors"]


def _write_tensorizer(state: dict[str, Any], folder: Path) -> list[str]:
    from tensorizer import EncryptionParams, TensorSerializer

    enc = EncryptionParams.random()
    for name, kw in (("tensorizer", {}), ("tensorizer_enc", {"encryption": enc})):
        ser = TensorSerializer(str(folder / f"{name}.tensors"), **kw)
        ser.write_state_dict(state)
        ser.close()
    key = folder / "tz.key"
    key.touch(0o600)
    key.write_bytes(enc.key)
    return ["tensorizer", "tensorizer_enc"]


def _write_nothing(state: dict[str, Any], folder: Path) -> list[str]:
    return []


def peer_loader(name: str, folder: Path) -> Callable[[], Any]:
    """The call that loads the peer's file from *folder* once (its key given here).

    Raises:
        ImportError: the peer is not installed.
        ValueError: not a peer's loader name.
    """
    if name == "cryptotensors":
        import cryptotensors
        from cryptotensors.torch import load_file as ct_load

        cryptotensors.register_direct_key_provider(
            keys=json.loads((folder / "ct-keys.json").read_text())
        )
        path = folder / "cryptotensors.safetensors"
        return lambda: ct_load(path)
    if name in ("tensorizer", "tensorizer_enc"):
        from tensorizer import DecryptionParams, TensorDeserializer

        kw: dict[str, Any] = {}
        if name == "tensorizer_enc":
            kw["encryption"] = DecryptionParams.from_key((folder / "tz.key").read_bytes())
        path = str(folder / f"{name}.tensors")

        def tensorizer() -> Any:
            with TensorDeserializer(path, device="cpu", **kw) as d:
                return dict(d.items())

        return tensorizer
    if name == "runai_streamer":
        from runai_model_streamer import SafetensorsStreamer

        plain = str(folder / _PLAIN)

        def runai() -> Any:
            with SafetensorsStreamer() as streamer:
                streamer.stream_file(plain, device="cpu")
                return {k: t.clone() for k, t in streamer.get_tensors()}

        return runai
    if name == "fastsafetensors":
        from fastsafetensors import fastsafe_open

        plain = str(folder / _PLAIN)

        def fast() -> Any:
            with fastsafe_open(plain, framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k).clone() for k in f.keys()}  # noqa: SIM118

        return fast
    raise ValueError(f"unknown loader {name!r}")


_WRITE = {
    "cryptotensors": _write_cryptotensors,
    "tensorizer": _write_tensorizer,
    "runai_streamer": _write_nothing,  # reads the plaintext safetensors file
    "fastsafetensors": _write_nothing,
}


def prepare_peer(name: str, state: dict[str, Any], folder: Path) -> tuple[list[str], str | None]:
    """Write the peer's files; check it loads *state* back once (untimed).

    Returns:
        (its loader names, None), or ([], why it is skipped).
    """
    try:
        names = _WRITE[name](state, folder) or [name]
        for loader_name in names:
            _same(state, peer_loader(loader_name, folder)())
        return names, None
    except ImportError as exc:
        return [], f"not installed ({exc.name or exc})"
    except Skipped as exc:
        return [], str(exc)
    except Exception as exc:  # a peer's own failure must not end the run
        return [], f"failed: {exc.__class__.__name__}: {' '.join(str(exc).split())[:200]}"


def versions(names: list[str]) -> dict[str, str | None]:
    """Installed versions of the peers' packages (None: not installed)."""
    from sealstore.bench.timing import versions as installed

    got = installed([_PACKAGES[n] for n in names])
    return {n: got[_PACKAGES[n]] for n in names}

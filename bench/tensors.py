"""Loading into torch tensors: sealed ``load_file`` against plaintext safetensors.

The state dict is transformer-shaped (fp16 token embeddings; per layer q/k/v/o,
MLP up/down, two layer norms), sized to *size* bytes. :func:`prepare_folder`
writes it as plaintext safetensors and sealed (to a throwaway local keyring);
the loaders (:func:`loader`) are:

* ``safetensors``      -- ``safetensors.torch.load_file`` of the plaintext with
  every tensor materialised (``clone()``: ``load_file`` alone only maps the file);
* ``sealstore``        -- ``sealstore.loaders.load_file`` of the sealed file, the
  key's release inside the clock;
* ``sealstore_opened`` -- the same, the file opened and its key released before
  the clock (key release is measured apart): every chunk decrypted and
  authenticated straight into each tensor's storage;
* ``touch``            -- no loader: allocate the same tensors and write every
  byte, the fresh-memory floor any loader that fills new memory pays;
* a peer's name (:mod:`sealstore.bench.peers`);
* ``safe_open_one_sealstore`` / ``_safetensors`` -- one mid-file tensor, lazily.

Every sample is a fresh process that loads once (:class:`FreshProcesses`), the
loaders in rotating order: on these VMs the cost of filling memory depends on
what ran before in the process (in one process the same load measured
16-445 ms), and a job that starts up loads into fresh memory. The processes
are forked from a server that has imported torch once, so a sample costs no
interpreter start. ``benchmarks/load_cpu.py`` runs exactly this.
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from sealstore.bench.timing import summary

__all__ = ["FreshProcesses", "fresh_rounds", "loader", "make_state", "nbytes", "prepare_folder"]

VOCAB = 32000
PLAIN, SEALED = "model.safetensors", "model.safetensors.seal"
KEYRING, ONE = "keyring.json", "one.txt"
_PASSPHRASE_ENV = "SEALSTORE_PASSPHRASE"  # noqa: S105 -- the variable's name, not a secret


def make_state(size: int, *, hidden: int | None = None, seed: int = 0) -> dict[str, Any]:
    """A transformer-like fp16 state dict of about *size* bytes (at least one layer).

    *hidden* defaults to 2048 (``benchmarks/load_cpu.py``'s shape) where the
    size allows two layers and the embeddings, else the largest power of two
    (at least 64) that does, with an eighth of the size in embeddings.
    """
    import torch

    if hidden is None:
        hidden = 2048
        while hidden > 64 and 48 * hidden * hidden + VOCAB * hidden * 2 > size:
            hidden //= 2  # room for the embeddings and two layers at least
    vocab = VOCAB if hidden == 2048 else min(VOCAB, max(256, size // 8 // (hidden * 2)))
    per_layer = (4 * hidden * hidden + 2 * hidden * 4 * hidden) * 2  # fp16 bytes
    layers = max(1, (size - vocab * hidden * 2) // per_layer)
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> Any:
        return torch.randn(*shape, generator=g, dtype=torch.float32).to(torch.float16)

    state = {"embed_tokens.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[p + f"self_attn.{name}.weight"] = rand(hidden, hidden)
        state[p + "mlp.up_proj.weight"] = rand(4 * hidden, hidden)
        state[p + "mlp.down_proj.weight"] = rand(hidden, 4 * hidden)
        state[p + "input_layernorm.weight"] = rand(hidden)
        state[p + "post_attention_layernorm.weight"] = rand(hidden)
    state["norm.weight"] = rand(hidden)
    return state


def nbytes(state: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def prepare_folder(
    state: dict[str, Any],
    folder: Path,
    *,
    passphrase: str,
    suite: str = "AES-256-GCM",
    chunk_size: int = 1 << 20,
    threads: int = 1,
) -> dict[str, Any]:
    """Write *state* into *folder*: plaintext, sealed (to a throwaway keyring there), one name.

    The keyring uses libsodium's minimum Argon2id cost under *passphrase*: a
    benchmark measures loading, not the unlock. The sealed load is checked
    against the plaintext once, untimed.

    Returns:
        ``bytes``, ``tensors``, ``one`` (the mid-file tensor's name), ``one_bytes``
        and ``ring``: the keyring, open in this process.
    """
    import torch
    from nacl import pwhash
    from safetensors.torch import load_file as st_load
    from safetensors.torch import save_file as st_save

    from sealstore.kms.envelope import seal_file
    from sealstore.kms.local import create_keyring
    from sealstore.loaders import load_file
    from sealstore.loaders.sources import open_source

    folder.mkdir(parents=True, exist_ok=True)
    ring = create_keyring(
        folder / KEYRING,
        passphrase=passphrase,
        opslimit=pwhash.argon2id.OPSLIMIT_MIN,
        memlimit=pwhash.argon2id.MEMLIMIT_MIN,
    )
    st_save(state, folder / PLAIN)
    seal_file(
        folder / PLAIN,
        folder / SEALED,
        [ring],
        suite=suite,
        chunk_size=chunk_size,
        threads=threads,
    )
    one = sorted(state)[len(state) // 2]
    (folder / ONE).write_text(one)
    with open_source(folder / SEALED, identities=[ring]) as sf:
        got = load_file(sf, threads=threads)
    ref = st_load(folder / PLAIN)
    if got.keys() != ref.keys() or not all(torch.equal(ref[k], got[k]) for k in ref):
        raise RuntimeError("the sealed load did not give back the plaintext tensors")
    return {
        "bytes": nbytes(state),
        "tensors": len(state),
        "one": one,
        "one_bytes": state[one].numel() * state[one].element_size(),
        "ring": ring,
    }


def loader(which: str, folder: Path, threads: int) -> Callable[[], Any]:
    """The call that loads once with *which* (see the module's list), files from *folder*.

    Keys are given before the clock: the keyring's passphrase from the
    environment, a peer's key from its file. ``sealstore_opened`` releases
    the data key here, before the call is returned.
    """
    import torch

    plain, sealed = folder / PLAIN, folder / SEALED
    if which == "safetensors":
        from safetensors.torch import load_file as st_load

        return lambda: {k: v.clone() for k, v in st_load(plain).items()}
    if which in ("sealstore", "sealstore_opened"):
        from sealstore.kms.local import LocalKeyring
        from sealstore.loaders import load_file
        from sealstore.loaders.sources import open_source

        ring = LocalKeyring.open(folder / KEYRING)
        if which == "sealstore":
            return lambda: load_file(sealed, threads=threads, identities=[ring])
        opened = open_source(sealed, identities=[ring])
        return lambda: load_file(opened, threads=threads)
    if which == "touch":
        from safetensors import safe_open

        dtypes = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
        with safe_open(plain, "pt") as f:  # shapes only, nothing read
            shapes = {k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()}  # noqa: SIM118
        return lambda: {
            k: torch.empty(shape, dtype=dtypes.get(dt, torch.uint8)).fill_(1)
            for k, (shape, dt) in shapes.items()
        }
    if which.startswith("safe_open_one_"):
        name = (folder / ONE).read_text()
        if which == "safe_open_one_sealstore":
            from sealstore.kms.local import LocalKeyring
            from sealstore.loaders import safe_open as sealed_open

            ring = LocalKeyring.open(folder / KEYRING)

            def one_sealed() -> Any:
                with sealed_open(sealed, threads=threads, identities=[ring]) as f:
                    return f.get_tensor(name)

            return one_sealed
        from safetensors.torch import safe_open as st_open

        def one_plain() -> Any:
            with st_open(plain, "pt") as f:
                return f.get_tensor(name).clone()

        return one_plain
    from sealstore.bench.peers import peer_loader

    return peer_loader(which, folder)


def time_load(
    which: str, folder: str, threads: int, passphrase: str, calls: int = 1
) -> list[float]:
    """In this (fresh) process: seconds each of *calls* loads with *which* took.

    As timeit does, no cyclic garbage collection while timing: with torch
    imported a full collection costs ~90 ms, and whether one falls inside a
    load is a lottery of what was imported before.
    """
    import torch

    os.environ[_PASSPHRASE_ENV] = passphrase  # this process only: the throwaway keyring's
    torch.set_num_threads(threads)
    run = loader(which, Path(folder), threads)
    times = []
    for _ in range(calls):
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            result = run()
            times.append(time.perf_counter() - t0)
        finally:
            gc.enable()
        del result
    return times


class FreshProcesses:
    """Runs each call in a process of its own, forked from a server that imported torch once."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "safetensors.torch", "sealstore.loaders"])
        self._pool = ProcessPoolExecutor(1, mp_context=ctx, max_tasks_per_child=1)

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> FreshProcesses:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def fresh_rounds(
    names: Sequence[str],
    repeat: int,
    folder: Path,
    threads: int,
    passphrase: str,
    nbytes: int,
    *,
    procs: FreshProcesses,
    tick: Callable[[int], None] | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """*repeat* rounds, each loader once per round in a fresh process, in rotating order.

    Returns:
        ``{name: summary}`` (median seconds, GB/s of *nbytes*, every sample).
    """
    samples: dict[str, list[float]] = {n: [] for n in names}
    order = list(names)
    for r in range(repeat):
        k = r % len(order)
        for name in order[k:] + order[:k]:
            samples[name] += procs.call(time_load, name, str(folder), threads, passphrase)
            if say is not None:
                say(f"round {r + 1}: {name:17} {samples[name][-1] * 1e3:8.1f} ms")
            if tick is not None:
                tick(nbytes)
    return {name: summary(s, nbytes) for name, s in samples.items()}

"""``sealstore bench`` in one call: every section in order, one report.

:func:`run` measures, on this machine, in one process: the raw AEAD per suite
and thread count, the sealed file's stream and random-access decryption and
sealing, loading into CPU tensors against plaintext safetensors and the memory
floor (with ``compare`` peers in the same rounds), on a CUDA device GPU-direct
against plaintext and the kernels alone, key release for the keys given, and
a real artifact's storage and decryption apart. What each figure was limited
by, where the figures tell, is in the report's ``limits``.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sealstore.bench.timing import MiB, NoiseMeter, machine_info, run_rounds
from sealstore.progress import human_bytes

__all__ = ["BenchOptions", "run"]

Bar = Callable[[str, int | None], Any]  # (label, total) -> a callable with close()


@dataclass
class BenchOptions:
    """What ``sealstore bench`` measures; every field has the command's default."""

    size: int = 64 * MiB
    suites: list[str] = field(default_factory=lambda: ["AES-256-GCM", "CHACHA20-POLY1305"])
    chunk_size: int = MiB
    threads: list[int] = field(default_factory=lambda: [1, 2])
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:N"
    repeat: int = 3
    keys: list[str] = field(default_factory=list)
    identities: list[str] = field(default_factory=list)
    artifact: str | None = None
    store: str | None = None
    tenant: str | None = None
    compare: list[str] = field(default_factory=list)
    key_calls: int = 5
    tmpdir: str | None = None
    skip: list[str] = field(default_factory=list)  # sections: aead, file, load, gpu, keys

    def check(self) -> None:
        """Raises ValueError naming the first bad option."""
        from sealstore.format import check_params

        if self.repeat < 1:
            raise ValueError("--repeat must be at least 1")
        if self.key_calls < 1:
            raise ValueError("--key-calls must be at least 1")
        for suite in self.suites:
            try:
                check_params(suite, self.chunk_size)
            except ValueError as exc:
                raise ValueError(f"--chunk-size: {exc}") from None
        if self.device not in ("auto", "cpu") and not _is_cuda(self.device):
            raise ValueError(f"--device: expected cpu, cuda or cuda:N, not {self.device!r}")


def _is_cuda(device: str) -> bool:
    if device == "cuda":
        return True
    head, _, index = device.partition(":")
    return head == "cuda" and index.isdigit()


def _have_torch() -> bool:
    """Whether torch can be imported (an extra: a fresh install may lack it)."""
    return importlib.util.find_spec("torch") is not None


def default_threads() -> list[int]:
    """1, 2, 4, 8 up to the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return [n for n in (1, 2, 4, 8) if n <= max(1, cpus or 1)]


def _nobar(label: str, total: int | None) -> Any:
    class _Quiet:
        def __call__(self, n: int) -> None:
            pass

        def close(self) -> None:
            pass

    return _Quiet()


# --------------------------------------------------------------------------- sections


def _aead_and_file(opts: BenchOptions, workdir: Path, bar: Bar, report: dict[str, Any]) -> None:
    from sealstore.bench.aead import BufferSink, SuiteBench, make_plaintext, touch
    from sealstore.format import TAG_SIZE

    size, cs = opts.size, opts.chunk_size
    count = max(1, -(-size // cs))
    pt = make_plaintext(size)
    out = bytearray(size)
    touch(out)
    sink = BufferSink(size + count * TAG_SIZE + 2 * MiB)  # the preamble is < 1 MiB
    touch(sink.buf)
    aead: dict[str, Any] = {}
    files: dict[str, Any] = {}
    noise: dict[str, Any] = {}
    want_aead, want_file = "aead" not in opts.skip, "file" not in opts.skip
    for suite in opts.suites:
        sb = SuiteBench(suite, pt, out, sink, workdir, chunk_size=cs, max_threads=max(opts.threads))
        try:
            enc = [
                e
                for e in sb.encrypt_entries(opts.threads)
                if (e[0] == "raw_encrypt" and want_aead) or (e[0] == "seal_encrypt" and want_file)
            ]
            dec = [
                e
                for e in sb.decrypt_entries(opts.threads, file_ceilings=want_file)
                if (want_aead if e[0].startswith("raw_") else want_file)
            ]
            total = (len(enc) + len(dec)) * opts.repeat * size
            progress = bar(f"bench {suite}", total)
            try:
                got: dict[str, Any] = {}
                if enc:
                    got.update(run_rounds(enc, opts.repeat, size, tick=progress))
                    noise[f"{suite} encrypt"] = got.pop("_noise")
                    sb.reseal()
                if dec:
                    got.update(run_rounds(dec, opts.repeat, size, tick=progress))
                    noise[f"{suite} decrypt"] = got.pop("_noise")
                    sb.check_output()
            finally:
                progress.close()
        finally:
            sb.close()
        aead[suite] = {k: v for k, v in got.items() if k.startswith("raw_")}
        files[suite] = {k: v for k, v in got.items() if not k.startswith("raw_")}
        files[suite]["sealed_bytes"] = sb.sealed_bytes
    if want_aead:
        report["aead"] = aead
    if want_file:
        report["file"] = files
    report["noise"].update(noise)


def _load_cpu(opts: BenchOptions, bar: Bar, report: dict[str, Any], state: dict[str, Any]) -> None:
    from sealstore.bench import peers as peer_mod
    from sealstore.bench.tensors import FreshProcesses, fresh_rounds

    folder, nbytes = state["folder"], state["bytes"]
    threads = max(opts.threads)
    names = ["safetensors", "sealstore_opened", "touch"]
    compare: dict[str, Any] = {}
    for name in opts.compare:
        loaders, why = peer_mod.prepare_peer(name, state["tensors"], folder)
        compare[name] = {"version": peer_mod.versions([name])[name], "loaders": loaders}
        if why is not None:
            compare[name]["skipped"] = why
        names += loaders
    progress = bar("bench load (cpu)", len(names) * opts.repeat * nbytes)
    try:
        with FreshProcesses() as procs, NoiseMeter() as noise:
            results = fresh_rounds(
                names,
                opts.repeat,
                folder,
                threads,
                state["passphrase"],
                nbytes,
                procs=procs,
                tick=progress,
            )
    finally:
        progress.close()
    report["noise"]["load cpu"] = noise.result
    results["sealstore"] = results.pop("sealstore_opened")
    base = results["safetensors"]["median_s"]
    for res in results.values():
        res["time_vs_safetensors"] = res["median_s"] / base
    report["load_cpu"] = {
        "bytes": nbytes,
        "tensors": state["count"],
        "threads": threads,
        "suite": state["suite"],
        "method": "a fresh process per sample (forked from a server that imported torch), "
        "loaders in rotating order; keys released before the clock",
        "results": {k: results[k] for k in ["safetensors", "sealstore", "touch", *names[3:]]},
    }
    if compare:
        report["compare"] = compare


def _gpu(
    opts: BenchOptions,
    workdir: Path,
    bar: Bar,
    report: dict[str, Any],
    state: dict[str, Any],
) -> None:
    from sealstore.bench import gpu

    device = "cuda:0" if opts.device in ("auto", "cuda") else opts.device
    section: dict[str, Any] = {"device": device, "name": gpu.device_name(device)}
    report["gpu"] = section
    kernel_bytes = min(opts.size, 1024 * MiB)
    if gpu.torch_cuda():
        from safetensors.torch import load_file as st_load

        from sealstore.loaders import load_file
        from sealstore.loaders.sources import open_source

        nbytes, folder, ring = state["bytes"], state["gpu_folder"], state["gpu_ring"]
        plain, sealed = folder / "model.safetensors", folder / "model.safetensors.seal"
        threads = max(opts.threads)

        def synced(fn: Callable[[], Any]) -> Callable[[], Any]:
            def run() -> Any:
                result = fn()
                gpu.synchronize()
                return result

            return run

        def sealed_load(prefer: str) -> Callable[[], Any]:
            def run() -> Any:
                with open_source(sealed, identities=[ring]) as sf:
                    return load_file(sf, device=device, prefer=prefer, threads=threads)

            return run

        entries = [
            ("plaintext", 1, synced(lambda: st_load(plain, device=device))),
            ("gpu_direct", 1, synced(sealed_load("gpu-direct"))),
            ("cpu_decrypt", 1, synced(sealed_load("cpu-decrypt"))),
        ]
        for _, _, fn in entries:
            fn()  # untimed: CUDA context, kernels compiled or loaded from numba's cache
        progress = bar(f"bench load ({device})", len(entries) * opts.repeat * nbytes)
        try:
            got = run_rounds(entries, opts.repeat, nbytes, tick=progress)
        finally:
            progress.close()
        report["noise"]["load gpu"] = got.pop("_noise")
        results = {name: per["1"] for name, per in got.items()}
        base = results["plaintext"]["median_s"]
        for res in results.values():
            res["time_vs_plaintext"] = res["median_s"] / base
        section.update(bytes=nbytes, suite="CHACHA20-POLY1305", results=results)
    elif gpu.simulator():
        section["simulator"] = True
        section["note"] = "numba's CUDA simulator: the kernel runs, its speed means nothing"
        kernel_bytes = 4096  # one small chunk: the simulator runs a kernel ~1e6x slower
    kernels: dict[str, Any] = {}
    memory = gpu.kernel_memory(device)
    kcs = min(MiB, kernel_bytes)
    for suite in opts.suites:
        rates = gpu.kernel_rate(kernel_bytes, opts.repeat, memory, chunk_size=kcs, suite=suite)
        kernels[suite] = {
            "gbps": statistics.median(rates),
            "samples_gbps": rates,
            "bytes": max(1, kernel_bytes // kcs) * kcs,
            "chunk_size": kcs,
        }
    section["kernel"] = kernels


def _keys(opts: BenchOptions, workdir: Path, bar: Bar, report: dict[str, Any]) -> None:
    from sealstore.bench.keys import release_latency

    keys: list[tuple[str, Any]] = [(k, k) for k in opts.keys]
    identities: list[Any] = list(opts.identities)
    if not keys:
        # No key named: a throwaway local keyring (libsodium's minimum Argon2id
        # cost, a random passphrase), so the run still shows what a local unwrap costs.
        from nacl import pwhash

        from sealstore.kms.local import create_keyring

        ring = create_keyring(
            workdir / "bench-keyring.json",
            passphrase=os.urandom(16).hex(),
            opslimit=pwhash.argon2id.OPSLIMIT_MIN,
            memlimit=pwhash.argon2id.MEMLIMIT_MIN,
        )
        keys = [("local (throwaway keyring)", ring)]
        identities.append(ring)
    progress = bar("bench keys", None)
    try:
        report["keys"] = {
            name: release_latency(key, identities=identities, calls=opts.key_calls, tick=progress)
            for name, key in keys
        }
    finally:
        progress.close()


def _artifact(opts: BenchOptions, bar: Bar, report: dict[str, Any]) -> None:
    from sealstore.bench.artifact import measure_artifact

    assert opts.artifact is not None
    progress = bar("bench artifact", None)
    try:
        report["artifact"] = measure_artifact(
            opts.artifact,
            threads=max(opts.threads),
            repeat=opts.repeat,
            store=opts.store,
            tenant=opts.tenant,
            identities=opts.identities,
            tick=progress,
        )
    finally:
        progress.close()


def _tensors(opts: BenchOptions, workdir: Path, want_gpu: bool) -> dict[str, Any]:
    """The state dict, its plaintext and sealed files (and a ChaCha twin for the GPU)."""
    from sealstore.bench.tensors import make_state, prepare_folder

    tensors = make_state(opts.size)
    suite = opts.suites[0]
    # A throwaway keyring's passphrase: the load samples run in processes of their own.
    passphrase = os.urandom(16).hex()
    info = prepare_folder(
        tensors,
        workdir / "cpu",
        passphrase=passphrase,
        suite=suite,
        chunk_size=opts.chunk_size,
        threads=max(opts.threads),
    )
    state = {
        "tensors": tensors,
        "bytes": info["bytes"],
        "count": info["tensors"],
        "folder": workdir / "cpu",
        "passphrase": passphrase,
        "suite": suite,
    }
    if want_gpu:
        # The GPU path takes ChaCha20-Poly1305 (its AES kernel is table-driven,
        # refused by default on a shared GPU), as benchmarks/gpu_load.py does.
        ginfo = prepare_folder(
            tensors,
            workdir / "gpu",
            passphrase=passphrase,
            suite="CHACHA20-POLY1305",
            chunk_size=opts.chunk_size,
            threads=max(opts.threads),
        )
        state["gpu_folder"], state["gpu_ring"] = workdir / "gpu", ginfo["ring"]
    return state


# --------------------------------------------------------------------------- limits


def _limits(report: dict[str, Any]) -> list[dict[str, str]]:
    """What limited each figure, where the figures measured together tell."""
    out: list[dict[str, str]] = []
    files, aead = report.get("file", {}), report.get("aead", {})
    top = str(max(report["parameters"]["threads"]))
    for suite, ops in files.items():
        raw = aead.get(suite, {}).get("raw_decrypt_mem", {})
        for op in ("random_access_decrypt", "stream_decrypt"):
            for n, res in ops.get(op, {}).items():
                if n != top or n not in raw:
                    continue
                ratio = res["gbps"] / raw[n]["gbps"]
                if ratio >= 0.85:
                    why = f"the AEAD itself (CPU): {ratio:.2f}x the raw decrypt loop"
                else:
                    why = f"sealstore's own work: {ratio:.2f}x the raw decrypt loop"
                out.append({"figure": f"{op} {suite} {n}t", "limited_by": why})
    load = report.get("load_cpu")
    if load and "results" in load:
        r = load["results"]
        sealed, floor = r["sealstore"]["median_s"], r["touch"]["median_s"]
        raw = aead.get(load["suite"], {}).get("raw_decrypt_mem", {}).get(str(load["threads"]))
        share = floor / sealed
        cipher = load["bytes"] / raw["gbps"] / 1e9 / sealed if raw is not None else None
        if share > 1.1:
            why = (
                f"no verdict: filling fresh memory (touch, torch's {load['threads']} threads) took "
                f"{floor * 1e3:.0f} ms, longer than the load ({sealed * 1e3:.0f} ms): other "
                "processes slowed torch's threads (see noise)"
            )
        elif share >= 0.8:
            why = (
                f"memory bandwidth: filling fresh memory (touch) takes {floor * 1e3:.0f} ms, "
                f"the load {sealed * 1e3:.0f} ms"
            )
        elif cipher is not None and cipher >= 0.8:
            why = f"the cipher (CPU): decryption alone is {cipher:.0%} of the load"
        else:
            parts = [f"filling fresh memory (touch) is {share:.0%} of the load"]
            if cipher is not None:
                parts.append(f"decryption alone {cipher:.0%}")
            why = "neither alone: " + ", ".join(parts) + " (they overlap across threads)"
        out.append({"figure": "load_cpu sealstore", "limited_by": why})
        keys = report.get("keys", {})
        for name, k in keys.items():
            ms = k["uncached"]["p50_ms"]
            pct = ms / 1e3 / sealed
            who = "the key service" if pct >= 0.5 else "the load, not the key"
            out.append(
                {
                    "figure": f"key release {name}",
                    "limited_by": f"{who}: one uncached release is {ms:.1f} ms, "
                    f"{pct:.0%} of this load's time",
                }
            )
    art = report.get("artifact")
    if art:
        res = art["results"]
        out.append(
            {
                "figure": "artifact end_to_end",
                "limited_by": f"{art['limited_by']}: storage {res['storage']['gbps']:.2f} GB/s, "
                f"decryption {res['decrypt']['gbps']:.2f} GB/s",
            }
        )
    gpu = report.get("gpu", {})
    if "results" in gpu and "kernel" in gpu:
        direct = gpu["results"]["gpu_direct"]["gbps"]
        kernel = gpu["kernel"].get("CHACHA20-POLY1305", {}).get("gbps")
        if kernel:
            where = "the kernel" if kernel < 2 * direct else "reads and host-to-device copies"
            out.append(
                {
                    "figure": "gpu_direct",
                    "limited_by": f"{where}: the kernel alone {kernel:.1f} GB/s, "
                    f"the load {direct:.2f} GB/s",
                }
            )
    return out


# --------------------------------------------------------------------------- run


def run(
    opts: BenchOptions,
    *,
    bar: Bar | None = None,
    say: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every section *opts* asks for; return the report (see docs/PERFORMANCE.md).

    Args:
        opts: what to measure.
        bar: makes a progress bar for a stage: ``bar(label, total)`` returns a
            callable given each step's count, with ``close()``.
        say: told a line as each stage starts.

    Raises:
        ValueError: a bad option.
        DeviceUnavailable: a CUDA device was asked for and there is none.
        KeyUnavailable, KeyReleaseDenied, BackendError: a key given could not be released.
        NotFound, AuthenticationError, FormatError: the artifact given.
    """
    from sealstore.bench import gpu
    from sealstore.errors import DeviceUnavailable

    opts.check()
    bar = bar or _nobar
    say = say or (lambda text: None)
    t_start = time.perf_counter()
    want_gpu = "gpu" not in opts.skip and opts.device != "cpu"
    if want_gpu and opts.device != "auto" and not (gpu.torch_cuda() or gpu.simulator()):
        raise DeviceUnavailable(f"--device {opts.device}: torch sees no CUDA device here")
    want_gpu = want_gpu and (gpu.torch_cuda() or (opts.device != "auto" and gpu.simulator()))
    if want_gpu and gpu.torch_cuda() and ":" in opts.device:
        import torch

        index, count = int(opts.device.partition(":")[2]), torch.cuda.device_count()
        if index >= count:
            raise DeviceUnavailable(f"--device {opts.device}: torch sees {count} CUDA device(s)")
    machine = machine_info()
    machine["gpu"] = gpu.device_name("cuda:0" if opts.device in ("auto", "cpu") else opts.device)
    params = asdict(opts)
    params["keys"] = list(opts.keys)  # URIs only: never key material
    report: dict[str, Any] = {
        "benchmark": "sealstore bench",
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine,
        "parameters": params,
        "units": {
            "gbps": "1e9 bytes of plaintext per second (storage: of sealed bytes)",
            "median_s": "median seconds of the timed calls",
            "ms": "milliseconds",
        },
        "noise": {},
    }
    workdir = Path(tempfile.mkdtemp(prefix="sealstore-bench-", dir=opts.tmpdir))
    try:
        if "aead" not in opts.skip or "file" not in opts.skip:
            say(f"AEAD and sealed file: {human_bytes(opts.size)}, {', '.join(opts.suites)}")
            _aead_and_file(opts, workdir, bar, report)
        want_load = "load" not in opts.skip
        if want_load and not _have_torch():
            report["load_cpu"] = {"skipped": "torch is not installed (the torch extra)"}
            want_load = False
        state: dict[str, Any] = {}
        if want_load or (want_gpu and gpu.torch_cuda()):
            state = _tensors(opts, workdir, want_gpu and gpu.torch_cuda())
            if want_load:
                say(f"loading into CPU tensors: a {human_bytes(state['bytes'])} state dict")
                _load_cpu(opts, bar, report, state)
        if want_gpu:
            say("loading onto the GPU and the decrypt kernels")
            _gpu(opts, workdir, bar, report, state)
        if not want_gpu and "gpu" not in opts.skip:
            why = "--device cpu" if opts.device == "cpu" else "torch sees no CUDA device"
            report["gpu"] = {"skipped": why}
        if "keys" not in opts.skip:
            say("key release: " + (", ".join(opts.keys) or "a throwaway local keyring"))
            _keys(opts, workdir, bar, report)
        if opts.artifact:
            say(f"artifact: {opts.artifact}")
            _artifact(opts, bar, report)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    report["limits"] = _limits(report)
    report["wall_s"] = time.perf_counter() - t_start
    return report


def skipped_sections(names: Sequence[str]) -> list[str]:
    """Validate ``--skip`` names."""
    known = ("aead", "file", "load", "gpu", "keys")
    bad = [n for n in names if n not in known]
    if bad:
        raise ValueError(f"--skip: unknown section {bad[0]!r}; choose from {', '.join(known)}")
    return list(names)

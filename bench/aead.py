"""The AEAD ceiling and the sealed-file operations, on one plaintext in memory.

Written by hand because no benchmark library times *these* loops: the raw
loops call ``cryptography``'s ``encrypt_into``/``decrypt_into`` over exactly the
chunks, nonces and AAD of a real sealed file, so "sealstore vs raw AEAD" compares
like with like. :class:`SuiteBench` prepares one suite's sealed file and hands
out the timed operations as ``(name, threads, fn)`` entries for
:func:`sealstore.bench.timing.run_rounds`; ``sealstore bench`` and
``benchmarks/format_throughput.py`` both time these.

* ``raw_encrypt`` / ``raw_decrypt`` -- ``encrypt_into`` / ``decrypt_into`` of every
  chunk, memory to memory (the ceiling); ``raw_decrypt_file`` reads each chunk
  with ``preadv`` first (the ceiling for a reader of a file), ``raw_decrypt_mmap``
  decrypts from a mapping.
* ``seal_encrypt`` -- ``SealWriter`` into a preallocated in-memory sink.
* ``stream_decrypt`` -- ``SealReader(...).iter_chunks()`` from the file.
* ``random_access_decrypt`` -- ``SealedFile(path).decrypt_into(out)``.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, ChaCha20Poly1305

from sealstore.bench.timing import Entry, MiB
from sealstore.format import TAG_SIZE, open_payload_key
from sealstore.keys import DataKey
from sealstore.stream import SealedFile, SealReader, SealWriter, chunk_nonce

__all__ = [
    "BufferSink",
    "Chunks",
    "SuiteBench",
    "clear",
    "make_plaintext",
    "raw_decrypt_file",
    "raw_decrypt_mem",
    "raw_decrypt_mmap",
    "raw_encrypt",
    "run_split",
    "touch",
    "warm_file",
]


class BufferSink:
    """A write-only binary file over a preallocated bytearray: no syscalls, no growth."""

    def __init__(self, capacity: int) -> None:
        self.buf = bytearray(capacity)
        self.view = memoryview(self.buf)
        self.pos = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        if self.pos + n > len(self.view):
            raise ValueError("BufferSink is full")
        self.view[self.pos : self.pos + n] = data
        self.pos += n
        return n

    def reset(self) -> None:
        self.pos = 0


def touch(buf: bytearray) -> None:
    """Write one byte per page so page faults are paid before timing."""
    np.frombuffer(buf, dtype=np.uint8)[::4096] = 0


def clear(buf: bytearray) -> None:
    """Zero *buf* in place, so the next check proves the decrypt that follows wrote it."""
    np.frombuffer(buf, dtype=np.uint8).fill(0)


def make_plaintext(size: int, seed: int = 0) -> bytearray:
    """*size* random bytes (numpy's ``default_rng(seed)``, made in 64 MiB pieces)."""
    rng = np.random.default_rng(seed)
    buf = bytearray(size)
    view = memoryview(buf)
    step = 64 * MiB
    for off in range(0, size, step):
        n = min(step, size - off)
        view[off : off + n] = rng.bytes(n)
    return buf


def warm_file(path: Path) -> None:
    """Read the file once so the timed reads come from the page cache."""
    scratch = bytearray(8 * MiB)
    with open(path, "rb", buffering=0) as fp:
        while fp.readinto(scratch):
            pass


def run_split(work: Callable[[int], None], threads: int) -> None:
    """Run work(0..threads-1), one task per thread; inline when threads == 1.

    A pool per call, as ``SealedFile.decrypt_into`` makes one per call.
    """
    if threads == 1:
        work(0)
        return
    with ThreadPoolExecutor(threads, "bench-raw") as pool:
        list(pool.map(work, range(threads)))


class Chunks:
    """Nonces, ciphertext and plaintext offsets of every chunk of one sealed file."""

    def __init__(self, sealed: SealedFile, dek: DataKey) -> None:
        header = sealed.header
        layout = sealed.layout
        key = open_payload_key(header, dek)
        self.aead = AESGCM(key) if header.suite == "AES-256-GCM" else ChaCha20Poly1305(key)
        self.aad = sealed.preamble.aad
        self.count = layout.count
        cs = layout.chunk_size
        self.jobs = []
        for i in range(layout.count):
            n = layout.plain_len(i)
            nonce = chunk_nonce(header.nonce_prefix, i, i == layout.count - 1)
            self.jobs.append((nonce, layout.offset(i), n + TAG_SIZE, i * cs, n))


def raw_encrypt(ch: Chunks, pt: memoryview, dst: memoryview, threads: int) -> None:
    def work(k: int) -> None:
        enc, aad = ch.aead.encrypt_into, ch.aad
        for nonce, coff, clen, poff, plen in ch.jobs[k::threads]:
            enc(nonce, pt[poff : poff + plen], aad, dst[coff : coff + clen])

    run_split(work, threads)


def raw_decrypt_mem(ch: Chunks, src: memoryview, out: memoryview, threads: int) -> None:
    def work(k: int) -> None:
        dec, aad = ch.aead.decrypt_into, ch.aad
        for nonce, coff, clen, poff, plen in ch.jobs[k::threads]:
            dec(nonce, src[coff : coff + clen], aad, out[poff : poff + plen])

    run_split(work, threads)


def raw_decrypt_file(
    ch: Chunks, fd: int, scratch: list[bytearray], out: memoryview, threads: int
) -> None:
    def work(k: int) -> None:
        dec, aad = ch.aead.decrypt_into, ch.aad
        sv = memoryview(scratch[k])
        for nonce, coff, clen, poff, plen in ch.jobs[k::threads]:
            buf = sv[:clen]
            got = 0
            while got < clen:
                r = os.preadv(fd, [buf[got:]], coff + got)
                if r == 0:
                    raise EOFError("sealed file is shorter than its layout")
                got += r
            dec(nonce, buf, aad, out[poff : poff + plen])

    run_split(work, threads)


def raw_decrypt_mmap(ch: Chunks, path: Path, out: memoryview, threads: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        mapping = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
    finally:
        os.close(fd)
    src = memoryview(mapping)

    def work(k: int) -> None:
        dec, aad = ch.aead.decrypt_into, ch.aad
        for nonce, coff, clen, poff, plen in ch.jobs[k::threads]:
            dec(nonce, src[coff : coff + clen], aad, out[poff : poff + plen])

    try:
        run_split(work, threads)
    finally:
        src.release()
        mapping.close()


class SuiteBench:
    """One suite's sealed file of *pt* and the timed operations over it.

    The plaintext *pt*, the decrypt output *out* (pre-faulted, of the plaintext
    size) and the encrypt *sink* are the caller's, shared by every suite. The
    file goes to *workdir* and its page cache is warmed; the library's and the
    raw loop's decryptions are checked against *pt* once, untimed.
    """

    def __init__(
        self,
        suite: str,
        pt: bytearray,
        out: bytearray,
        sink: BufferSink,
        workdir: Path,
        *,
        chunk_size: int,
        max_threads: int,
    ) -> None:
        self.suite, self.size, self.chunk_size = suite, len(pt), chunk_size
        self.pt, self.out, self.sink = pt, out, sink
        self.ptv, self.outv = memoryview(pt), memoryview(out)
        self.dek = DataKey.generate()
        self.seal(1)  # untimed: the file every decrypt reads, and the raw loops' layout
        self.sealed_bytes = sink.pos
        self.ctv = sink.view[: sink.pos]
        self.path = workdir / f"sealed-{suite}.seal"
        with open(self.path, "wb") as fp:
            fp.write(self.ctv)
        with SealedFile(self.path, self.dek) as sf:
            self.chunks = Chunks(sf, self.dek)
        warm_file(self.path)
        self._check()
        self.scratch = [bytearray(chunk_size + TAG_SIZE) for _ in range(max_threads)]
        self.fd = os.open(self.path, os.O_RDONLY)

    def _check(self) -> None:
        clear(self.out)
        with SealedFile(self.path, self.dek) as sf:
            sf.decrypt_into(self.out)
        if self.out != self.pt:
            raise RuntimeError("SealedFile.decrypt_into did not return the plaintext")
        clear(self.out)
        raw_decrypt_mem(self.chunks, self.ctv, self.outv, 1)
        if self.out != self.pt:
            raise RuntimeError("the raw decrypt loop did not return the plaintext")
        clear(self.out)

    def check_output(self) -> None:
        """After timed decryptions into *out*: it must hold the plaintext."""
        if self.out != self.pt:
            raise RuntimeError("a timed decrypt did not return the plaintext")

    # ---- the operations
    def seal(self, n: int) -> None:
        self.sink.reset()
        with SealWriter(
            self.sink,
            self.dek,
            suite=self.suite,
            chunk_size=self.chunk_size,
            plaintext_size=self.size,
            threads=n,
        ) as w:
            w.write(self.ptv)

    def stream(self, n: int) -> None:
        total = 0
        with open(self.path, "rb") as fp, SealReader(fp, self.dek, threads=n) as reader:
            for view in reader.iter_chunks():
                total += len(view)
        if total != self.size:
            raise RuntimeError(f"SealReader returned {total} of {self.size} bytes")

    def random_access(self, n: int) -> None:
        with SealedFile(self.path, self.dek) as sf:
            sf.decrypt_into(self.out, threads=n)

    # ---- the entries (after the seal above, the sink holds this suite's file)
    def encrypt_entries(self, threads: list[int], *, raw: bool = True) -> list[Entry]:
        """``raw_encrypt`` (into the sink's buffer, in place) and ``seal_encrypt``."""
        ch, ptv, view = self.chunks, self.ptv, self.sink.view
        entries: list[Entry] = []
        if raw:
            entries += [
                ("raw_encrypt", n, lambda n=n: raw_encrypt(ch, ptv, view, n)) for n in threads
            ]
        entries += [("seal_encrypt", n, lambda n=n: self.seal(n)) for n in threads]
        return entries

    def decrypt_entries(self, threads: list[int], *, file_ceilings: bool = True) -> list[Entry]:
        """The library's two decryptions and the raw ceilings at every thread count.

        The raw memory-to-memory loop reads the sink, so no encryption may run
        between these entries' rounds (call after the encrypt rounds, then
        :meth:`reseal`).
        """
        ch, ctv, outv = self.chunks, self.ctv, self.outv
        entries: list[Entry] = []
        for n in threads:
            entries += [
                ("stream_decrypt", n, lambda n=n: self.stream(n)),
                ("random_access_decrypt", n, lambda n=n: self.random_access(n)),
                ("raw_decrypt_mem", n, lambda n=n: raw_decrypt_mem(ch, ctv, outv, n)),
            ]
            if file_ceilings:
                entries += [
                    (
                        "raw_decrypt_file",
                        n,
                        lambda n=n: raw_decrypt_file(ch, self.fd, self.scratch, outv, n),
                    ),
                    ("raw_decrypt_mmap", n, lambda n=n: raw_decrypt_mmap(ch, self.path, outv, n)),
                ]
        return entries

    def reseal(self) -> None:
        """Put this suite's file back in the sink (after the encrypt rounds rewrote it)."""
        self.sink.reset()
        self.sink.write(Path(self.path).read_bytes())
        self.ctv = self.sink.view[: self.sink.pos]

    def close(self) -> None:
        os.close(self.fd)
        self.path.unlink(missing_ok=True)
        self.dek.close()

#!/usr/bin/env python3
"""pyarrow read_table of a sealed Parquet dataset vs plaintext and Parquet Modular Encryption.

One table (8 numeric columns, ``--size`` bytes in memory, snappy, row groups
of 1M rows) written three ways into a temp dir as ``--files`` shards:

* ``plain``  -- plaintext Parquet, read by path (pyarrow's own I/O, page cache warm);
* ``sealed`` -- the same files sealed (1 MiB chunks, ``local:`` key), read through
  ``sealstore.open(path, buffering=0)`` (every byte authenticated);
* ``pme``    -- Parquet Modular Encryption (pyarrow's own: AES-GCM-V1, 256-bit data
  keys, footer and every column encrypted), with an in-memory KMS client, read by
  path with its decryption properties.

Each is read whole and with one column of eight (projection). ``--repeat``
rounds in rotating order, medians reported, in one process after a warm-up
read of everything (files in the page cache, keys unwrapped once per file
open as a real reader would). Writes a table and ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import base64
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.format_throughput import parse_size, write_report

MIB = 1 << 20
COLUMNS = 8
ROW_GROUP = 1 << 20


def make_table(nbytes: int, seed: int) -> Any:
    import numpy as np
    import pyarrow as pa

    rows = nbytes // (8 * COLUMNS)
    rng = np.random.default_rng(seed)
    cols: dict[str, Any] = {}
    for i in range(COLUMNS):
        if i % 2:
            cols[f"f{i}"] = rng.standard_normal(rows)  # incompressible
        else:
            cols[f"i{i}"] = rng.integers(0, 1 << (8 * (i // 2 + 2)), rows)  # some compress
    return pa.table(cols)


class InMemoryKms:
    """A PME KMS client holding its master keys in memory (pyarrow's own test pattern)."""

    def __new__(cls, config: Any) -> Any:
        import pyarrow.parquet.encryption as pe

        class Client(pe.KmsClient):
            def __init__(self, config: Any) -> None:
                pe.KmsClient.__init__(self)
                self.keys = config.custom_kms_conf

            def wrap_key(self, key_bytes: bytes, master_key_identifier: str) -> bytes:
                master = self.keys[master_key_identifier].encode()
                return base64.b64encode(master + key_bytes)

            def unwrap_key(self, wrapped_key: bytes, master_key_identifier: str) -> bytes:
                raw = base64.b64decode(wrapped_key)
                if raw[:16] != self.keys[master_key_identifier].encode():
                    raise ValueError("wrong master key")
                return raw[16:]

        return Client(config)


def pme_properties(columns: list[str]) -> tuple[Any, Any]:
    import pyarrow.parquet.encryption as pe

    conn = pe.KmsConnectionConfig(
        custom_kms_conf={"footer": "0123456789012345", "cols": "5432109876543210"}
    )
    factory = pe.CryptoFactory(InMemoryKms)
    enc = factory.file_encryption_properties(
        conn,
        pe.EncryptionConfiguration(
            footer_key="footer",
            column_keys={"cols": columns},
            encryption_algorithm="AES_GCM_V1",
            data_key_length_bits=256,
        ),
    )
    dec = factory.file_decryption_properties(conn, pe.DecryptionConfiguration())
    return enc, dec


def build(root: Path, size: int, files: int) -> tuple[list[Path], list[Path], list[Path], Any]:
    import pyarrow.parquet as pq

    import sealstore
    from tests.conftest import make_keyring

    home = root / "home"
    home.mkdir()
    os.environ["SEALSTORE_HOME"] = str(home)
    os.environ.setdefault("SEALSTORE_PASSPHRASE", "benchmark")
    make_keyring(home / "keyring.json")
    plain, sealed, pme = [], [], []
    dec = None
    for k in range(files):
        t = make_table(size // files, k)
        enc, dec = pme_properties(t.column_names)
        p = root / f"part-{k}.parquet"
        pq.write_table(t, p, row_group_size=ROW_GROUP)
        pq.write_table(
            t, root / f"pme-{k}.parquet", row_group_size=ROW_GROUP, encryption_properties=enc
        )
        sealstore.seal_file(p, root / f"part-{k}.parquet.seal", ["local:"], threads=2)
        plain.append(p)
        sealed.append(root / f"part-{k}.parquet.seal")
        pme.append(root / f"pme-{k}.parquet")
        del t
    return plain, sealed, pme, dec


def read(kind: str, paths: list[Path], columns: list[str] | None, dec: Any, threads: int) -> int:
    """Read every shard (all columns or *columns*); returns the bytes of the tables read."""
    import pyarrow.parquet as pq

    import sealstore

    total = 0
    for p in paths:
        if kind == "sealed":
            with sealstore.open(p, buffering=0, threads=threads) as f:
                t = pq.read_table(f, columns=columns)
        elif kind == "pme":
            t = pq.read_table(p, columns=columns, decryption_properties=dec)
        else:
            t = pq.read_table(p, columns=columns)
        total += t.nbytes
        del t
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2, help="sealstore.open(threads=)")
    ap.add_argument("--out", default="docs/perf/dataset_read.json")
    args = ap.parse_args()

    import pyarrow

    with tempfile.TemporaryDirectory(prefix="dataset-read-") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        plain, sealed, pme, dec = build(root, args.size, args.files)
        print(f"built {args.size / MIB:.0f} MiB x3 in {time.perf_counter() - t0:.1f} s")
        one = ["f1"]
        cases = {
            f"{kind}/{what}": (kind, paths, cols)
            for kind, paths in (("plain", plain), ("sealed", sealed), ("pme", pme))
            for what, cols in (("all", None), ("one_column", one))
        }
        nbytes = {name: read(k, p, c, dec, args.threads) for name, (k, p, c) in cases.items()}
        samples: dict[str, list[float]] = {name: [] for name in cases}
        names = list(cases)
        for r in range(args.repeat):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                kind, paths, cols = cases[name]
                t = time.perf_counter()
                read(kind, paths, cols, dec, args.threads)
                samples[name].append(time.perf_counter() - t)
        sizes = {"plain": plain, "sealed": sealed, "pme": pme}
        on_disk = {k: sum(p.stat().st_size for p in v) for k, v in sizes.items()}

    med = {name: statistics.median(s) for name, s in samples.items()}
    gbps = {name: nbytes[name] / med[name] / 1e9 for name in cases}
    ratios = {
        "sealed_vs_plain": med["plain/all"] / med["sealed/all"],
        "sealed_vs_pme": med["pme/all"] / med["sealed/all"],
        "projection_speedup_sealed": med["sealed/all"] / med["sealed/one_column"],
        "projection_speedup_plain": med["plain/all"] / med["plain/one_column"],
        "projection_speedup_pme": med["pme/all"] / med["pme/one_column"],
    }
    print(f"{'case':<20} {'median s':>9} {'GB/s (table)':>13}")
    for name in cases:
        print(f"{name:<20} {med[name]:>9.3f} {gbps[name]:>13.2f}")
    for k, v in ratios.items():
        print(f"{k:<28} {v:.2f}x")
    write_report(
        args.out,
        {
            "benchmark": "dataset_read",
            "python": platform.python_version(),
            "pyarrow": pyarrow.__version__,
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "note": "shared 2-core machine, others working: medians of --repeat rounds in "
            "rotating order; page cache warm; sealed read through sealstore.open(buffering=0)",
            "size_bytes": args.size,
            "files": args.files,
            "repeat": args.repeat,
            "threads": args.threads,
            "bytes_on_disk": on_disk,
            "table_bytes": nbytes,
            "median_seconds": med,
            "gb_per_s": gbps,
            "ratios": ratios,
            "samples": samples,
        },
    )


if __name__ == "__main__":
    main()

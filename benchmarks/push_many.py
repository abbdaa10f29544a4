#!/usr/bin/env python3
"""Push of a dataset of many small shards against ``tar | age`` of the same folder.

One run, on a ``file://`` store in a temporary folder:

* ``tar_age``   -- ``tar c DIR | age -r RECIPIENT > out.age``: one stream, one file,
  the floor for "encrypt a folder" (no per-file hashes, no random access, no store).
* ``push_cli``  -- ``sealstore push DIR NAME -k local:`` as a user runs it (the
  interpreter's start and imports included).
* ``push_api``  -- ``Store.push(DIR, ...)`` in this process: the per-file cost alone
  (one object, header and signature-covered manifest entry per file, the BoM).
* ``push_1``    -- ``sealstore push`` of one of those files: the fixed cost of a push.

Each is repeated ``--repeat`` times on a warm page cache and the median is reported,
with the ratio push/tar_age (lower is better; 1 would be as fast as the stream).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.format_throughput import parse_size, write_report

SEALSTORE = Path(sys.executable).parent / "sealstore"


def median_of(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=2000)
    ap.add_argument("--size", type=parse_size, default=4096, help="bytes per file")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default="docs/perf/push_many.json")
    args = ap.parse_args()
    if shutil.which("age") is None:
        sys.exit("push_many: needs the age command (scripts/services.sh install puts it there)")

    with tempfile.TemporaryDirectory(prefix="push-many-") as tmp:
        root = Path(tmp)
        data = root / "ds"
        data.mkdir()
        for i in range(args.files):
            (data / f"part-{i:05d}.bin").write_bytes(os.urandom(args.size))
        env = dict(
            os.environ,
            SEALSTORE_HOME=str(root / "home"),
            SEALSTORE_PASSPHRASE="bench",  # noqa: S106 - a throwaway keyring
            SEALSTORE_STORE=f"file://{root}/store",
        )
        os.environ.update(env)

        def sh(*cmd: str, **kw: Any) -> subprocess.CompletedProcess[bytes]:
            return subprocess.run(cmd, env=env, check=True, capture_output=True, **kw)

        sh(str(SEALSTORE), "keys", "init")
        sh(str(SEALSTORE), "store", "init", env["SEALSTORE_STORE"])
        sh("age-keygen", "-o", str(root / "age.key"))
        recipient = sh("age-keygen", "-y", str(root / "age.key")).stdout.decode().strip()

        def tar_age() -> None:
            with open(root / "out.age", "wb") as out:
                tar = subprocess.Popen(["tar", "c", "-C", str(root), "ds"], stdout=subprocess.PIPE)
                subprocess.run(["age", "-r", recipient], stdin=tar.stdout, stdout=out, check=True)
                tar.wait()

        from sealstore.vault.store import Store

        store = Store.open(env["SEALSTORE_STORE"])
        one = data / "part-00000.bin"
        results = {
            "tar_age_s": median_of(tar_age, args.repeat),
            "push_cli_s": median_of(
                lambda: sh(str(SEALSTORE), "-q", "push", str(data), "ds", "-k", "local:"),
                args.repeat,
            ),
            "push_api_s": median_of(lambda: store.push(data, "api", keys=["local:"]), args.repeat),
            "push_1_s": median_of(
                lambda: sh(str(SEALSTORE), "-q", "push", str(one), "one", "-k", "local:"),
                args.repeat,
            ),
        }
    report = {
        "benchmark": "push_many",
        "files": args.files,
        "bytes_per_file": args.size,
        "repeat": args.repeat,
        "statistic": "median",
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "load_average_1min_after": round(os.getloadavg()[0], 2),
        },
        **{k: round(v, 4) for k, v in results.items()},
        "ratio_push_cli_vs_tar_age": round(results["push_cli_s"] / results["tar_age_s"], 1),
        "ratio_push_api_vs_tar_age": round(results["push_api_s"] / results["tar_age_s"], 1),
        "per_file_ms_api": round(1000 * results["push_api_s"] / args.files, 3),
    }
    for k, v in report.items():
        print(f"{k:28} {v}")
    write_report(args.out, report)


if __name__ == "__main__":
    main()

"""Run fuzz targets under atheris (libFuzzer): ``python -m tests.fuzz.run [TARGET ...]``.

Each target runs in a process of its own (libFuzzer exits the process when it
is done), for ``--seconds`` or ``--runs``, whichever comes first, from a
corpus of its seeds plus what earlier runs found (``--work``, default
``build/fuzz``). An input that raises anything but the target's documented
errors is written to ``WORK/TARGET/crash-*`` and the run fails; keep it in
``tests/fuzz/crashes/TARGET/`` once the parser is fixed (tests/test_fuzz.py
replays that folder).

Exit status: 0 when every target ran clean, 1 when one found a crash.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path


def _one(name: str, seconds: int, runs: int, work: Path) -> None:
    """Fuzz one target in this process (does not return: libFuzzer exits)."""
    import atheris

    # Only sealstore's own modules are instrumented: coverage of the parsers,
    # not of cryptography's or the json module's Python.
    with atheris.instrument_imports(include=["sealstore"]):
        from tests.fuzz import harness

        target = harness.load(name)
    corpus = work / name / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    for data in [*target.seeds(), *(p.read_bytes() for p in harness.crash_inputs(name))]:
        (corpus / ("seed-" + hashlib.sha1(data).hexdigest())).write_bytes(data)  # noqa: S324
    args = [
        sys.argv[0],
        str(corpus),
        f"-max_total_time={seconds}",
        f"-artifact_prefix={work / name}/",
        "-timeout=20",
        "-rss_limit_mb=3072",
        "-print_final_stats=1",
    ]
    if runs:
        args.append(f"-runs={runs}")
    atheris.Setup(args, lambda data: harness.judge(target, data))
    atheris.Fuzz()


def main(argv: list[str] | None = None) -> int:
    from tests.fuzz import harness

    p = argparse.ArgumentParser(prog="python -m tests.fuzz.run", description=__doc__.split("\n")[0])
    p.add_argument("targets", nargs="*", help=f"default: all ({', '.join(harness.target_names())})")
    p.add_argument(
        "--seconds",
        type=int,
        default=int(os.environ.get("FUZZ_SECONDS", "60")),
        help="per target (default: $FUZZ_SECONDS or 60)",
    )
    p.add_argument("--runs", type=int, default=0, help="stop a target after this many inputs")
    p.add_argument("--work", type=Path, default=Path("build/fuzz"), help="corpora and crashes")
    p.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = args.targets or harness.target_names()
    work = args.work.absolute()
    if args.one:  # nothing of sealstore imported yet: _one imports it instrumented
        _one(names[0], args.seconds, args.runs, work)
    unknown = sorted(set(names) - set(harness.target_names()))
    if unknown:
        p.error(f"no fuzz target {unknown[0]!r}; there are: {', '.join(harness.target_names())}")
    failed = []
    for name in names:
        t0 = time.monotonic()
        cmd = [
            sys.executable,
            "-m",
            "tests.fuzz.run",
            "--one",
            name,
            f"--seconds={args.seconds}",
            f"--runs={args.runs}",
            f"--work={work}",
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        stats = [ln for ln in proc.stderr.splitlines() if ln.startswith("stat::number_of_executed")]
        runs = stats[-1].split(":")[-1].strip() if stats else "?"
        print(f"{name}: {runs} inputs in {time.monotonic() - t0:.0f} s, exit {proc.returncode}")
        if proc.returncode != 0:
            failed.append(name)
            print(proc.stderr[-4000:], file=sys.stderr)
    if failed:
        print(f"crashes in: {', '.join(failed)} (inputs under {work})", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The fuzz targets (tests/fuzz): real seeds, kept crashes, and a short atheris pass each.

The short pass is what CI runs of the fuzzing: a few seconds per target,
under atheris with coverage, so a target that no longer imports or a parser
that crashes on a nearby input fails the suite. ``make fuzz`` runs longer.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.fuzz import harness

TARGETS = harness.target_names()
CRASHES = [(name, p) for name in TARGETS for p in harness.crash_inputs(name)]
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.filterwarnings("ignore:.*serial number.*")


def test_the_targets_cover_every_parser() -> None:
    assert set(TARGETS) >= {
        "sealed_file",
        "safetensors_header",
        "snp_report",
        "snp_certificates",
        "tdx_quote",
        "tpm_attest",
        "broker_request",
        "nvgpu_report",
    }


@pytest.mark.parametrize("name", TARGETS)
def test_seeds_are_judged_clean(name: str) -> None:
    target = harness.load(name)
    seeds = list(target.seeds())
    assert seeds, f"{name} has no seeds"
    for data in seeds:
        harness.judge(target, data)


@pytest.mark.parametrize(("name", "path"), CRASHES, ids=[f"{n}/{p.name}" for n, p in CRASHES])
def test_kept_crashes_stay_fixed(name: str, path: Path) -> None:
    """Each input a fuzzer once crashed a parser with now raises only a documented error."""
    harness.judge(harness.load(name), path.read_bytes())


def test_an_undocumented_exception_is_a_crash() -> None:
    """judge() lets through what the parser does not document (what the fuzzer reports)."""
    target = harness.load("snp_report")
    harness.judge(target, b"short")  # AttestationError: documented
    with pytest.raises(TypeError):
        harness.judge(target, None)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", TARGETS)
def test_a_short_fuzz_pass(name: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.fuzz.run",
            name,
            "--seconds=3",
            "--runs=20000",
            f"--work={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    executed = int(proc.stdout.split(": ", 1)[1].split()[0])
    assert executed > 0, proc.stdout

"""``sealstore bench``: the command runs with tiny sizes and reports consistent figures.

No figure is compared with a fixed speed (benchmarks assert nothing about
time); what is checked is the report's shape, that every rate is positive and
agrees with its own bytes and seconds, that the summary table shows the same
sections, and that bad options fail with one line. The CUDA part runs its
kernels in numba's simulator here (conftest sets NUMBA_ENABLE_CUDASIM unless
SEALSTORE_CUDA=device); the GPU loads run only where torch sees a device.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sealstore.cli.main import main
from sealstore.kms.envelope import seal_file
from sealstore.kms.local import LocalKeyring

TINY = ["--size", "256KiB", "--chunk-size", "64KiB", "--repeat", "1", "--key-calls", "2"]


def bench_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    assert main(["bench", "--json", *TINY, *args]) == 0
    return json.loads(capsys.readouterr().out)


def check_rate(res: dict[str, Any], nbytes: int) -> None:
    """A figure's median, samples and GB/s agree with each other and with *nbytes*."""
    assert res["median_s"] > 0 and all(s > 0 for s in res["samples_s"])
    assert min(res["samples_s"]) <= res["median_s"] <= max(res["samples_s"])
    assert math.isclose(res["gbps"], nbytes / res["median_s"] / 1e9, rel_tol=1e-9)
    assert res["best_gbps"] >= res["gbps"]


def test_bench_in_process_reports_every_section(capsys: pytest.CaptureFixture[str]) -> None:
    report = bench_json(
        capsys, "--threads", "1,2", "--suite", "aes", "--compare", "cryptotensors,fastsafetensors"
    )
    m = report["machine"]
    assert m["cpu_count"] >= 1 and m["versions"]["sealstore"] and m["versions"]["cryptography"]
    assert "cpu_model" in m and "mem_total_gib" in m and "gpu" in m
    assert report["parameters"]["threads"] == [1, 2]
    assert report["parameters"]["suites"] == ["AES-256-GCM"]
    size = 256 * 1024

    aead = report["aead"]["AES-256-GCM"]
    assert set(aead) == {"raw_encrypt", "raw_decrypt_mem", "raw_decrypt_file", "raw_decrypt_mmap"}
    files = report["file"]["AES-256-GCM"]
    assert {"seal_encrypt", "stream_decrypt", "random_access_decrypt"} <= set(files)
    assert files["sealed_bytes"] > size  # tags and the preamble
    for ops in (aead, files):
        for op, per in ops.items():
            if op == "sealed_bytes":
                continue
            assert set(per) == {"1", "2"}, op
            for res in per.values():
                check_rate(res, size)

    load = report["load_cpu"]
    assert load["threads"] == 2 and load["tensors"] > 2 and load["bytes"] > 0
    results = load["results"]
    assert {"safetensors", "sealstore", "touch"} <= set(results)
    for res in results.values():
        check_rate(res, load["bytes"])
        assert math.isclose(
            res["time_vs_safetensors"],
            res["median_s"] / results["safetensors"]["median_s"],
            rel_tol=1e-9,
        )
    # Peers: each is measured in the same rounds, or skipped with the reason.
    compare = report["compare"]
    assert set(compare) == {"cryptotensors", "fastsafetensors"}
    for name, peer in compare.items():
        if "skipped" in peer:
            assert peer["skipped"] and not peer["loaders"]
        else:
            assert peer["loaders"] and all(n in results for n in peer["loaders"]), name
    if compare["fastsafetensors"]["version"] is None:
        assert compare["fastsafetensors"]["skipped"].startswith("not installed")

    # No GPU in this run (auto): said so, nothing measured.
    if not report["machine"]["gpu"] or "simulator" in report["machine"]["gpu"]:
        assert "skipped" in report["gpu"]

    keys = report["keys"]
    assert list(keys) == ["local (throwaway keyring)"]
    for kind in ("uncached", "cached"):
        k = keys["local (throwaway keyring)"][kind]
        assert 0 < k["p50_ms"] <= k["p95_ms"] and len(k["samples_ms"]) == 2

    figures = [x["figure"] for x in report["limits"]]
    assert "load_cpu sealstore" in figures and all(x["limited_by"] for x in report["limits"])
    assert report["wall_s"] > 0


def test_bench_subprocess_prints_the_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    exe = Path(sys.executable).with_name("sealstore")
    args = ["--threads", "1", "--suite", "chacha", "--skip", "load", "--no-progress"]
    args += ["-o", str(out)]
    proc = subprocess.run(
        [str(exe), "bench", *TINY, *args],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout
    for heading in ("sealstore bench:", "AEAD (the ceiling), GB/s", "sealed file, GB/s"):
        assert heading in table
    assert "CHACHA20-POLY1305  random-access decrypt" in table
    assert "key release, ms" in table and "limited by:" in table and "wall time" in table
    assert "loading into CPU tensors" not in table  # --skip load
    report = json.loads(out.read_text())
    assert "load_cpu" not in report and list(report["aead"]) == ["CHACHA20-POLY1305"]
    # The table shows the report's figures.
    ra = report["file"]["CHACHA20-POLY1305"]["random_access_decrypt"]["1"]["gbps"]
    assert f"{ra:9.2f}" in table


def test_bench_artifact_measures_storage_apart(
    capsys: pytest.CaptureFixture[str], ring: LocalKeyring, store: Any, tmp_path: Path
) -> None:
    plain = tmp_path / "model.bin"
    plain.write_bytes(os.urandom(300_000))
    sealed = tmp_path / "model.bin.seal"
    seal_file(plain, sealed, [ring], chunk_size=65536)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(plain.read_bytes())
    store.push(folder, "m", keys=["local:"])
    ref = f"sealstore+{store.url}#m/model.safetensors"
    for src in (str(sealed), ref):
        report = bench_json(capsys, src, "--skip", "keys,aead", "--threads", "2")
        art = report["artifact"]
        assert art["source"] == src and art["plaintext_bytes"] == 300_000
        chunks = -(-300_000 // art["chunk_size"])
        assert art["sealed_bytes"] == 300_000 + 16 * chunks  # every chunk's tag, nothing else
        if src == str(sealed):
            assert art["chunk_size"] == 65536
        res = art["results"]
        check_rate(res["storage"], art["sealed_bytes"])
        for name in ("decrypt", "end_to_end"):
            check_rate(res[name], 300_000)
        assert res["open"]["median_s"] > 0
        assert art["limited_by"] in ("storage", "decryption (CPU)")
        # Synthetic sections make way for the artifact.
        assert "file" not in report and "load_cpu" not in report
        assert any(x["figure"] == "artifact end_to_end" for x in report["limits"])


def test_bench_artifact_on_s3_reads_it_by_ranges(
    capsys: pytest.CaptureFixture[str],
    ring: LocalKeyring,
    s3: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A sealed object on SeaweedFS: storage read through the ranged S3 source, apart."""
    import boto3

    from tests.s3util import new_bucket, s3_options

    options = s3_options(s3.url, s3.key, s3.secret)
    plain, sealed = tmp_path / "model.bin", tmp_path / "model.bin.seal"
    plain.write_bytes(os.urandom(200_000))
    seal_file(plain, sealed, [ring], chunk_size=65536)
    bucket, _, prefix = new_bucket(options).partition("/")
    client = boto3.client(
        "s3",
        endpoint_url=s3.url,
        aws_access_key_id=s3.key,
        aws_secret_access_key=s3.secret,
        region_name="us-east-1",
    )
    client.put_object(Bucket=bucket, Key=f"{prefix}/m.seal", Body=sealed.read_bytes())
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3.secret)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    url = f"s3://{bucket}/{prefix}/m.seal"
    report = bench_json(capsys, url, "--skip", "keys,aead", "--threads", "2")
    art = report["artifact"]
    assert art["sealed_bytes"] == 200_000 + 16 * 4 and art["plaintext_bytes"] == 200_000
    check_rate(art["results"]["storage"], art["sealed_bytes"])
    check_rate(art["results"]["end_to_end"], 200_000)


def test_bench_gpu_kernel_in_the_simulator(capsys: pytest.CaptureFixture[str]) -> None:
    from sealstore.bench import gpu

    if not (gpu.simulator() or gpu.torch_cuda()):
        pytest.skip("neither numba's CUDA simulator nor a CUDA device")
    # The GPU loads run without the CPU's load section (on a GPU machine).
    report = bench_json(
        capsys, "--device", "cuda", "--suite", "chacha", "--skip", "aead,file,keys,load"
    )
    section = report["gpu"]
    kernel = section["kernel"]["CHACHA20-POLY1305"]
    assert kernel["gbps"] > 0 and kernel["bytes"] > 0
    if gpu.torch_cuda():  # a GPU machine (SEALSTORE_CUDA=device): the loads too
        for name in ("plaintext", "gpu_direct", "cpu_decrypt"):
            check_rate(section["results"][name], section["bytes"])
        assert any(x["figure"] == "gpu_direct" for x in report["limits"])
    else:
        assert section["simulator"] is True and "results" not in section


def test_bench_without_torch_skips_the_loads_and_says_why(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sealstore.bench import runner

    monkeypatch.setattr(runner, "_have_torch", lambda: False)
    assert main(["bench", *TINY, "--threads", "1", "--suite", "aes", "--skip", "keys"]) == 0
    table = capsys.readouterr().out
    assert "loading into CPU tensors: skipped (torch is not installed" in table
    assert "random-access decrypt" in table


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--device", "tpu"], "--device"),
        (["--threads", "0"], "--threads"),
        (["--size", "12X"], "--size"),
        (["--suite", "des"], "--suite"),
        (["--compare", "nobody"], "--compare"),
        (["--skip", "everything"], "--skip"),
        (["--chunk-size", "1000"], "--chunk-size"),
        (["--repeat", "0"], "--repeat"),
    ],
)
def test_bench_bad_options_fail_with_one_line(
    capsys: pytest.CaptureFixture[str], args: list[str], needle: str
) -> None:
    try:
        code = main(["bench", *args])  # a check of the options' values together
    except SystemExit as exc:  # argparse's check of one option
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and err[0].startswith("sealstore: error:")

"""The summary table ``sealstore bench`` prints, from its report (the figures of ``--json``)."""

from __future__ import annotations

from typing import Any

from sealstore.progress import human_bytes

__all__ = ["render"]

_OPS = {
    "raw_decrypt_mem": "raw AEAD decrypt (memory)",
    "raw_decrypt_file": "raw AEAD decrypt (file reads)",
    "raw_decrypt_mmap": "raw AEAD decrypt (mmap)",
    "raw_encrypt": "raw AEAD encrypt",
    "stream_decrypt": "stream decrypt",
    "random_access_decrypt": "random-access decrypt",
    "seal_encrypt": "seal (encrypt)",
}
_LOADS = {
    "safetensors": "safetensors (plaintext)",
    "sealstore": "sealstore load_file",
    "touch": "touch (memory floor)",
    "plaintext": "safetensors (plaintext)",
    "gpu_direct": "sealstore GPU-direct",
    "cpu_decrypt": "sealstore cpu-decrypt + copy",
}


def _f(x: float | None, spec: str = "8.2f") -> str:
    return format(x, spec) if x is not None else format("n/a", ">" + spec.split(".")[0])


def render(report: dict[str, Any]) -> str:
    """The report as a table of plain text lines."""
    p, m = report["parameters"], report["machine"]
    threads = p["threads"]
    lines = [
        f"sealstore bench: {human_bytes(p['size'])}, chunk {human_bytes(p['chunk_size'])}, "
        f"median of {p['repeat']}; {m.get('cpu_model')} ({m['cpu_count']} CPUs, "
        f"flags {','.join(m.get('cpu_flags', [])) or 'n/a'}), {m.get('mem_total_gib')} GiB; "
        f"GPU: {m.get('gpu') or 'none'}",
    ]
    head_t = "".join(f"{f'{n} thr':>9}" for n in threads)
    for title, key in (("AEAD (the ceiling)", "aead"), ("sealed file", "file")):
        section = report.get(key)
        if not section:
            continue
        lines += ["", f"{title + ', GB/s':<52}{head_t}"]
        for suite, ops in section.items():
            for op, per in ops.items():
                if not isinstance(per, dict):
                    continue
                cells = "".join(_f(per.get(str(n), {}).get("gbps"), "9.2f") for n in threads)
                lines.append(f"  {suite:<18} {_OPS.get(op, op):<31}{cells}")
    load = report.get("load_cpu")
    if load and "skipped" in load:
        lines += ["", f"loading into CPU tensors: skipped ({load['skipped']})"]
    elif load:
        lines += [
            "",
            f"loading into CPU tensors: {human_bytes(load['bytes'])}, {load['tensors']} "
            f"tensors, {load['threads']} threads, {load['suite']}",
            f"  {'loader':<34}{'ms':>9}{'GB/s':>9}{'x plaintext time':>18}",
        ]
        for name, res in load["results"].items():
            lines.append(
                f"  {_LOADS.get(name, 'peer ' + name):<34}{res['median_s'] * 1e3:9.1f}"
                f"{res['gbps']:9.2f}{res['time_vs_safetensors']:18.2f}"
            )
        for name, c in report.get("compare", {}).items():
            if "skipped" in c:
                lines.append(f"  {'peer ' + name:<34} skipped: {c['skipped']}")
    gpu = report.get("gpu")
    if gpu:
        lines.append("")
        if "skipped" in gpu:
            lines.append(f"GPU: skipped ({gpu['skipped']})")
        else:
            lines.append(f"GPU: {gpu.get('name')} ({gpu['device']})")
            if gpu.get("note"):
                lines.append(f"  {gpu['note']}")
            for name, res in gpu.get("results", {}).items():
                lines.append(
                    f"  {_LOADS.get(name, name):<34}{res['median_s'] * 1e3:9.1f} ms"
                    f"{res['gbps']:9.2f} GB/s{res['time_vs_plaintext']:8.2f}x plaintext time"
                )
            for suite, k in gpu.get("kernel", {}).items():
                lines.append(f"  {'decrypt kernel ' + suite:<34}{k['gbps']:21.2f} GB/s")
    keys = report.get("keys")
    if keys:
        lines += [
            "",
            f"{'key release, ms':<40}{'uncached p50':>13}{'p95':>8}{'cached p50':>12}{'p95':>8}",
        ]
        for name, k in keys.items():
            u, c = k["uncached"], k["cached"]
            lines.append(
                f"  {name:<38}{u['p50_ms']:13.2f}{u['p95_ms']:8.2f}"
                f"{c['p50_ms']:12.3f}{c['p95_ms']:8.3f}"
            )
    art = report.get("artifact")
    if art:
        r = art["results"]
        lines += [
            "",
            f"artifact {art['source']}: {human_bytes(art['plaintext_bytes'])}, {art['suite']}, "
            f"{art['threads']} threads",
            f"  {'open (checks, key release)':<34}{r['open']['median_s'] * 1e3:9.1f} ms",
            f"  {'storage read (sealed bytes)':<34}{r['storage']['gbps']:9.2f} GB/s",
            f"  {'decrypt (in memory)':<34}{r['decrypt']['gbps']:9.2f} GB/s",
            f"  {'end to end (decrypt_into)':<34}{r['end_to_end']['gbps']:9.2f} GB/s",
        ]
    noise = {k: v for k, v in report.get("noise", {}).items() if v}
    if noise:
        lines += ["", "CPU taken by others while timing (steal: the host; other: other processes):"]
        lines += [
            f"  {name:<28} steal {nz['steal_pct']:5.1f}%  other {nz['other_processes_pct']:5.1f}%"
            for name, nz in noise.items()
        ]
    if report.get("limits"):
        lines += ["", "limited by:"]
        lines += [f"  {x['figure']}: {x['limited_by']}" for x in report["limits"]]
    lines += ["", f"wall time {report['wall_s']:.1f} s; GB/s = 1e9 bytes of plaintext per second"]
    return "\n".join(lines)

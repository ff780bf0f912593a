"""Export benchmark: wall time split into merge / convert / quantize / hash.

Builds a seeded random Llama checkpoint of a realistic shape (default ~110M
parameters, F16 ≈ 220 MB) plus a LoRA adapter, exports it to F16 + Q4_K_M,
and compares the hashing cost against Python's hashlib on the same bytes
(the machine's SHA256 limit). Target: hashing adds ≤10% to export wall time.

    .venv/bin/python bench/export.py [--hidden 1024 --layers 8 --intermediate 2816]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from ggufship.demo_checkpoint import TinySpec, build_checkpoint, build_lora_adapter
from ggufship.export import ExportRequest, export_checkpoint


def hashlib_throughput(path: Path, rounds: int = 3) -> float:
    """GiB/s of hashlib.sha256 over a file already in the page cache (best of N)."""
    size = path.stat().st_size
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        h = hashlib.sha256()
        with path.open("rb", buffering=0) as fh:
            while chunk := fh.read(4 << 20):
                h.update(chunk)
        best = max(best, size / (time.perf_counter() - t0) / 2**30)
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ggufship-bench-"))
    spec = TinySpec(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.hidden // 64,
        num_kv_heads=args.hidden // 128,
        vocab_size=512,
    )
    ckpt = work / "ckpt"
    if not (ckpt / "config.json").exists():
        build_checkpoint(ckpt, spec)
        build_lora_adapter(ckpt, work / "lora", steps=1)
    out = work / "out"
    t0 = time.perf_counter()
    result = export_checkpoint(
        ExportRequest(
            checkpoint=ckpt, out_dir=out, name="bench", version="1", adapter=work / "lora", force=True
        )
    )
    wall = time.perf_counter() - t0
    t = result.timings
    total_bytes = sum(f.size for f in result.manifest.gguf_files())
    f16 = out / "bench-1-F16.gguf"
    limit = hashlib_throughput(f16)
    ours = total_bytes / t["hash"] / 2**30 if t["hash"] else float("inf")
    report = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
        "params_f16_bytes": f16.stat().st_size,
        "gguf_bytes_total": total_bytes,
        "wall_s": round(wall, 2),
        "merge_s": round(t["merge"], 2),
        "convert_s": round(t["convert"], 2),
        "quantize_s": round(t["quantize"], 2),
        "hash_cpu_s": round(t["hash"], 3),
        "hash_wait_s": round(t["hash_wait"], 3),
        "hash_share_of_wall": round(t["hash"] / wall, 4),
        "hash_wall_overhead": round(t["hash_wait"] / wall, 4),
        "hash_GiB_s": round(ours, 2),
        "hashlib_limit_GiB_s": round(limit, 2),
    }
    print(json.dumps(report, indent=2))
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

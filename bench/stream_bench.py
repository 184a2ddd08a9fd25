"""Loader throughput streaming shards from a local S3 server vs reading them from local disk, same shards, same run.

    python bench/stream_bench.py                 # default: ~1 min on 2 cores
    python bench/stream_bench.py --quick         # a few seconds, smoke test
    python bench/stream_bench.py --json out.json # also write the figures

The S3 server is moto in server mode in a separate process (so it does not share this process's GIL, as a real
store would not). The loader is ``reader.read_shards`` (next shard opened ahead; metadata decoded and checked), and a
variant that also decodes every JPEG to RGB. Passes alternate local / S3 so drift in machine load hits
both; the median pass counts. Target: S3 samples/s ÷ local samples/s >= 0.9.

CPU time per sample is reported too (loader process, and the S3 server process): on a machine shared with other
work, every CPU-second the S3 path adds (HTTP client, the server itself) lowers the ratio, while on idle cores the
transfer overlaps with parsing.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import boto3
import numpy as np
import psutil

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from shards import reader, schema, storage  # noqa: E402


def make_shards(out: str, shards: int, per_shard: int, size: int, boxes: int, seed: int = 0) -> list[str]:
    """Synthetic shards in the real format: smooth random JPEGs (COCO-like bytes per pixel) and ``boxes`` boxes each."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    names = []
    for s in range(shards):
        name = schema.shard_name("bench", s) + schema.TAR_SUFFIX
        with tarfile.open(os.path.join(out, name), "w", format=tarfile.USTAR_FORMAT) as tar:
            for i in range(per_shard):
                key = f"{s:04d}_{i:06d}"
                small = rng.integers(0, 256, (size // 8, size // 8, 3), dtype=np.uint8)
                img = Image.fromarray(small).resize((size, size), Image.BILINEAR)
                buf = io.BytesIO()
                img.save(buf, format="JPEG", quality=90)
                xy = rng.integers(0, size // 2, (boxes, 2))
                wh = rng.integers(8, size // 2, (boxes, 2))
                meta = schema.encode_meta(
                    key=key,
                    path=f"{key}.jpg",
                    width=size,
                    height=size,
                    boxes=np.concatenate([xy, xy + wh], 1),
                    image_sha256=schema.image_sha256(buf.getvalue()),
                )
                for member, data in ((f"{key}.jpg", buf.getvalue()), (f"{key}.json", meta)):
                    info = tarfile.TarInfo(member)
                    info.size, info.mode = len(data), 0o644
                    tar.addfile(info, io.BytesIO(data))
        names.append(name)
    return names


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("moto server did not start within 60 s")


def one_pass(urls: list[str], decode_images: bool) -> tuple[int, float, float]:
    """(samples, wall seconds, CPU seconds of this process)."""
    from PIL import Image

    n, t, cpu = 0, time.perf_counter(), time.process_time()
    for sample in reader.read_shards(urls):
        if decode_images:
            with Image.open(io.BytesIO(sample["jpg"])) as im:
                im.convert("RGB").load()
        n += 1
    return n, time.perf_counter() - t, time.process_time() - cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--per-shard", type=int, default=250)
    ap.add_argument("--size", type=int, default=320, help="image side in pixels")
    ap.add_argument("--boxes", type=int, default=100, help="boxes per sample")
    ap.add_argument("--passes", type=int, default=5, help="timed passes per source and variant")
    ap.add_argument("--quick", action="store_true", help="tiny run: 4 shards x 50 samples, 2 passes")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.quick:
        args.shards, args.per_shard, args.passes = 4, 50, 2

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    proc, endpoint = start_moto()
    server = psutil.Process(proc.pid)
    try:
        storage.configure(endpoint_url=endpoint)
        with tempfile.TemporaryDirectory() as tmp:
            names = make_shards(tmp, args.shards, args.per_shard, args.size, args.boxes)
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            for name in names:
                with open(os.path.join(tmp, name), "rb") as f:
                    storage.write_bytes(f"s3://bench/shards/{name}", f.read())
            sources = {"local": reader.expand_spec(tmp), "s3": reader.expand_spec("s3://bench/shards/")}
            mb = sum(os.path.getsize(u) for u in sources["local"]) / 1e6
            results = {}
            for variant, decode_images in (("meta", False), ("meta+jpeg", True)):
                for urls in sources.values():  # warm-up: imports, connections, page cache
                    one_pass(urls[:1], decode_images)
                rates: dict[str, list[float]] = {k: [] for k in sources}
                cpu_us: dict[str, list[float]] = {"local": [], "s3": [], "server": []}
                for _ in range(args.passes):
                    for src, urls in sources.items():
                        before = sum(server.cpu_times()[:2])
                        n, sec, cpu = one_pass(urls, decode_images)
                        rates[src].append(n / sec)
                        cpu_us[src].append(cpu / n * 1e6)
                        if src == "s3":
                            cpu_us["server"].append((sum(server.cpu_times()[:2]) - before) / n * 1e6)
                local, s3 = statistics.median(rates["local"]), statistics.median(rates["s3"])
                results[variant] = {
                    "local_samples_s": round(local, 1),
                    "s3_samples_s": round(s3, 1),
                    "ratio": round(s3 / local, 3),
                    "passes": {k: [round(r) for r in v] for k, v in rates.items()},
                    "cpu_us_per_sample": {k: round(statistics.median(v), 1) for k, v in cpu_us.items()},
                }
    finally:
        proc.terminate()
        proc.wait()

    samples = args.shards * args.per_shard
    print(
        f"{args.shards} shards, {samples} samples, {mb:.1f} MB, {args.size}px, {args.boxes} boxes/sample, "
        f"median of {args.passes} passes, {os.cpu_count()} CPUs"
    )
    print(
        f"{'variant':<10} {'local/s':>8} {'s3/s':>8} {'s3÷local':>9}  (target >= 0.9)   CPU µs/sample: "
        "loader local, loader s3, S3 server"
    )
    for variant, r in results.items():
        c = r["cpu_us_per_sample"]
        print(
            f"{variant:<10} {r['local_samples_s']:>8.0f} {r['s3_samples_s']:>8.0f} {r['ratio']:>9.3f}"
            f"{'':20}{c['local']:>6.0f} {c['s3']:>6.0f} {c['server']:>6.0f}"
        )
    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} CPUs" + (" (shared: ratios are noisy)" if load > 1 else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "megabytes": round(mb, 2), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()

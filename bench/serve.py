"""Latency of tools/serve.py's JSON endpoint per request: median and 95th percentile over
``--requests`` requests, one at a time over HTTP, with 3 and 16 names, the same names every
time (their embeddings cached) and names drawn anew per request (embedded by the export's
text tower each time), beside ``predict`` called in-process.

    python bench/serve.py [--export outputs/shapes/export] [--requests 100]

The export needs its text tower (``tools/export.py --text-encoder``; the main job's has it).
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from detectors import load_student  # noqa: E402
from ovdistill.serve import Served, val_examples  # noqa: E402

POOL = ["circle", "square", "triangle", "star", "cross", "heart", "ring", "arrow", "crescent",
        "diamond", "hexagon", "semicircle", "hourglass", "frame", "drop", "bolt", "sky", "grass",
        "water", "sand", "moon", "key", "leaf", "shield"]


def percentiles(seconds: list[float]) -> tuple[float, float]:
    ms = sorted(1000 * s for s in seconds)
    return statistics.median(ms), ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--export", default="outputs/shapes/export")
    p.add_argument("--requests", type=int, default=100)
    args = p.parse_args()
    export = Path(args.export).resolve()
    image = val_examples([Served.load(export)], 1)
    if not image:
        raise SystemExit(f"{export}: no val image of its embedded world on disk")
    payload = base64.b64encode(image[0].read_bytes()).decode()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "tools.serve", str(export), "--port",
                               str(port), "--examples", "0"], cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/api/predict"
    student = load_student(export)
    rng = random.Random(0)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/exports", timeout=2)
                break
            except OSError:
                time.sleep(0.5)

        def post(names: list[str]) -> float:
            body = json.dumps({"image": payload, "names": names}).encode()
            t = time.perf_counter()
            with urllib.request.urlopen(urllib.request.Request(
                    url, body, {"Content-Type": "application/json"}), timeout=60) as r:
                r.read()
            return time.perf_counter() - t

        def local(names: list[str]) -> float:
            t = time.perf_counter()
            student.predict(image[0], names=names)
            return time.perf_counter() - t

        print(f"{export}, {image[0].name} (160 px), {args.requests} requests each, one at a "
              f"time; milliseconds")
        print("| names | vocabulary | HTTP median | HTTP p95 | predict() median | "
              "predict() p95 |")
        print("|---:|---|---:|---:|---:|---:|")
        for n in (3, 16):
            for fresh in (False, True):
                draw = (lambda n=n: rng.sample(POOL, n)) if fresh else \
                    (lambda n=n: POOL[:n])
                post(draw()), local(draw())  # warm-up: the text tower loaded once
                http = [post(draw()) for _ in range(args.requests)]
                inproc = [local(draw()) for _ in range(args.requests)]
                (hm, hp), (lm, lp) = percentiles(http), percentiles(inproc)
                kind = "drawn anew" if fresh else "the same (cached)"
                print(f"| {n} | {kind} | {hm:.1f} | {hp:.1f} | {lm:.1f} | {lp:.1f} |")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""The per-call cost of Attend's Python path at a small shape, next to the C++ call.

At b=1, h=8, n=m=64, d=64 (fp32, CPU) the kernel itself takes microseconds, so
what Python adds shows: the median time of one call of

- the C++ API (`attend bench`: attend::forward on DLTensors, out preallocated),
- attend.forward on numpy arrays and on torch tensors (out allocated per call),
- attend.torch.Attend (the custom op, eval mode, no autograd),
- torch.nn.functional.scaled_dot_product_attention,

each over --calls calls, the median of --rounds rounds in which they alternate.

    .venv-bench/bin/python bench/python_overhead.py [--build build] [--calls 2000]

The package is imported from --build's python/ folder (./build.sh builds it for
.venv's Python; .venv-bench has the same version).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def median_us(call, calls):
    for _ in range(calls // 10):  # warm-up: thread pool, caches
        call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e6)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=str(REPO / "build"))
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "python_overhead.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(Path(args.build) / "python"))
    import numpy as np
    import torch
    import torch.nn.functional as F
    import attend
    import attend.torch as attend_torch
    torch.set_num_threads(args.threads)
    os.environ["HL_NUM_THREADS"] = str(args.threads)

    b, h, n, d = 1, 8, 64, 64
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(b, h, n, d, generator=g) for _ in range(3))
    qn, kn, vn = q.numpy(), k.numpy(), v.numpy()
    module = attend_torch.Attend().eval()
    cpp_cmd = [str(Path(args.build) / "bin" / "attend"), "bench", "--b", str(b), "--h", str(h), "--n", str(n),
               "--m", str(n), "--d", str(d), "--repeats", str(args.calls), "--json"]

    def cpp(_calls):
        out = subprocess.run(cpp_cmd, capture_output=True, text=True, check=True,
                             env=dict(os.environ, HL_NUM_THREADS=str(args.threads))).stdout
        return json.loads(out.strip().splitlines()[-1])["median_ms"] * 1e3

    with torch.no_grad():
        ways = {
            "C++ attend::forward (attend bench)": cpp,
            "attend.forward, numpy": lambda c: median_us(lambda: attend.forward(qn, kn, vn), c),
            "attend.forward, torch": lambda c: median_us(lambda: attend.forward(q, k, v), c),
            "attend.torch.Attend (custom op)": lambda c: median_us(lambda: module(q, k, v), c),
            "torch SDPA": lambda c: median_us(lambda: F.scaled_dot_product_attention(q, k, v), c),
        }
        times = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, way in ways.items():
                times[name].append(way(args.calls))
    us = {name: statistics.median(t) for name, t in times.items()}
    base = us["C++ attend::forward (attend bench)"]
    print(f"b={b} h={h} n=m={n} d={d} fp32, {args.threads} threads, median of {args.rounds} rounds of "
          f"{args.calls} calls; torch {torch.__version__}")
    print(f"{'call':<38}{'us per call':>12}{'minus C++':>11}")
    for name, t in us.items():
        print(f"{name:<38}{t:>12.1f}{t - base:>+11.1f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(dict(shape=dict(b=b, h=h, n=n, m=n, d=d), threads=args.threads,
                                               calls=args.calls, rounds=args.rounds, torch=torch.__version__,
                                               microseconds=us), indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()

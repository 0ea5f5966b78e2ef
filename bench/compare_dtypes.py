#!/usr/bin/env python3
"""float16 and bfloat16 next to float32 on the CPU, in one run.

Runs `attend bench --json` for each dtype and shape, interleaved over --rounds
rounds (the machine is shared and noisy: medians of the rounds), and the FMA
peak (bench/fma_peak.c, built as build/bench/fma_peak) in the same
run. Prints a table and writes bench/results/compare_dtypes.json.

    python3 bench/compare_dtypes.py [--build build] [--rounds 5]
"""
import argparse
import json
import pathlib
import statistics
import subprocess
import sys

SHAPES = [  # (n = m, d, causal), b = 2, h = 8
    (256, 64, False), (1024, 64, False), (1024, 64, True), (4096, 64, False), (1024, 128, False),
]
DTYPES = ["float32", "float16", "bfloat16"]


def main():
    root = pathlib.Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default=str(root / "build"))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    attend = pathlib.Path(args.build) / "bin" / "attend"
    fma_peak = pathlib.Path(args.build) / "bench" / "fma_peak"
    for tool in (attend, fma_peak):
        if not tool.exists():
            sys.exit(f"compare_dtypes: {tool} is missing: run ./build.sh first")

    peaks = []
    results = {}  # (n, d, causal, dtype) -> GFLOP/s per round
    for round_index in range(args.rounds):
        peak_line = subprocess.run([str(fma_peak)], check=True, capture_output=True, text=True).stdout.split()
        peaks.append(float(peak_line[-1]))
        for n, d, causal in SHAPES:
            for dtype in DTYPES:
                command = [str(attend), "bench", "--n", str(n), "--m", str(n), "--d", str(d), "--dtype", dtype,
                           "--repeats", "3", "--json"] + (["--causal"] if causal else [])
                output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                record = json.loads(output.strip().splitlines()[-1])
                results.setdefault((n, d, causal, dtype), []).append(record["median_gflops"])
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)

    peak = statistics.median(peaks)
    print(f"FMA peak (median of {len(peaks)}): {peak:.1f} GFLOP/s; b=2, h=8, medians of {args.rounds} rounds")
    print(f"{'n=m':>6} {'d':>4} {'causal':>6} " + " ".join(f"{t + ' GFLOP/s (peak)':>26}" for t in DTYPES))
    rows = []
    for n, d, causal in SHAPES:
        cells, row = [], {"n": n, "d": d, "causal": causal}
        for dtype in DTYPES:
            gflops = statistics.median(results[(n, d, causal, dtype)])
            row[dtype] = gflops
            cells.append(f"{gflops:>15.1f} ({100 * gflops / peak:4.1f} %)")
        rows.append(row)
        print(f"{n:>6} {d:>4} {str(causal):>6} " + " ".join(f"{c:>26}" for c in cells))
    out = root / "bench" / "results" / "compare_dtypes.json"
    out.write_text(json.dumps({"fma_peak_gflops": peak, "rounds": args.rounds, "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

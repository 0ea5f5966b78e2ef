#!/usr/bin/env python3
"""Hand schedule, tuned schedule and Halide's autoschedulers, side by side.

Every implementation is the same generator for the same target, generated as a
candidate kernel and run by build/tools/attend_tune_probe (checked against the
reference first, then timed, all implementations of a head dim interleaved call
by call: the median of at least --repeats calls per shape), in --rounds probe
runs (medians of the rounds), with the FMA peak (build/bench/fma_peak) measured
in each round:

  hand       the generator's defaults
  tuned      the parameters in tuning/cpu.json for this target (what the build uses)
  Li2018, Adams2019, Mullapudi2016
             the generator's autoscheduler branch (estimates only) with each
             plugin of the Halide wheel; one that fails is reported as such

Writes bench/results/compare_schedules.json and a PNG plot (GFLOP/s against n,
one line per implementation, the FMA peak as a line), when matplotlib imports.

    python3 bench/compare_schedules.py [--rounds 3] [--head-dims 64,128]
"""
import argparse
import json
import pathlib
import statistics
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import tune  # noqa: E402  (the tuner's candidate machinery)

AUTOSCHEDULERS = ["Li2018", "Adams2019", "Mullapudi2016"]
LENGTHS = [256, 1024, 4096]  # n = m, b = 2, h = 8, non-causal


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", default=str(ROOT / "build"))
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--tuning", default=str(ROOT / "tuning" / "cpu.json"))
    parser.add_argument("--generate-timeout", type=float, default=900,
                        help="seconds one kernel may take to generate (an autoscheduler may take long)")
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "compare_schedules.json"))
    parser.add_argument("--plot", default=str(ROOT / "bench" / "results" / "compare_schedules.png"))
    args = parser.parse_args()
    build = pathlib.Path(args.build).resolve()
    targets = (tune.cache_value(build, "ATTEND_CPU_TARGETS") or "").split(";")
    target = next((t for t in targets if tune.runs_here(t)), None)
    if not target:
        sys.exit(f"compare_schedules: no target of ATTEND_CPU_TARGETS runs here: {targets}")
    head_dims = [int(d) for d in args.head_dims.split(",")]
    shapes = [f"2,8,{n},{n}" for n in LENGTHS]
    tuned = json.loads(pathlib.Path(args.tuning).read_text()).get("targets", {}).get(target, {})
    candidates = tune.Candidates(build, target, args.repeats, build / "tune" / f"compare-{target}.json", fresh=True)
    candidates.generate_timeout = args.generate_timeout
    hand = tune.hand_schedule()

    # name -> (params, autoscheduler) per head dim
    implementations = {"hand": {d: (hand, None) for d in head_dims}}
    implementations["tuned"] = {d: (tuned[f"d{d}"]["params"], None) for d in head_dims if f"d{d}" in tuned}
    for scheduler in AUTOSCHEDULERS:
        implementations[scheduler] = {d: ({}, scheduler) for d in head_dims}
    failures = {}
    for name, by_dim in implementations.items():  # generate everything first (timing wants a quiet machine)
        for d, (params, scheduler) in by_dim.items():
            tune.say(f"generating {name} d={d}")
            try:
                candidates.library(d, params, scheduler)
            except Exception as error:  # a failing autoscheduler is a result, not a crash
                failures[f"{name} d={d}"] = str(error).splitlines()[-1][:300]
                tune.say(f"  failed: {failures[f'{name} d={d}']}")

    gflops = {}  # (name, d) -> per round, per shape
    peaks = []
    for round_index in range(args.rounds):
        peaks.append(tune.fma_peak(build))
        for d in head_dims:  # every implementation of a head dim in one probe run, interleaved
            names = [name for name, by_dim in implementations.items() if d in by_dim and f"{name} d={d}" not in failures]
            group = [implementations[name][d] for name in names]
            for name, result in zip(names, candidates.measure(d, group, shapes, label=f"round {round_index}")):
                if result is None:
                    failures[f"{name} d={d}"] = "failed the reference check"
                else:
                    gflops.setdefault((name, d), []).append(result)
        tune.say(f"round {round_index + 1}/{args.rounds} done")

    peak = statistics.median(p for p in peaks if p) if any(peaks) else None
    rows = []
    print(f"target {target}, b=2, h=8, non-causal, fp32; FMA peak {peak} GFLOP/s; medians of {args.rounds} rounds")
    print(f"{'implementation':>16} {'d':>4} " + " ".join(f"{'n=' + str(n):>16}" for n in LENGTHS))
    for (name, d), rounds in gflops.items():
        medians = [statistics.median(r[i] for r in rounds) for i in range(len(shapes))]
        rows.append({"implementation": name, "d": d, "n": LENGTHS, "gflops": [round(g, 2) for g in medians]})
        cells = [f"{g:7.1f} ({100 * g / peak:3.0f} %)" if peak else f"{g:16.1f}" for g in medians]
        print(f"{name:>16} {d:>4} " + " ".join(f"{c:>16}" for c in cells))
    for what, why in failures.items():
        print(f"{what}: {why}")
    record = {"target": target, "cpu": tune.cpu_model(), "fma_peak_gflops": peak, "b": 2, "h": 8,
              "rounds": args.rounds, "repeats": args.repeats, "rows": rows, "failures": failures,
              "tuned_params": {d: tuned[f"d{d}"]["params"] for d in head_dims if f"d{d}" in tuned}}
    pathlib.Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    print(f"written {args.json}")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed here: no plot (pip install matplotlib, or use bench/requirements.txt)")
        return
    figure, axes = plt.subplots(1, len(head_dims), figsize=(6 * len(head_dims), 4.5), squeeze=False)
    for axis, d in zip(axes[0], head_dims):
        for row in (r for r in rows if r["d"] == d):
            axis.plot(row["n"], row["gflops"], marker="o", label=row["implementation"])
        if peak:
            axis.axhline(peak, color="black", linestyle="--", label=f"FMA peak ({peak:.0f})")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("n = m")
        axis.set_ylabel("GFLOP/s")
        axis.set_title(f"d = {d}, {target.split('-')[-1]}, {tune.cpu_model()[:28]}", fontsize=9)
        axis.set_ylim(bottom=0)
        axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(args.plot, dpi=110)
    print(f"written {args.plot}")


if __name__ == "__main__":
    main()

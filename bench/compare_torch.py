#!/usr/bin/env python3
"""Attend next to what users would call instead, measured in one run.

For each shape: Attend (through `attend bench --json`), PyTorch's
scaled_dot_product_attention, and the seed module's own math path (the original
naturalspeech2-pytorch module, exec'd from the seed file named by --seed-file or
$ATTEND_SEED_FILE; small shapes only: it needs n*m memory), all fp32 on the CPU
with the same thread count, plus this machine's FMA peak from fma_peak; then
float16 and bfloat16 rows: Attend's 16-bit kernels next to SDPA on tensors of
that dtype (the seed's math path only in fp32).

Prints a table (GFLOP/s, ratio to SDPA, fraction of the peak), writes the
figures as JSON and a PNG plot of GFLOP/s against n.

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -r bench/requirements.txt
    export ATTEND_SEED_FILE=/path/to/000_edd5e010b2cbceaa.txt  # tools/seed_module.py says what it is
    .venv-bench/bin/python bench/compare_torch.py [--repeats 7] [--quick]

Without the seed file, --seed-math-max-n 0 runs everything but the seed's column.

GFLOP/s count 4*b*h*n*m*d, halved for causal. Times are medians: of --repeats
calls per round, then over --rounds rounds in which Attend and SDPA alternate.
Then decoding (a few queries over a long KV cache, fp32): milliseconds, and the
rate at which each reads k and v (GB/s: 1e9 bytes per second) as a fraction of
this machine's memory bandwidth (mem_bw, measured in the same run; its fastest
pass, so Attend's rate is also given from its fastest call); SDPA gets
grouped-query k and v with enable_gqa. Last, the memory one Attend call adds at
n=m=--memory-n (peak RSS growth).
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
sys.path.insert(0, str(REPO / "tools"))


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=str(REPO / "build"), help="Attend build folder")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every implementation")
    ap.add_argument("--repeats", type=int, default=7,
                    help="timed calls per implementation, shape and round (20x that below n=1024)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="Attend and SDPA alternate this many times per shape; each figure is the median over rounds")
    ap.add_argument("--memory-n", type=int, default=16384, help="n=m of the memory measurement (0: none)")
    ap.add_argument("--quick", action="store_true", help="only n=m in {64, 256, 1024}")
    ap.add_argument("--seed-math-max-n", type=int, default=1024,
                    help="largest n for the seed's math path (0: no seed math column, no seed file needed)")
    ap.add_argument("--seed-file", help="the seed file with the original Attend module (default: $ATTEND_SEED_FILE)")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16", help="which rows to run, by dtype")
    ap.add_argument("--no-decode", action="store_true", help="without the decoding rows")
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "compare_torch.json"))
    ap.add_argument("--plot", default=str(REPO / "bench" / "results" / "compare_torch.png"))
    return ap.parse_args()


def shapes(quick):
    """(name, b, h, n, d, causal, mask, multi_query): naturalspeech2-like, b*h = 16."""
    sizes = [64, 256, 1024] if quick else [64, 256, 1024, 4096]
    out = []
    for n in sizes:
        for d in (64, 128):
            for causal in (False, True):
                out.append(dict(b=2, h=8, n=n, d=d, causal=causal, mask=False, mq=False))
    out.append(dict(b=2, h=8, n=1024, d=64, causal=False, mask=True, mq=False))
    out.append(dict(b=2, h=8, n=1024, d=64, causal=False, mask=False, mq=True))
    for s in out:
        s["dtype"] = "float32"
    for dtype in ("float16", "bfloat16"):
        for n in (256, 1024):
            for causal in (False, True):
                out.append(dict(b=2, h=8, n=n, d=64, causal=causal, mask=False, mq=False, dtype=dtype))
    return out


def decode_shapes():
    """Decoding: n new queries (1 or a few) over m cached keys, fp32."""
    out = [dict(b=1, h=8, hk=8, n=1, m=m, d=d) for m in (8192, 65536) for d in (64, 128)]
    out += [dict(b=4, h=16, hk=16, n=1, m=4096, d=128), dict(b=2, h=8, hk=8, n=8, m=4096, d=64),
            dict(b=2, h=8, hk=8, n=16, m=4096, d=64), dict(b=1, h=32, hk=8, n=1, m=32768, d=128)]
    for s in out:
        s.update(causal=False, mask=False, mq=False, dtype="float32")
    return out


def kv_bytes(s):
    return 2.0 * 4 * s["b"] * s["hk"] * s["m"] * s["d"]


def mem_bw(build, threads):
    """Streaming read bandwidth in GB/s: "<threads> threads read <GB/s> GB/s over <MiB> MiB"."""
    return measured_ceiling(build, threads, "mem_bw", 3)


def decode_sdpa_ms(torch, s, repeats):
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(0)
    q = torch.randn(s["b"], s["h"], s["n"], s["d"], generator=g)
    k = torch.randn(s["b"], s["hk"], s["m"], s["d"], generator=g)
    v = torch.randn(s["b"], s["hk"], s["m"], s["d"], generator=g)
    with torch.no_grad():
        return median_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=s["hk"] != s["h"]), repeats)


def decode_rows(args, torch):
    """Attend (the kernel the call picks) and SDPA on decoding shapes, against mem_bw."""
    bandwidths = [b for b in (mem_bw(args.build, args.threads) for _ in range(3)) if b]
    header = (f"{'decoding, fp32':<36}{'Attend ms':>10}{'SDPA ms':>9}{'SDPA/Attend':>13}{'Attend GB/s':>13}"
              f"{'of mem_bw':>10}{'best GB/s':>11}{'of mem_bw':>10}{'SDPA GB/s':>11}  kernel")
    print("\n" + header + "\n" + "-" * len(header))
    rows = []
    for s in decode_shapes():
        attend_times, attend_best, sdpa_times, kernel = [], [], [], None
        for _ in range(args.rounds):
            r = attend_bench(args.build, s, 10 * args.repeats, args.threads)
            attend_times.append(r["median_ms"])
            attend_best.append(r["ms"])  # the fastest call of the round
            kernel = r.get("kernel")
            sdpa_times.append(decode_sdpa_ms(torch, s, 10 * args.repeats))
        bandwidths += [b for b in [mem_bw(args.build, args.threads)] if b]
        attend, sdpa = statistics.median(attend_times), statistics.median(sdpa_times)
        gbs = kv_bytes(s) / attend / 1e6
        # mem_bw reports its fastest pass (noise only lowers a rate), so Attend's
        # fastest call is the like-for-like figure; the median is the usual one.
        best_gbs = kv_bytes(s) / min(attend_best) / 1e6
        rows.append(dict(s, attend_ms=attend, sdpa_ms=sdpa, sdpa_over_attend=sdpa / attend, attend_gbs=gbs,
                         attend_best_ms=min(attend_best), attend_best_gbs=best_gbs,
                         sdpa_gbs=kv_bytes(s) / sdpa / 1e6, kernel=kernel))
        bw = max(bandwidths) if bandwidths else None
        name = f"b={s['b']} h={s['h']}{'' if s['hk'] == s['h'] else ' hk=' + str(s['hk'])} n={s['n']} m={s['m']} d={s['d']}"
        print(f"{name:<36}{attend:>10.2f}{sdpa:>9.2f}{sdpa / attend:>12.2f}x{gbs:>13.1f}"
              f"{(f'{gbs / bw:.0%}' if bw else '-'):>10}{best_gbs:>11.1f}{(f'{best_gbs / bw:.0%}' if bw else '-'):>10}"
              f"{rows[-1]['sdpa_gbs']:>11.1f}  {kernel}", flush=True)
    bw = ceiling_of(rows, bandwidths, "attend_gbs", "fraction_of_mem_bw",
                    "mem_bw in GB/s (k and v of each row are 2*4*b*hk*m*d bytes)")
    for row in rows:
        row["best_fraction_of_mem_bw"] = row["attend_best_gbs"] / bw if bw else None
    return rows, bw, bandwidths


def flops(s):
    return 4.0 * s["b"] * s["h"] * s["n"] * s["n"] * s["d"] * (0.5 if s["causal"] else 1.0)


def label(s):
    extra = "".join([" causal" if s["causal"] else "", " mask" if s["mask"] else "", " mq" if s["mq"] else ""])
    dtype = "" if s["dtype"] == "float32" else f" {s['dtype']}"
    return f"n={s['n']} d={s['d']}{extra}{dtype}"


def measured_ceiling(build, threads, tool, word):
    """The figure bench/<tool>.c prints as its word-th word (from 0), run with `threads`
    OpenMP threads; None where the build has no such tool (no OpenMP)."""
    exe = Path(build) / "bench" / tool
    if not exe.exists():
        return None
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    fields = subprocess.run([str(exe)], capture_output=True, text=True, env=env, check=True).stdout.split()
    return float(fields[word])


def ceiling_of(rows, measurements, figure, fraction, what):
    """The run's ceiling, the largest of its measurements (noise only lowers one):
    sets row[fraction] = row[figure] / ceiling and prints how it was found."""
    ceiling = max(measurements) if measurements else None
    for row in rows:
        row[fraction] = row[figure] / ceiling if ceiling else None
    if ceiling:
        print(f"\n{what}: {ceiling:.1f}, the largest of {len(measurements)} measurements in this run "
              f"(smallest {min(measurements):.1f})")
    return ceiling


def seed_attend_class(args, program, wanted=True):
    """The original module's class from the seed file (--seed-file or $ATTEND_SEED_FILE)
    when the run wants its column (--seed-math-max-n > 0), else None; exits with the
    reason when the file cannot be loaded."""
    if args.seed_math_max_n <= 0 or not wanted:
        return None
    from seed_module import SeedFileError, load_attend
    try:
        return load_attend(args.seed_file)
    except SeedFileError as error:
        sys.exit(f"{program}: {error} (--seed-math-max-n 0 runs without the seed's math path)")


def fma_peak(build, threads):
    """The fp32 FMA peak in GFLOP/s: "<threads> <isa> <GFLOP/s>"."""
    return measured_ceiling(build, threads, "fma_peak", 2)


def attend_bench(build, s, repeats, threads):
    cmd = [str(Path(build) / "bin" / "attend"), "bench", "--b", str(s["b"]), "--h", str(s["h"]), "--n", str(s["n"]),
           "--m", str(s.get("m", s["n"])), "--d", str(s["d"]), "--repeats", str(repeats), "--dtype", s["dtype"], "--json"]
    cmd += ["--causal"] if s["causal"] else []
    cmd += ["--mask"] if s["mask"] else []
    cmd += ["--kv-heads", "0"] if s["mq"] else ["--kv-heads", str(s["hk"])] if "hk" in s else []
    cmd += ["--backward"] if s.get("backward") else []
    env = dict(os.environ, HL_NUM_THREADS=str(threads))
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def median_ms(call, repeats):
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def torch_inputs(torch, s):
    g = torch.Generator().manual_seed(0)
    b, h, n, d = s["b"], s["h"], s["n"], s["d"]
    q = torch.randn(b, h, n, d, generator=g)
    kv_shape = (b, n, d) if s["mq"] else (b, h, n, d)
    k, v = torch.randn(*kv_shape, generator=g), torch.randn(*kv_shape, generator=g)
    mask = None
    if s["mask"]:
        mask = torch.ones(b, n, dtype=torch.bool)
        mask[:, n * 9 // 10:] = False  # the last 10 % of keys padded, as `attend bench --mask`
    dtype = getattr(torch, s["dtype"])
    return q.to(dtype), k.to(dtype), v.to(dtype), mask


def sdpa_ms(torch, s, repeats):
    import torch.nn.functional as F
    q, k, v, mask = torch_inputs(torch, s)
    if s["mq"]:  # SDPA needs k/v per head: what a user would pass (a broadcast view)
        k, v = k[:, None].expand(-1, s["h"], -1, -1), v[:, None].expand(-1, s["h"], -1, -1)
    attn_mask = mask[:, None, None, :] if mask is not None else None
    with torch.no_grad():
        return median_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=s["causal"]),
                         repeats)


def seed_math_ms(torch, attend_class, s, repeats):
    q, k, v, mask = torch_inputs(torch, s)
    module = attend_class(dropout=0.0, causal=s["causal"], use_flash=False).eval()
    with torch.no_grad():
        return median_ms(lambda: module(q, k, v, mask=mask), repeats)


def table_row(row, peak):
    attend, seed = row["attend_gflops"], row["seed_math_gflops"]
    return (f"{label(row):<36}{attend:>9.1f}{row['sdpa_gflops']:>9.1f}{(f'{seed:.1f}' if seed else '-'):>11}"
            f"{row['ratio_to_sdpa']:>12.2f}x{(f'{attend / peak:.0%}' if peak else '-'):>9}")


def main():
    args = parse_args()
    import torch
    torch.set_num_threads(args.threads)
    attend_class = seed_attend_class(args, "compare_torch", "float32" in args.dtypes.split(","))
    # The FMA peak is measured before every shape too: noise only lowers a
    # measurement, so the largest of the run is the peak the fractions use.
    peaks = [p for p in (fma_peak(args.build, args.threads) for _ in range(3)) if p]
    print(f"threads {args.threads}; torch {torch.__version__} (cpu capability {torch.backends.cpu.get_cpu_capability()})")
    header = f"{'shape':<36}{'Attend':>9}{'SDPA':>9}{'seed math':>11}{'Attend/SDPA':>13}{'of peak':>9}"
    print(header + "\n" + "-" * len(header))
    rows = []
    for s in [s for s in shapes(args.quick) if s["dtype"] in args.dtypes.split(",")]:
        peaks += [p for p in [fma_peak(args.build, args.threads)] if p]
        gf = flops(s) / 1e6
        attend_times, sdpa_times = [], []
        # Short calls get more of them (20x below n=1024): a fresh `attend bench`
        # process needs some calls to settle (thread pool, first page touches).
        calls = args.repeats if s["n"] >= 1024 else 20 * args.repeats
        for _ in range(args.rounds):  # alternating, so that a slow spell of the machine hits both
            attend_times.append(attend_bench(args.build, s, calls, args.threads)["median_ms"])
            sdpa_times.append(sdpa_ms(torch, s, calls))
        attend = gf / statistics.median(attend_times)
        sdpa = gf / statistics.median(sdpa_times)
        with_seed = attend_class is not None and s["n"] <= args.seed_math_max_n and s["dtype"] == "float32"
        seed = gf / seed_math_ms(torch, attend_class, s, min(args.repeats, 3)) if with_seed else None
        rows.append(dict(s, attend_gflops=attend, sdpa_gflops=sdpa, seed_math_gflops=seed, ratio_to_sdpa=attend / sdpa))
        print(table_row(rows[-1], max(peaks) if peaks else None), flush=True)
    peak = ceiling_of(rows, peaks, "attend_gflops", "fraction_of_peak", "FMA peak in GFLOP/s")
    if peak:
        print("The table with every fraction against it:\n" + header + "\n" + "-" * len(header))
        for row in rows:
            print(table_row(row, peak))
    decode, bandwidth, bandwidths = ([], None, []) if args.no_decode else decode_rows(args, torch)
    memory = None
    if args.memory_n:
        # The host memory one call adds (attend bench resets the peak RSS before its
        # calls): no n x m buffer, only per-task state.
        s = dict(b=2, h=8, n=args.memory_n, d=64, causal=True, mask=False, mq=False, dtype="float32")
        r = attend_bench(args.build, s, 1, args.threads)
        inputs_mib = 4 * s["b"] * s["h"] * s["n"] * s["d"] * 4 / 2**20
        memory = dict(shape=s, extra_memory_mib=r.get("extra_memory_mib"), q_k_v_out_mib=inputs_mib,
                      scores_would_take_mib=4 * s["b"] * s["h"] * s["n"] * s["n"] / 2**20)
        print(f"memory: b=2, h=8, n=m={s['n']}, d=64 causal: {memory['extra_memory_mib']:.1f} MiB added by the call "
              f"(q, k, v and out: {inputs_mib:.0f} MiB; the scores would take {memory['scores_would_take_mib']:.0f} MiB)")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(dict(threads=args.threads, fma_peak_gflops=peak, fma_peak_measurements=peaks,
                                               torch=torch.__version__,
                                               rounds=args.rounds, repeats=args.repeats, rows=rows, memory=memory,
                                               decode=decode, mem_bw_gbs=bandwidth, mem_bw_measurements=bandwidths),
                                          indent=1))
    if any(r["dtype"] == "float32" for r in rows):
        plot(rows, peak, args.plot, decode, bandwidth)
        print(f"wrote {args.json} and {args.plot}")
    else:
        print(f"wrote {args.json}")


def plot(rows, peak, path, decode=(), bandwidth=None, what="fp32"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3 if decode else 2, figsize=(16.5 if decode else 11, 4.2),
                             gridspec_kw=dict(width_ratios=[1, 1, 1.2] if decode else [1, 1]))
    axes[1].sharey(axes[0])
    for ax, d in zip(axes, (64, 128)):
        for impl, key, style in (("Attend", "attend_gflops", "o"), ("PyTorch SDPA", "sdpa_gflops", "s"),
                                 ("seed math path", "seed_math_gflops", "^")):
            for causal in (False, True):
                pts = [(r["n"], r[key]) for r in rows
                       if r["d"] == d and r["causal"] == causal and not r["mask"] and not r["mq"] and r[key]
                       and r["dtype"] == "float32"]
                if pts:
                    ax.plot(*zip(*pts), style, linestyle="--" if causal else "-",
                            label=f"{impl}{' causal' if causal else ''}")
        if peak:
            ax.axhline(peak, color="gray", linewidth=1)
            ax.text(min(r["n"] for r in rows), peak * 0.97, "FMA peak", va="top", fontsize=8, color="gray")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("n = m")
        ax.set_title(f"{what}, b=2, h=8, d={d}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("GFLOP/s")
    axes[1].legend(fontsize=7)
    if decode:  # decoding: the rate of reading k and v, against the memory bandwidth
        ax = axes[2]
        names = [f"b{r['b']} h{r['h']}{'' if r['hk'] == r['h'] else '/' + str(r['hk'])} n{r['n']}\nm{r['m']} d{r['d']}"
                 for r in decode]
        x = range(len(decode))
        ax.bar([i - 0.2 for i in x], [r["attend_gbs"] for r in decode], 0.4, label="Attend (the kernel each call picks)")
        ax.bar([i + 0.2 for i in x], [r["sdpa_gbs"] for r in decode], 0.4, label="PyTorch SDPA")
        if bandwidth:
            ax.axhline(bandwidth, color="gray", linewidth=1)
            ax.text(-0.4, bandwidth * 0.97, "mem_bw", va="top", fontsize=8, color="gray")
        ax.set_xticks(list(x))
        ax.set_xticklabels(names, fontsize=6)
        ax.set_ylabel("GB/s of k and v read")
        ax.set_title("decoding, fp32")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()

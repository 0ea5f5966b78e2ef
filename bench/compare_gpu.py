#!/usr/bin/env python3
"""Every GPU kernel variant of the build next to PyTorch SDPA on the same GPU.

For each shape (fp32, b=2, h=8, n=m in {1024, 4096, 16384}, d in {64, 128},
causal and not): `attend bench --device cuda --kernel K --json` for every CUDA
variant of the build, and torch.nn.functional.scaled_dot_product_attention on
the same GPU (TF32 off, so both are fp32 FMA work). Then float16 and bfloat16:
the 16-bit kernels (float32 arithmetic inside) next to SDPA in that dtype
(whose tensor-core kernels are a different class of hardware: the ratio says
what 16-bit users give up). Prints TFLOP/s, the ratio
to SDPA and the fraction of the GPU's fp32 FMA peak (SMs x 128 lanes x 2 x the
largest SM clock, from torch and nvidia-smi), and writes every figure as one
JSON line per measurement (so a run cut short keeps what it measured).
Last, the backward: the build's float32 backward kernel (`attend bench
--backward`) against SDPA's backward through autograd (n=m up to 4096).

    python3 bench/compare_gpu.py --build build --out bench/results/gpu

--device opencl --quick dry-runs the same flow without a GPU (PoCL; SDPA on the CPU).
TFLOP/s count 4*b*h*n*m*d, halved for causal. Times are medians of samples taken
after 0.2 s of warm-up calls, each sample a batch of calls (about 20 ms) with one
wait at its end, for both Attend and SDPA.

GPU time is scarce, so the run is ordered by what matters most (float32 first)
and --time-limit S stops starting measurements after S seconds: what was not
measured is listed at the end, not silently dropped.
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


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=str(REPO / "build"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "opencl"])
    ap.add_argument("--quick", action="store_true", help="n=m in {256} only, d=64 (dry run)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "gpu"))
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--time-limit", type=float, default=0,
                    help="seconds after which no further measurement starts (0: no limit)")
    return ap.parse_args()


def shapes(quick):
    if quick:
        return [dict(b=1, h=2, n=256, d=64, causal=c) for c in (False, True)]
    return [dict(b=2, h=8, n=n, d=d, causal=c) for d in (64, 128) for n in (1024, 4096, 16384) for c in (False, True)]


def flops(s):
    return 4.0 * s["b"] * s["h"] * s["n"] * s["n"] * s["d"] * (0.5 if s["causal"] else 1.0)


def repeats(s):
    return 3 if s["n"] >= 16384 else 7


WARM_UP_MS, SAMPLE_MS = 200, 20  # the same as attend bench's on a GPU


SUFFIX = {"float32": "", "float16": "_f16", "bfloat16": "_bf16"}


def dtype_of(kernel):
    return next((t for t, suffix in SUFFIX.items() if suffix and kernel.endswith(suffix)), "float32")


def attend_bench(build, device, kernel, s, key_splits=0, dtype="float32", backward=False):
    exe = Path(build) / "bin" / "attend"
    args = [str(exe), "bench", "--device", device, "--kernel", kernel, "--dtype", dtype, "--b", str(s["b"]), "--h", str(s["h"]),
            "--n", str(s["n"]), "--m", str(s["n"]), "--d", str(s["d"]), "--repeats", str(repeats(s)), "--json",
            "--key-splits", str(key_splits)]
    if s["causal"]:
        args.append("--causal")
    if backward:
        args.append("--backward")
    r = subprocess.run(args, capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout).strip()[-400:]}
    return json.loads(r.stdout.strip().splitlines()[-1])


def torch_sdpa(s, on_gpu, dtype="float32", backward=False):
    import torch
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    dev = "cuda" if on_gpu else "cpu"
    g = torch.Generator(device=dev).manual_seed(0)
    shape = (s["b"], s["h"], s["n"], s["d"])
    q, k, v = (torch.randn(shape, device=dev, generator=g).to(getattr(torch, dtype)) for _ in range(3))
    f = torch.nn.functional.scaled_dot_product_attention
    if backward:  # the backward alone: the graph built once, backward(retain_graph) per call
        for t in (q, k, v):
            t.requires_grad_(True)
        out = f(q, k, v, is_causal=s["causal"])
        dout = torch.randn_like(out)

        def f(q, k, v, is_causal):  # noqa: F811 (the timed call)
            out.backward(dout, retain_graph=True)

    def elapsed_ms(calls):  # `calls` calls back to back, one wait at the end
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                f(q, k, v, is_causal=s["causal"])
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        for _ in range(calls):
            f(q, k, v, is_causal=s["causal"])
        return (time.perf_counter() - t0) * 1e3

    # As `attend bench` times a GPU: a first call, calls for WARM_UP_MS (clocks rise
    # under load), then samples of as many calls as fill about SAMPLE_MS. (SDPA's
    # samples are timed by CUDA events, attend's by the host clock around the batch
    # and its wait: at 20 ms per sample the difference is a launch, microseconds.)
    elapsed_ms(1)  # the first call sets up (not a warm-up sample)
    warm_up_ms, warm_up_calls = 0.0, 0
    while warm_up_ms < WARM_UP_MS:
        warm_up_ms += elapsed_ms(1)
        warm_up_calls += 1
    batch = max(1, min(1000, int(SAMPLE_MS / max(warm_up_ms / warm_up_calls, 1e-3))))
    return statistics.median(elapsed_ms(batch) / batch for _ in range(repeats(s)))


def report(prefix, r, sdpa, peak):
    """One measurement's line: TFLOP/s (or the error), the ratio to SDPA, the fraction of the peak."""
    tf = r.get("tflops")
    line = prefix + (f"{tf:8.2f} TFLOP/s" if tf else f"error: {r['error'][:120]}")
    if tf and sdpa:
        line += f"  {tf / sdpa:5.2f}x SDPA ({sdpa:.2f})"
    if tf and peak:
        line += f"  {tf / peak:5.1%} of peak"
    return line


def fp32_peak_tflops():
    """SMs x 128 fp32 lanes x 2 flops x the largest SM clock."""
    try:
        import torch
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        mhz = float(subprocess.run(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"],
                                   capture_output=True, text=True).stdout.split()[0])
        return sms * 128 * 2 * mhz * 1e6 / 1e12, torch.cuda.get_device_name(0)
    except Exception as e:  # no GPU (dry run)
        return None, f"no CUDA GPU ({e.__class__.__name__})"


def main():
    a = parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    kernels = subprocess.run([str(Path(a.build) / "bin" / "attend"), "kernels"], capture_output=True, text=True).stdout
    # `attend kernels` lines: name, operation, device, ...
    variants = [line.split()[0] for line in kernels.splitlines()
                if line.strip().startswith(f"attend_{a.device}_") and line.split()[1] == "forward,"]
    peak, gpu = fp32_peak_tflops()
    try:
        import torch
        on_gpu = a.device == "cuda" and torch.cuda.is_available()
    except ImportError:
        torch, on_gpu = None, False
    print(f"GPU: {gpu}; fp32 FMA peak: {peak:.1f} TFLOP/s" if peak else f"GPU: {gpu}")
    log = open(out / "compare_gpu.jsonl", "a")
    rows, not_run = [], []
    start = time.monotonic()

    def out_of_time():
        return a.time_limit > 0 and time.monotonic() - start > a.time_limit

    for dtype, s in [(t, s) for t in a.dtypes.split(",") for s in shapes(a.quick)]:
        name = f"{dtype} n=m={s['n']} d={s['d']}{' causal' if s['causal'] else ''}"
        if out_of_time():
            not_run.append(f"{name}: every variant, and SDPA")
            continue
        sdpa_ms = torch_sdpa(s, on_gpu, dtype) if torch else None
        sdpa = flops(s) / sdpa_ms / 1e9 if sdpa_ms else None
        entry = dict(shape=s, dtype=dtype, gpu=gpu, peak_tflops=peak, sdpa_ms=sdpa_ms, sdpa_tflops=sdpa, attend={})
        candidates = [v for v in variants if f"_d{s['d']}_" in v and dtype_of(v) == dtype]
        if s["n"] >= 16384:  # the largest size only for variants within half of the best at the size before
            before = [e for e in rows if e["shape"]["d"] == s["d"] and e["shape"]["causal"] == s["causal"]
                      and e["dtype"] == dtype]
            speeds = {k: r.get("tflops", 0) for k, r in before[-1]["attend"].items()} if before else {}
            if speeds:
                candidates = [k for k in candidates if speeds.get(k, 0) >= 0.5 * max(speeds.values())]
        # The default variant once more with fixed numbers of key chunks: one pass
        # (key_splits=1) shows what chunks in parallel bring, 8 and 16 whether the
        # automatic choice is too few. (float32 only: the 16-bit kernels have the
        # same structure, so their chunks would say the same.)
        runs = [(k, 0) for k in candidates]
        if candidates and s["n"] < 16384 and dtype == "float32":  # (at 16384 the automatic choice is 1 already)
            runs += [(candidates[0], splits) for splits in (1, 8, 16)]
        for kernel, key_splits in runs:
            label = kernel + (f"/splits={key_splits}" if key_splits else "")
            if out_of_time():
                not_run.append(f"{name} {label}")
                continue
            r = attend_bench(a.build, a.device, kernel, s, key_splits, dtype)
            if "error" not in r:
                r["tflops"] = flops(s) / r["median_ms"] / 1e9
            entry["attend"][label] = r
            print(report(f"{name:37s} {label:32s} ", r, sdpa, peak), flush=True)
        log.write(json.dumps(entry) + "\n")
        log.flush()
        rows.append(entry)
    # The backward (float32): the build's backward kernel against SDPA's backward
    # through autograd, both counted as 10*b*h*n*m*d (halved for causal).
    backward_kernels = [line.split()[0] for line in kernels.splitlines()
                        if line.strip().startswith(f"attend_{a.device}_") and line.split()[1] == "backward,"]
    for s in [s for s in shapes(a.quick) if s["n"] <= 4096] if "float32" in a.dtypes.split(",") else []:
        name = f"backward float32 n=m={s['n']} d={s['d']}{' causal' if s['causal'] else ''}"
        kernel = next((k for k in backward_kernels if k.endswith(f"_d{s['d']}")), None)
        if out_of_time() or kernel is None:
            not_run.append(f"{name}" + ("" if kernel else " (no backward kernel for this head dim)"))
            continue
        sdpa_ms = torch_sdpa(s, on_gpu, "float32", backward=True) if torch else None
        backward_flops = 2.5 * flops(s)
        sdpa = backward_flops / sdpa_ms / 1e9 if sdpa_ms else None
        r = attend_bench(a.build, a.device, kernel, s, backward=True)
        if "error" not in r:
            r["tflops"] = backward_flops / r["median_ms"] / 1e9
        entry = dict(shape=s, dtype="float32", operation="backward", gpu=gpu, peak_tflops=peak, sdpa_ms=sdpa_ms,
                     sdpa_tflops=sdpa, attend={kernel: r})
        print(report(f"{name:46s} {kernel:28s} ", r, sdpa, peak), flush=True)
        log.write(json.dumps(entry) + "\n")
        log.flush()
        rows.append(entry)
    print("\nbest variant per shape:")
    for e in rows:
        s = e["shape"]
        best = max(((k, r["tflops"]) for k, r in e["attend"].items() if "tflops" in r), key=lambda x: x[1], default=None)
        if best:
            ratio = f"{best[1] / e['sdpa_tflops']:.2f}x SDPA" if e["sdpa_tflops"] else ""
            print(f"  {e.get('operation', 'forward'):8s} {e['dtype']:8s} n=m={s['n']:<6} d={s['d']:<4} "
                  f"{'causal' if s['causal'] else '      '} {best[0]:32s} "
                  f"{best[1]:7.2f} TFLOP/s {ratio}")
    if not_run:
        print(f"\nnot run: --time-limit {a.time_limit:g} s was reached after {time.monotonic() - start:.0f} s")
        for what in not_run:
            print(f"  {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

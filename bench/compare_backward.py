#!/usr/bin/env python3
"""Attend's backward next to PyTorch's, measured in one run.

For each shape: the backward alone (dq, dk, dv from the forward's out and lse
and dout) of Attend (`attend bench --backward --json`), of PyTorch's
scaled_dot_product_attention through autograd, and of the seed module's math
path through autograd (small shapes only: it keeps the n*m weights), fp32 on
the CPU with the same thread count, plus this machine's FMA peak (fma_peak).

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -r bench/requirements.txt
    export ATTEND_SEED_FILE=/path/to/000_edd5e010b2cbceaa.txt  # tools/seed_module.py says what it is
    .venv-bench/bin/python bench/compare_backward.py [--repeats 5] [--quick]

Then one training step (forward and backward, dropout 0.1 and a padding mask:
the seed's training case) through Attend's Python package (attend.torch.Attend,
from --build's python/ folder), through SDPA with dropout_p (on the CPU PyTorch
runs it on its math path) and through the seed module itself.

GFLOP/s count the backward's five matrix products, 10*b*h*n*m*d (2.5 times the
forward's), halved for causal, for every implementation. Times are medians of
--repeats calls per round, then over --rounds rounds in which the
implementations alternate.
"""
import argparse
import json
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "bench"))
from compare_torch import attend_bench, ceiling_of, fma_peak, median_ms, plot, seed_attend_class, torch_inputs  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", default=str(REPO / "build"), help="Attend build folder")
    ap.add_argument("--threads", type=int, default=os.cpu_count(), help="threads for every implementation")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per implementation, shape and round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds in which the implementations alternate")
    ap.add_argument("--quick", action="store_true", help="only n=m in {256, 1024}")
    ap.add_argument("--seed-math-max-n", type=int, default=1024,
                    help="largest n for the seed's math path (0: no seed math column, no seed file needed)")
    ap.add_argument("--seed-file", help="the seed file with the original Attend module (default: $ATTEND_SEED_FILE)")
    ap.add_argument("--training-n", type=int, nargs="*", default=[1024],
                    help="n = m of the training-step rows (none: no training step)")
    ap.add_argument("--json", default=str(REPO / "bench" / "results" / "compare_backward.json"))
    ap.add_argument("--plot", default=str(REPO / "bench" / "results" / "compare_backward.png"))
    return ap.parse_args()


def shapes(quick):
    """naturalspeech2-like, b*h = 16, fp32."""
    out = []
    for n in ([256, 1024] if quick else [256, 1024, 4096]):
        for d in (64, 128):
            for causal in (False, True):
                out.append(dict(b=2, h=8, n=n, d=d, causal=causal, mask=False, mq=False, dtype="float32"))
    out.append(dict(b=2, h=8, n=1024, d=64, causal=False, mask=True, mq=False, dtype="float32"))
    out.append(dict(b=2, h=8, n=1024, d=64, causal=False, mask=False, mq=True, dtype="float32"))
    return out


def flops(s):
    return 10.0 * s["b"] * s["h"] * s["n"] * s["n"] * s["d"] * (0.5 if s["causal"] else 1.0)


def label(s):
    extra = "".join([" causal" if s["causal"] else "", " mask" if s["mask"] else "", " mq" if s["mq"] else ""])
    return f"n={s['n']} d={s['d']}{extra}"


def autograd_backward_ms(torch, forward, s, repeats):
    """The backward alone: the graph is built once, then backward(retain_graph) timed."""
    q, k, v, mask = torch_inputs(torch, s)
    for t in (q, k, v):
        t.requires_grad_(True)
    out = forward(q, k, v, mask)
    dout = torch.randn_like(out)

    def step():
        for t in (q, k, v):
            t.grad = None
        out.backward(dout, retain_graph=True)

    return median_ms(step, repeats)


def sdpa_forward(torch, s):
    import torch.nn.functional as F

    def forward(q, k, v, mask):
        if s["mq"]:  # SDPA needs k/v per head: what a user would pass (a broadcast view)
            k, v = k[:, None].expand(-1, s["h"], -1, -1), v[:, None].expand(-1, s["h"], -1, -1)
        attn_mask = mask[:, None, None, :] if mask is not None else None
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=s["causal"])

    return forward


def training_step_ms(torch, module, s, repeats):
    """One training step: forward in training mode, then backward of out·dout."""
    q, k, v, mask = torch_inputs(torch, s)
    for t in (q, k, v):
        t.requires_grad_(True)
    dout = torch.randn(q.shape[:-1] + (v.shape[-1],), generator=torch.Generator().manual_seed(1))
    module.train()

    def step():
        for t in (q, k, v):
            t.grad = None
        module(q, k, v, mask).backward(dout)

    return median_ms(step, repeats)


class SdpaDropout:
    """SDPA with the seed module's call signature: dropout_p in training mode."""

    def __init__(self, torch, dropout, causal):
        import torch.nn.functional as F
        self.F, self.dropout, self.causal, self.training = F, dropout, causal, True

    def train(self):
        self.training = True

    def __call__(self, q, k, v, mask):
        attn_mask = mask[:, None, None, :] if mask is not None else None
        return self.F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=self.causal,
                                                   dropout_p=self.dropout if self.training else 0.0)


def training_steps(args, torch, attend_class):
    """The seed's training case: Attend's package against SDPA and the seed module."""
    sys.path.insert(0, str(Path(args.build) / "python"))
    import attend.torch as attend_torch
    header = f"{'training step, dropout 0.1':<32}{'Attend ms':>11}{'SDPA ms':>10}{'seed ms':>10}{'SDPA/Attend':>13}"
    print("\n" + header + "\n" + "-" * len(header))
    rows = []
    for n in args.training_n:
        s = dict(b=2, h=8, n=n, d=64, causal=False, mask=True, mq=False, dtype="float32")
        implementations = dict(attend=attend_torch.Attend(dropout=0.1), sdpa=SdpaDropout(torch, 0.1, False))
        if attend_class is not None and n <= args.seed_math_max_n:
            implementations["seed"] = attend_class(dropout=0.1, causal=False, use_flash=False)
        times = {name: [] for name in implementations}
        for _ in range(args.rounds):
            for name, module in implementations.items():
                times[name].append(training_step_ms(torch, module, s, args.repeats))
        ms = {name: statistics.median(t) for name, t in times.items()}
        rows.append(dict(s, dropout=0.1, attend_ms=ms["attend"], sdpa_ms=ms["sdpa"], seed_math_ms=ms.get("seed"),
                         sdpa_over_attend=ms["sdpa"] / ms["attend"]))
        seed = f"{ms['seed']:.1f}" if "seed" in ms else "-"
        print(f"{'n=m=' + str(n) + ' d=64 mask':<32}{ms['attend']:>11.1f}{ms['sdpa']:>10.1f}{seed:>10}"
              f"{ms['sdpa'] / ms['attend']:>12.2f}x", flush=True)
    return rows


def main():
    args = parse_args()
    import torch
    torch.set_num_threads(args.threads)
    attend_class = seed_attend_class(args, "compare_backward")
    peaks = [p for p in (fma_peak(args.build, args.threads) for _ in range(3)) if p]
    print(f"threads {args.threads}; torch {torch.__version__} (cpu capability {torch.backends.cpu.get_cpu_capability()})")
    header = f"{'backward, fp32':<28}{'Attend':>9}{'SDPA':>9}{'seed math':>11}{'Attend/SDPA':>13}{'of peak':>9}"
    print(header + "\n" + "-" * len(header))
    rows = []
    for s in shapes(args.quick):
        peaks += [p for p in [fma_peak(args.build, args.threads)] if p]
        gf = flops(s) / 1e6
        attend_times, sdpa_times = [], []
        for _ in range(args.rounds):
            attend_times.append(attend_bench(args.build, dict(s, backward=True), args.repeats, args.threads)["median_ms"])
            sdpa_times.append(autograd_backward_ms(torch, sdpa_forward(torch, s), s, args.repeats))
        seed = None
        if attend_class is not None and s["n"] <= args.seed_math_max_n:
            module = attend_class(dropout=0.0, causal=s["causal"], use_flash=False)
            seed = gf / autograd_backward_ms(torch, lambda q, k, v, mask: module(q, k, v, mask=mask), s,
                                             min(args.repeats, 3))
        attend, sdpa = gf / statistics.median(attend_times), gf / statistics.median(sdpa_times)
        rows.append(dict(s, attend_gflops=attend, sdpa_gflops=sdpa, seed_math_gflops=seed, ratio_to_sdpa=attend / sdpa))
        peak = max(peaks) if peaks else None
        print(f"{label(s):<28}{attend:>9.1f}{sdpa:>9.1f}{(f'{seed:.1f}' if seed else '-'):>11}{attend / sdpa:>12.2f}x"
              f"{(f'{attend / peak:.0%}' if peak else '-'):>9}", flush=True)
    training = training_steps(args, torch, attend_class) if args.training_n else []
    peak = ceiling_of(rows, peaks, "attend_gflops", "fraction_of_peak", "FMA peak in GFLOP/s")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(dict(threads=args.threads, fma_peak_gflops=peak, fma_peak_measurements=peaks,
                                               torch=torch.__version__, rounds=args.rounds, repeats=args.repeats,
                                               rows=rows, training_steps=training), indent=1))
    plot(rows, peak, args.plot, what="fp32 backward")
    print(f"wrote {args.json} and {args.plot}")


if __name__ == "__main__":
    main()

"""python -m attend demo: attention on a built-in example, its accuracy against a
float64 reference and its speed; with torch installed, next to PyTorch's
scaled_dot_product_attention and through attend.torch.Attend; with the original
module installed too (naturalspeech2-pytorch: naturalspeech2_pytorch.attend),
against it, in float64 and for speed. python -m attend kernels: the kernels of
this build.
"""
import argparse
import sys
import time

import numpy as np

import attend


def reference(q, k, v, mask, causal):
    """The seed module's math in float64 (masked scores -finfo(float32).max)."""
    s = np.einsum("bhid,bhjd->bhij", q.astype(np.float64), k.astype(np.float64)) * q.shape[-1] ** -0.5
    allowed = np.ones(s.shape, dtype=bool)
    if mask is not None:
        allowed &= mask[:, None, None, :]
    if causal:
        allowed &= np.tril(np.ones(s.shape[-2:], dtype=bool))
    s = np.where(allowed, s, -np.finfo(np.float32).max)
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhij,bhjd->bhid", w / w.sum(-1, keepdims=True), v.astype(np.float64))


def median_ms(call, repeats=5):
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return float(np.median(times))


def demo():
    rng = np.random.default_rng(0)
    b, h, n, d = 2, 8, 1024, 64
    q, k, v = (rng.standard_normal((b, h, n, d), dtype=np.float32) for _ in range(3))
    mask = np.ones((b, n), dtype=bool)
    mask[1, n * 3 // 4:] = False  # the second batch's last quarter of keys padded
    flops = 4.0 * b * h * n * n * d
    print(f"attend {attend.__version__}: b={b} h={h} n=m={n} d={d}, float32, a padding mask")
    for causal in (False, True):
        out = attend.forward(q, k, v, mask, causal=causal)
        error = float(np.abs(out - reference(q, k, v, mask, causal)).max())
        ms = median_ms(lambda: attend.forward(q, k, v, mask, causal=causal))
        scale = 0.5 if causal else 1.0
        print(f"  {'causal' if causal else 'full  '}  max |error| vs float64 {error:.2e}   {ms:7.2f} ms   "
              f"{flops * scale / ms / 1e6:6.1f} GFLOP/s")
    try:
        import torch
    except ImportError:
        print("(torch is not installed: pip install attend[torch] for the comparison with PyTorch)")
        return 0
    import torch.nn.functional as F
    tq, tk, tv, tmask = (torch.from_numpy(x) for x in (q, k, v, mask))
    ms = median_ms(lambda: F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask[:, None, None, :]))
    print(f"  torch {torch.__version__} scaled_dot_product_attention (full): {ms:7.2f} ms   "
          f"{flops / ms / 1e6:6.1f} GFLOP/s")
    from attend.torch import Attend
    layer = Attend()
    ms = median_ms(lambda: layer(tq, tk, tv, tmask))
    print(f"  attend.torch.Attend (full): {ms:7.2f} ms")
    return original_module(layer, tq, tk, tv, tmask)


def original_module(layer, q, k, v, mask):
    """attend.torch.Attend next to the module it replaces, when that is installed."""
    try:
        from naturalspeech2_pytorch.attend import Attend as Original
    except ImportError:
        print("(the original module, naturalspeech2_pytorch.attend.Attend, is not installed: "
              "pip install naturalspeech2-pytorch for the comparison with it)")
        return 0
    import torch
    original = Original(dropout=0.0, causal=False, use_flash=False).eval()
    with torch.no_grad():
        exact = original(q.double(), k.double(), v.double(), mask=mask)
        error = (layer(q, k, v, mask).double() - exact).abs().max().item()
        ms = median_ms(lambda: original(q, k, v, mask=mask), repeats=3)
    print(f"  the original module (naturalspeech2_pytorch.attend.Attend, math path, full): {ms:7.2f} ms; "
          f"attend.torch.Attend against it in float64: max |error| {error:.2e}")
    return 0 if error < 2e-5 else 1  # the C++ demo's float32 bound at this size (tests/support.hpp)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m attend", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["demo", "kernels"])
    args = ap.parse_args(argv)
    if args.command == "kernels":
        for kernel in attend.kernels():
            print(f"{kernel['name']:36s} {kernel['operation']:8s} {kernel['device']:6s} {kernel['dtype']:8s} "
                  f"{kernel['head_dim'] or 'any'}")
        return 0
    return demo()


if __name__ == "__main__":
    sys.exit(main())

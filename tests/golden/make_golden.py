#!/usr/bin/env python3
"""Generate golden test data for Attend from the original PyTorch module.

The original `Attend` module (naturalspeech2-pytorch, attend.py) comes from the
seed file (000_edd5e010b2cbceaa.txt, not part of this repository), a
markdown-ish file whose Python code sits between the first pair of ``` fence
lines: its path is the first argument, else $ATTEND_SEED_FILE. This script reads
that code, exec's it into a private namespace (the module's code is not
copied into this repository), builds Attend(dropout=0., causal=..,
use_flash=False) in eval mode and runs its math path in float32 on CPU on a
set of small, seeded cases.

Output: tests/golden/data/<case>/{q,k,v[,mask],out,dout,dq,dk,dv}.npy (the
gradients are the module's autograd for the upstream gradient dout) and
tests/golden/data/cases.json. Re-running gives byte-identical files.

Usage:
    ATTEND_SEED_FILE=/path/to/000_edd5e010b2cbceaa.txt .venv-golden/bin/python tests/golden/make_golden.py [--out DIR]
    .venv-golden/bin/python tests/golden/make_golden.py SEED_FILE [--out DIR]
"""
import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent / "tools"))
from seed_module import ENV_VAR, SeedFileError, load_attend  # noqa: E402

DEFAULT_OUT = HERE / "data"


def key_mask(b, m, false_at):
    """Bool [b, m] mask, True everywhere except the (batch, key) pairs in false_at."""
    mask = torch.ones(b, m, dtype=torch.bool)
    for bi, j in false_at:
        mask[bi, j] = False
    return mask


# Each case: name, seed, causal, b, h, n, m, d, dv, multi_query, mask spec, description.
# mask spec: None, or a list of (batch, key) pairs set to False.
CASES = [
    dict(name="plain", seed=1, causal=False, b=2, h=3, n=5, m=7, d=8, dv=8, mq=False, mask=None,
         desc="plain multi-head attention, no mask"),
    dict(name="scale_d16", seed=2, causal=False, b=2, h=2, n=4, m=6, d=16, dv=16, mq=False, mask=None,
         desc="d=16, checks scale = d^-0.5"),
    dict(name="padding_mask", seed=3, causal=False, b=2, h=3, n=5, m=7, d=8, dv=8, mq=False,
         mask=[(0, 5), (0, 6), (1, 0), (1, 3)],
         desc="key padding mask [b, m] with some False entries"),
    dict(name="causal", seed=4, causal=True, b=2, h=2, n=6, m=6, d=8, dv=8, mq=False, mask=None,
         desc="causal (triu(1) masked), n == m"),
    dict(name="causal_mask", seed=5, causal=True, b=2, h=2, n=6, m=6, d=8, dv=8, mq=False,
         mask=[(0, 4), (0, 5), (1, 2)],
         desc="causal combined with key padding mask, no fully masked row"),
    dict(name="multi_query", seed=6, causal=False, b=2, h=3, n=5, m=7, d=8, dv=8, mq=True, mask=None,
         desc="multi-query: k, v are [b, m, d], shared by all heads"),
    dict(name="dv_ne_d", seed=7, causal=False, b=2, h=2, n=5, m=7, d=8, dv=12, mq=False, mask=None,
         desc="v's last dim dv=12 differs from d=8"),
    dict(name="fully_masked_batch", seed=8, causal=False, b=2, h=2, n=4, m=6, d=8, dv=8, mq=False,
         mask=[(1, j) for j in range(6)] + [(0, 2)],
         desc="batch 1 mask all False: every row of batch 1 is the mean of v over all m keys"),
    dict(name="causal_mask_first_keys", seed=9, causal=True, b=2, h=2, n=6, m=6, d=8, dv=8, mq=False,
         mask=[(0, 0), (0, 1), (1, 0)],
         desc="causal + mask of the first keys: query rows 0-1 of batch 0 and row 0 of batch 1 are fully masked (mean of v)"),
    dict(name="n1_m1", seed=10, causal=False, b=2, h=2, n=1, m=1, d=8, dv=8, mq=False, mask=None,
         desc="single query, single key: out = v"),
    dict(name="causal_n13", seed=11, causal=True, b=1, h=2, n=13, m=13, d=8, dv=8, mq=False, mask=None,
         desc="causal with odd size n = m = 13"),
    dict(name="d64_n33", seed=12, causal=False, b=1, h=1, n=33, m=33, d=64, dv=64, mq=False, mask=None,
         desc="d=64, n = m = 33 (odd length, realistic head dim)"),
    dict(name="mq_causal_mask_dv", seed=13, causal=True, b=2, h=3, n=7, m=7, d=8, dv=4, mq=True,
         mask=[(0, 6), (1, 0), (1, 1), (1, 2)],
         desc="multi-query + causal + padding mask + dv=4 != d; batch 1 rows 0-2 fully masked"),
]


def run_case(Attend, c):
    torch.manual_seed(c["seed"])
    b, h, n, m, d, dv = c["b"], c["h"], c["n"], c["m"], c["d"], c["dv"]
    q = torch.randn(b, h, n, d, dtype=torch.float32)
    kv_lead = (b, m) if c["mq"] else (b, h, m)
    k = torch.randn(*kv_lead, d, dtype=torch.float32)
    v = torch.randn(*kv_lead, dv, dtype=torch.float32)
    mask = key_mask(b, m, c["mask"]) if c["mask"] is not None else None
    if c["causal"]:
        assert n == m, "the seed's causal mask is an n x n triu(1): causal cases need n == m"

    attend = Attend(dropout=0., causal=c["causal"], use_flash=False).eval()
    for t in (q, k, v):
        t.requires_grad_(True)
    out = attend(q, k, v, mask=mask)
    assert out.dtype == torch.float32 and tuple(out.shape) == (b, h, n, dv)
    assert torch.isfinite(out).all()
    # The module's gradients (its autograd) for an upstream gradient dout.
    dout = torch.randn(b, h, n, dv, dtype=torch.float32)
    out.backward(dout)

    arrays = {"q": q, "k": k, "v": v}
    if mask is not None:
        arrays["mask"] = mask
    arrays.update(out=out, dout=dout, dq=q.grad, dk=k.grad, dv=v.grad)
    return {name: np.ascontiguousarray(t.detach().numpy()) for name, t in arrays.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("seed_file", nargs="?", default=None,
                    help=f"path to the seed file holding the original attend.py (default: ${ENV_VAR})")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: %(default)s)")
    args = ap.parse_args()

    torch.set_num_threads(1)  # deterministic float32 reductions
    try:
        Attend = load_attend(args.seed_file)
    except SeedFileError as error:
        sys.exit(f"make_golden: {error}")

    out_dir = Path(args.out)
    if out_dir.exists():
        shutil.rmtree(out_dir)  # case folders hold exactly the files written below
    out_dir.mkdir(parents=True)

    index = []
    for c in CASES:
        arrays = run_case(Attend, c)
        case_dir = out_dir / c["name"]
        case_dir.mkdir()
        for name, a in arrays.items():
            assert a.flags["C_CONTIGUOUS"]
            assert a.dtype == (np.bool_ if name == "mask" else np.float32)
            np.save(case_dir / f"{name}.npy", a, allow_pickle=False)
        index.append({
            "name": c["name"],
            "causal": c["causal"],
            "has_mask": "mask" in arrays,
            "multi_query": c["mq"],
            "seed": c["seed"],
            "shapes": {name: list(a.shape) for name, a in arrays.items()},
            "description": c["desc"],
        })
        print(f"wrote {case_dir}: " + ", ".join(f"{n}{list(a.shape)}" for n, a in arrays.items()))

    with open(out_dir / "cases.json", "w", encoding="utf-8") as f:
        json.dump({"torch_version": torch.__version__.split("+")[0],
                   "cases": index}, f, indent=2)
        f.write("\n")
    print(f"wrote {out_dir / 'cases.json'} ({len(index)} cases)")


if __name__ == "__main__":
    main()

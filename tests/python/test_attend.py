"""The Python package: attend.forward/backward and attend.torch.Attend against the
original module (its golden outputs and gradients; the module itself when
$ATTEND_SEED_FILE names the seed file) and a float64 reference, with the C++
tests' tolerances (docs/contract.md section 15); dropout; strides; errors;
torch.library.opcheck; torch.compile; CUDA tensors when a GPU is present."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import attend
from attend.torch import Attend

from conftest import GOLDEN

EPS = float(np.finfo(np.float32).eps)
UNIT_ROUNDOFF = {torch.float32: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
SUBNORMAL = {torch.float32: 0.0, torch.float16: 2.0**-25, torch.bfloat16: 2.0**-134}


# ---- the float64 reference and the bounds -------------------------------------------------

def expand_kv(t, h):
    """k or v per head: [b, m, d] (multi-query) or [b, hk, m, d] repeated to [b, h, m, d]."""
    if t.dim() == 3:
        return t[:, None].expand(-1, h, -1, -1)
    return t.repeat_interleave(h // t.shape[1], dim=1)


def reference_weights(q, k, mask, causal):
    """The seed's math in float64: scores, masked_fill with -finfo(float32).max (so
    a row with every key masked gets uniform weights), softmax; also which
    (row, key) pairs are live (not masked) and which rows have every key masked."""
    h, n, m = q.shape[1], q.shape[2], k.shape[-2]
    s = torch.einsum("bhid,bhjd->bhij", q, expand_kv(k, h)) * q.shape[-1] ** -0.5
    live = torch.ones_like(s, dtype=torch.bool)
    if mask is not None:
        live &= mask[:, None, None, :]
    if causal:
        live &= torch.ones(n, m, dtype=torch.bool).tril()
    weights = s.masked_fill(~live, -float(np.finfo(np.float32).max)).softmax(-1)
    return weights, live, ~live.any(-1, keepdim=True)


def reference(q, k, v, mask, causal, dout):
    """out and (dq, dk, dv) in float64 through autograd, and per gradient element
    the sum of the absolute values of its terms (inner products taken
    absolutely): the scale of the rounding error of a float32 computation."""
    q, k, v, dout = (t.detach().double() for t in (q, k, v, dout))
    for t in (q, k, v):
        t.requires_grad_(True)
    weights, live, all_masked = reference_weights(q, k, mask, causal)
    h = q.shape[1]
    out = torch.einsum("bhij,bhjd->bhid", weights, expand_kv(v, h))
    out.backward(dout)
    with torch.no_grad():
        p = weights * ~all_masked  # fully masked rows: no gradient through their scores
        kh, vh = expand_kv(k, h).abs(), expand_kv(v, h).abs()
        dp_terms = torch.einsum("bhic,bhjc->bhij", dout.abs(), vh)
        row_terms = (p * dp_terms).sum(-1, keepdim=True)
        ds_terms = p * live * (dp_terms + row_terms) * q.shape[-1] ** -0.5
        dq_terms = torch.einsum("bhij,bhjc->bhic", ds_terms, kh)
        dk_terms = torch.einsum("bhij,bhic->bhjc", ds_terms, q.abs())
        dv_terms = torch.einsum("bhij,bhic->bhjc", weights, dout.abs())

        def per_kv_head(t, like):  # sums over the heads that share a kv head
            if like.dim() == 3:
                return t.sum(1)
            return t.reshape(t.shape[0], like.shape[1], -1, *t.shape[2:]).sum(2)

        terms = (dq_terms, per_kv_head(dk_terms, k), per_kv_head(dv_terms, v))
    return out.detach(), (q.grad, k.grad, v.grad), terms


def score_magnitude(q, k):
    rows = lambda t: t.double().reshape(-1, t.shape[-1]).norm(dim=-1).max().item()
    return q.shape[-1] ** -0.5 * rows(q) * rows(k)


def check_out(got, expected, q, k, v):
    """Within the float32 bound of the C++ tests (fp32_tolerance), plus the
    rounding of a 16-bit out."""
    d, m = q.shape[-1], k.shape[-2]
    bound = 4 * EPS * v.double().abs().max().item() * (2 * math.sqrt(d) * score_magnitude(q, k) + math.sqrt(m) + 8)
    u = UNIT_ROUNDOFF[got.dtype]
    error = (got.double() - expected).abs()
    assert torch.isfinite(got).all()
    assert (error <= bound + u * expected.abs()).all(), f"out: largest error {error.max().item():.3g}"


def check_gradients(got, expected, terms, q, k, v, lse_largest, factor=1.0):
    """Each element within the bound of tests/backward_support.hpp, relative to its
    sum of absolute terms, 4 eps (2 sqrt(d) S + sqrt(dv) + L + sqrt(T) + 8), plus
    sqrt(m): here the backward reads the kernel's own forward out, whose m-term
    sums move D by up to that much relative to the same terms."""
    d, dv, m, n = q.shape[-1], v.shape[-1], k.shape[-2], q.shape[-2]
    group_rows = n * (q.shape[1] // (1 if k.dim() == 3 else k.shape[1]))
    for name, g, e, t, outer in zip(("dq", "dk", "dv"), got, expected, terms, (m, group_rows, group_rows)):
        u = UNIT_ROUNDOFF[g.dtype]
        relative = factor * 4 * EPS * (2 * math.sqrt(d) * score_magnitude(q, k) + math.sqrt(dv) + lse_largest
                                       + math.sqrt(outer) + math.sqrt(m) + 8) + u
        bound = relative * t + u * e.abs() + SUBNORMAL[g.dtype] + 1e-30
        error = (g.double() - e).abs()
        assert g.shape == e.shape, name
        assert torch.isfinite(g).all(), f"{name}: not finite"
        worst = (error / bound).max().item()
        assert worst <= 1.0, f"{name}: largest error {error.max().item():.3g}, error / bound {worst:.3g}"


def largest_lse(q, k, mask, causal):
    s = torch.einsum("bhid,bhjd->bhij", q.double(), expand_kv(k.double(), q.shape[1])) * q.shape[-1] ** -0.5
    return s.abs().max().item() + math.log(k.shape[-2])


# ---- parity with the original module -------------------------------------------------------

GOLDEN_CASES = json.loads((GOLDEN / "cases.json").read_text())["cases"]


def load_golden(case):
    folder = GOLDEN / case["name"]
    arrays = {f.stem: torch.from_numpy(np.load(f)) for f in folder.glob("*.npy")}
    return arrays


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=[c["name"] for c in GOLDEN_CASES])
def test_golden_outputs_and_gradients_of_the_original_module(case):
    """The module's float32 outputs and autograd gradients (tests/golden): Attend's
    are within twice the float32 bound (both are within the bound of the exact ones)."""
    a = load_golden(case)
    q, k, v = (a[name].clone().requires_grad_(True) for name in ("q", "k", "v"))
    layer = Attend(causal=case["causal"]).eval()
    out = layer(q, k, v, a.get("mask"))
    out.backward(a["dout"])
    exact_out, _, terms = reference(q, k, v, a.get("mask"), case["causal"], a["dout"])
    d, m = q.shape[-1], k.shape[-2]
    bound = 2 * 4 * EPS * v.abs().max().item() * (2 * math.sqrt(d) * score_magnitude(q, k) + math.sqrt(m) + 8)
    assert (out.detach() - a["out"]).abs().max().item() <= bound
    check_gradients((q.grad, k.grad, v.grad), tuple(a[g].double() for g in ("dq", "dk", "dv")), terms, q, k, v,
                    largest_lse(q, k, a.get("mask"), case["causal"]), factor=2.0)


def random_case(b, h, hk, n, m, d, dtype, mask_keep=None, causal=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n, d, generator=g)
    kv_shape = (b, m, d) if hk == 0 else (b, hk, m, d)
    k, v = torch.randn(*kv_shape, generator=g), torch.randn(*kv_shape, generator=g)
    mask = None
    if mask_keep is not None:
        mask = torch.rand(b, m, generator=g) < mask_keep
        mask[-1] = False  # the last batch: every key masked (rows get the mean of v)
    dout = torch.randn(b, h, n, d, generator=g)
    q, k, v, dout = (t.to(dtype) for t in (q, k, v, dout))  # values the dtype holds
    return q, k, v, mask, dout


CASES = [  # (name, b, h, hk, n, m, d, mask_keep, causal)
    ("4-D k/v", 2, 4, 4, 33, 50, 64, None, False),
    ("grouped-query, a mask with a fully masked batch", 2, 4, 2, 40, 40, 32, 0.7, False),
    ("multi-query (3-D k/v), causal", 1, 3, 0, 37, 37, 64, None, True),
    ("causal and a mask", 2, 2, 2, 48, 48, 80, 0.8, True),
    ("generic head dim", 1, 2, 2, 20, 30, 24, None, False),
    # One query row per head: the forward runs on the CPU decode kernel, its keys in chunks
    ("decoding: one query over 1500 keys, grouped-query", 2, 8, 2, 1, 1500, 64, 0.9, False),
]


def run_and_check(reference_out, reference_grads, case, dtype):
    name, b, h, hk, n, m, d, keep, causal = case
    q, k, v, mask, dout = random_case(b, h, hk, n, m, d, dtype, keep, causal)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = Attend(causal=causal)(*leaves, mask)
    out.backward(dout)
    assert out.dtype == dtype
    exact_out, exact_grads, terms = reference(q, k, v, mask, causal, dout)
    check_out(out.detach(), reference_out(q, k, v, mask, causal, exact_out), q, k, v)
    check_gradients(tuple(t.grad for t in leaves), reference_grads(q, k, v, mask, causal, dout, exact_grads), terms,
                    q, k, v, largest_lse(q, k, mask, causal))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_against_float64_math(case, dtype):
    """Random shapes, every dtype, against the seed's math in float64."""
    run_and_check(lambda *a: a[-1], lambda *a: a[-1], case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_against_the_original_module(case, dtype, seed_attend):
    """The same, the reference being the original module itself run in float64
    (grouped-query k and v, which it does not take, repeated per head)."""
    def per_head(t, h):
        return expand_kv(t, h) if t.dim() == 4 and t.shape[1] != h else t

    def module_out(q, k, v, mask, causal, _):
        with torch.no_grad():
            kv = [per_head(t.double(), q.shape[1]) for t in (k, v)]
            return seed_attend(causal=causal).eval()(q.double(), *kv, mask=mask)

    def module_grads(q, k, v, mask, causal, dout, _):
        leaves = [t.double().requires_grad_(True) for t in (q, k, v)]
        kv = [per_head(t, q.shape[1]) for t in leaves[1:]]
        seed_attend(causal=causal).eval()(leaves[0], *kv, mask=mask).backward(dout.double())
        return tuple(t.grad for t in leaves)

    run_and_check(module_out, module_grads, case, dtype)


# ---- dropout, modes, strides -----------------------------------------------------------------

def test_eval_mode_and_p0_are_no_dropout():
    q, k, v, mask, _ = random_case(1, 2, 2, 16, 16, 32, torch.float32, 0.9)
    plain = Attend()(q, k, v, mask)
    assert torch.equal(Attend(dropout=0.3).eval()(q, k, v, mask), plain)
    assert torch.equal(Attend(dropout=0.0).train()(q, k, v, mask), plain)
    # Without autograd the module calls the kernel directly; with it, through the
    # custom op: the same result, dropout included (the same seed drawn).
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    assert torch.equal(Attend()(*leaves, mask).detach(), plain)
    for grad in (True, False):
        torch.manual_seed(4)
        with torch.set_grad_enabled(grad):
            dropped = Attend(dropout=0.3).train()(*leaves, mask).detach()
        if grad:
            through_op = dropped
    assert torch.equal(dropped, through_op) and not torch.equal(dropped, plain)


def test_dropout_drops_about_p_scales_survivors_and_follows_manual_seed():
    # v = identity: out's row i is row i of the weights (after dropout).
    b, h, n, m, p = 1, 4, 64, 64, 0.25
    q, k = torch.randn(b, h, n, 16), torch.randn(b, h, m, 16)
    v = torch.eye(m).expand(b, h, m, m).contiguous()
    weights = Attend()(q, k, v)
    layer = Attend(dropout=p).train()
    torch.manual_seed(5)
    dropped = layer(q, k, v)
    kept = dropped != 0
    count, total = (~kept).sum().item(), kept.numel()
    sigma = math.sqrt(total * p * (1 - p))
    assert abs(count - total * p) <= 5 * sigma, f"{count} of {total} dropped, p = {p}"
    ratio = dropped[kept] / weights[kept] * (1 - p)
    assert torch.allclose(ratio, torch.ones_like(ratio), rtol=8 * EPS, atol=0)
    torch.manual_seed(5)
    assert torch.equal(layer(q, k, v), dropped)
    assert not torch.equal(layer(q, k, v), dropped)  # the generator moved on: another mask


def test_dropout_gradients_follow_the_seed():
    q, k, v, mask, dout = random_case(1, 2, 2, 20, 20, 32, torch.float32, 0.9)
    grads = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        torch.manual_seed(11)
        Attend(dropout=0.2).train()(*leaves, mask).backward(dout)
        grads.append([t.grad for t in leaves])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


def test_non_contiguous_expanded_and_numpy_inputs():
    q, k, v, mask, _ = random_case(2, 4, 4, 12, 18, 32, torch.float32, 0.8)
    expected = attend.forward(q, k, v, mask)
    # [b, n, h, d] memory seen as [b, h, n, d]; k and v with a stride-0 head dim (expanded).
    q_strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_strided.is_contiguous()
    assert torch.equal(attend.forward(q_strided, k, v, mask), expected)
    k1, v1 = k[:, :1], v[:, :1]
    # Both on one kernel (a grouped call may get another kernel than its expanded
    # form), so the results are bitwise equal.
    kernel = next(x["name"] for x in attend.kernels() if x["operation"] == "forward" and x["device"] == "cpu"
                  and x["dtype"] == "float32" and x["head_dim"] in (0, 32) and x["max_rows"] == 0)
    assert torch.equal(attend.forward(q, k1.expand(-1, 4, -1, -1), v1.expand(-1, 4, -1, -1), mask, kernel=kernel),
                       attend.forward(q, k1, v1, mask, kernel=kernel))
    out = attend.forward(q.numpy(), k.numpy(), v.numpy(), mask.numpy())
    assert isinstance(out, np.ndarray) and np.array_equal(out, expected.numpy())
    out, lse = attend.forward(q.numpy(), k.numpy(), v.numpy(), return_lse=True)
    dq, dk, dv = attend.backward(q.numpy(), k.numpy(), v.numpy(), out, lse, np.ones_like(out))
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_bad_inputs_raise_naming_the_argument_and_write_nothing():
    q, k, v, mask, _ = random_case(1, 2, 2, 8, 8, 16, torch.float32, 0.9)
    out = torch.full((1, 2, 8, 16), 7.0)
    with pytest.raises(ValueError, match="k: head dim is 8 but q's is 16"):
        attend.forward(q, k[..., :8], v, out=out)
    with pytest.raises(ValueError, match="out: overlaps the memory of q"):
        attend.forward(q, k, v, out=q)
    with pytest.raises(ValueError, match="options.dropout"):
        attend.forward(q, k, v, dropout=1.5, out=out)
    with pytest.raises(ValueError, match="causal_align"):
        attend.forward(q, k, v, causal_align="middle", out=out)
    with pytest.raises(TypeError, match="q: expected a tensor with __dlpack__"):
        attend.forward([[1.0]] * 4, k, v)
    with pytest.raises(ValueError, match="mask: expected dtype bool"):
        attend.forward(q, k, v, mask.float(), out=out)
    assert (out == 7.0).all()
    with pytest.raises(ValueError, match="dout: expected out's shape"):
        o, lse = attend.forward(q, k, v, return_lse=True)
        attend.backward(q, k, v, o, lse, o[:, :, :4])


# ---- the operators: opcheck, torch.compile --------------------------------------------------

def test_opcheck():
    q, k, v, mask, dout = random_case(1, 2, 2, 8, 8, 16, torch.float32, 0.9)
    seed = torch.tensor([3], dtype=torch.int64)
    for args in [(q, k, v, mask, False, 0.25, 0.0, seed), (q, k[:, 0], v[:, 0], None, True, 0.25, 0.1, seed)]:
        leaves = [a.clone().requires_grad_(True) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                  for a in args]
        torch.library.opcheck(torch.ops.attend.attention.default, tuple(leaves))
    out, lse = torch.ops.attend.attention(q, k, v, mask, False, 0.25, 0.0, seed)
    torch.library.opcheck(torch.ops.attend.attention_backward.default,
                          (q, k, v, mask, out, lse, dout, False, 0.25, 0.0, seed))


class TwoLayers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = Attend(causal=True), Attend()
        self.project = torch.nn.Linear(32, 32)

    def forward(self, q, k, v, mask):
        x = self.first(q, k, v)
        return self.second(self.project(x), k, v, mask)


def test_torch_compile_fullgraph_equals_eager():
    q, k, v, mask, dout = random_case(2, 2, 2, 16, 16, 32, torch.float32, 0.9, causal=True)
    model = TwoLayers()
    results = []
    for run in (model, torch.compile(model, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = run(*leaves, mask)
        out.backward(dout)
        results.append([out.detach()] + [t.grad for t in leaves])
    for eager, compiled in zip(*results):
        assert torch.equal(eager, compiled)


# ---- CUDA ----------------------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_tensors_on_a_non_default_stream():
    case = CASES[1]
    q, k, v, mask, dout = random_case(*case[1:7], torch.float32, case[7], case[8])
    leaves = [t.cuda().requires_grad_(True) for t in (q, k, v)]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = Attend(causal=case[8])(*leaves, mask.cuda())
        out.backward(dout.cuda())
    stream.synchronize()
    exact_out, exact_grads, terms = reference(q, k, v, mask, case[8], dout)
    check_out(out.detach().cpu(), exact_out, q, k, v)
    check_gradients(tuple(t.grad.cpu() for t in leaves), exact_grads, terms, q, k, v,
                    largest_lse(q, k, mask, case[8]))


# ---- packaging -------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("readelf") is None, reason="no readelf")
def test_the_extension_and_libattend_need_no_torch_halide_or_cuda_library():
    """The package runs wherever numpy does: no link against libtorch, libHalide or
    libcuda (the CUDA driver is opened at run time, when a CUDA kernel runs)."""
    package = Path(attend.__file__).parent
    extension = Path(attend._attend.__file__)
    libraries = [extension] + sorted(package.glob("libattend.so*"))
    if len(libraries) == 1:  # a build tree (build/python): libattend is where the runpath says
        needed = subprocess.run(["ldd", str(extension)], capture_output=True, text=True).stdout
        libraries += [Path(line.split("=>")[1].split()[0]) for line in needed.splitlines()
                      if "libattend" in line and "=>" in line]
    assert len(libraries) == 2, libraries
    for library in libraries:
        dynamic = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True, check=True).stdout
        needed = [line.split("[")[1].rstrip("]") for line in dynamic.splitlines() if "(NEEDED)" in line]
        assert needed, dynamic
        for name in needed:
            assert not any(word in name.lower() for word in ("torch", "halide", "cuda")), (library, name)


def test_demo_compares_with_the_original_module_when_it_is_installed(seed_attend, monkeypatch, capsys):
    """python -m attend demo finds the original module as naturalspeech2_pytorch.attend
    (here the seed file's class, installed under that name)."""
    import types

    import attend.__main__ as demo_main
    package, module = types.ModuleType("naturalspeech2_pytorch"), types.ModuleType("naturalspeech2_pytorch.attend")
    module.Attend = seed_attend
    package.attend = module
    monkeypatch.setitem(sys.modules, "naturalspeech2_pytorch", package)
    monkeypatch.setitem(sys.modules, "naturalspeech2_pytorch.attend", module)
    assert demo_main.main(["demo"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "the original module" in x)
    error = float(line.rsplit("max |error|", 1)[1])
    assert error < 2e-5, line

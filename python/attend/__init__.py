"""Attend: the attention of naturalspeech2's `Attend` module from Halide kernels.

    import attend
    out = attend.forward(q, k, v, mask=None, causal=False)          # numpy arrays or torch tensors
    out, lse = attend.forward(q, k, v, return_lse=True)
    dq, dk, dv = attend.backward(q, k, v, out, lse, dout)

    from attend.torch import Attend                                 # the seed module, with autograd

Tensors are passed by DLPack (any object with __dlpack__: numpy arrays, torch
CPU and CUDA tensors), in PyTorch's shapes: q [b, h, n, d]; k, v [b, hk, m, d]
or [b, m, d] (multi-query); mask bool [b, m], True = attend. Outputs are
allocated in q's framework, on q's device. The semantics are the C++
library's (docs/contract.md): masked scores are -FLT_MAX, so a row with every
key masked gets the mean of v; dropout in [0, 1] is training-mode dropout
whose keep decision is a pure function of (seed, b, h, i, j).

Bad arguments raise ValueError naming the argument; failures while running
raise attend.Error. The GIL is released while a kernel runs. CUDA tensors run
on torch's current stream of their device (passed explicitly to the kernel).
"""
from . import _attend

__all__ = ["Error", "forward", "backward", "kernels"]
__version__ = "0.2.0"

Error = _attend.Error
Error.__doc__ = "A failure while running a kernel (a Halide runtime error, a missing driver, out of memory)."

_KDL_CUDA = 2


def _is_torch(t):
    return type(t).__module__.split(".")[0] == "torch"


def _capsule(t, name):
    """t's DLPack capsule. A CUDA tensor's is taken without stream synchronisation:
    the kernel itself is ordered on the stream passed to it. A torch tensor's comes
    from torch.utils.dlpack.to_dlpack, which exports without any stream handling
    (0.3 us against 3 us for __dlpack__, per tensor of every call)."""
    if t is None:
        return None
    if _is_torch(t):
        return _torch_to_dlpack()(t.detach() if t.requires_grad else t)
    if not hasattr(t, "__dlpack__"):
        raise TypeError(f"attend: {name}: expected a tensor with __dlpack__ (a numpy array or a torch tensor), "
                        f"got {type(t).__name__}")
    if t.__dlpack_device__()[0] == _KDL_CUDA:
        return t.__dlpack__(stream=-1)
    return t.__dlpack__()


_to_dlpack = None


def _torch_to_dlpack():
    global _to_dlpack
    if _to_dlpack is None:
        from torch.utils.dlpack import to_dlpack
        _to_dlpack = to_dlpack
    return _to_dlpack


def _empty(like, shape, dtype=None):
    """An uninitialised array in like's framework and on its device (dtype: like's, or 'float32')."""
    if _is_torch(like):
        import torch
        return torch.empty(shape, dtype=torch.float32 if dtype == "float32" else like.dtype, device=like.device)
    import numpy as np
    return np.empty(shape, dtype=np.float32 if dtype == "float32" else like.dtype)


def _stream(q):
    """The CUstream a CUDA call runs on: torch's current stream of q's device (0 elsewhere)."""
    if _is_torch(q) and q.is_cuda:
        import torch
        return torch.cuda.current_stream(q.device).cuda_stream
    return 0


def _options(q, causal, causal_align, scale, dropout, seed, device, kernel, query_offset, key_offset):
    if not 0 <= int(seed) < 2**64:
        raise ValueError(f"attend: seed: expected an integer in [0, 2**64), got {seed}")
    return dict(causal=bool(causal), causal_align=causal_align, scale=None if scale is None else float(scale),
                dropout=float(dropout), seed=int(seed), device=device, cuda_stream=_stream(q), kernel=kernel,
                query_offset=int(query_offset), key_offset=int(key_offset))


def forward(q, k, v, mask=None, *, causal=False, causal_align="top-left", scale=None, dropout=0.0, seed=0,
            return_lse=False, out=None, lse=None, device="auto", kernel="", query_offset=0, key_offset=0):
    """softmax(scale q kᵀ + masks) v, with training-mode dropout p = `dropout`.

    Returns out [b, h, n, dv] (and lse, float32 [b, h, n], with return_lse=True),
    written into `out` / `lse` when given. scale defaults to d**-0.5.
    causal_align: "top-left" (key j masked for query i when j > i) or
    "bottom-right" (when j > i + m - n)."""
    q_capsule = _capsule(q, "q")
    if len(q.shape) != 4:
        raise ValueError(f"attend: q: expected 4 dims [b, h, n, d], got shape {tuple(q.shape)}")
    b, h, n = q.shape[0], q.shape[1], q.shape[2]
    if out is None:
        out = _empty(q, (b, h, n, v.shape[-1]))
    if lse is None and return_lse:
        lse = _empty(q, (b, h, n), "float32")
    _attend.forward(q_capsule, _capsule(k, "k"), _capsule(v, "v"), _capsule(mask, "mask"),
                    _capsule(out, "out"), _capsule(lse, "lse"),
                    **_options(q, causal, causal_align, scale, dropout, seed, device, kernel, query_offset, key_offset))
    return (out, lse) if return_lse else out


def backward(q, k, v, out, lse, dout, mask=None, *, causal=False, causal_align="top-left", scale=None, dropout=0.0,
             seed=0, dq=None, dk=None, dv=None, device="auto", kernel="", query_offset=0, key_offset=0):
    """The gradients (dq, dk, dv) of forward() for the upstream gradient dout,
    from the forward's out and lse and the same options (the same seed drops
    the same weights). dk and dv of a shared kv head are summed over its heads."""
    dq = _empty(q, tuple(q.shape)) if dq is None else dq
    dk = _empty(k, tuple(k.shape)) if dk is None else dk
    dv = _empty(v, tuple(v.shape)) if dv is None else dv
    _attend.backward(_capsule(q, "q"), _capsule(k, "k"), _capsule(v, "v"), _capsule(mask, "mask"),
                     _capsule(out, "out"), _capsule(lse, "lse"), _capsule(dout, "dout"), _capsule(dq, "dq"),
                     _capsule(dk, "dk"), _capsule(dv, "dv"),
                     **_options(q, causal, causal_align, scale, dropout, seed, device, kernel, query_offset,
                                key_offset))
    return dq, dk, dv


def kernels():
    """The kernels of this build: dicts of name, operation, device, dtype, head_dim (0: any)."""
    return _attend.kernels()

"""attend.torch: Attend's kernels as PyTorch operators with autograd, and the seed
module's drop-in replacement.

    from attend.torch import Attend
    attend_layer = Attend(dropout=0.1, causal=False)
    out = attend_layer(q, k, v, mask)        # q [b, h, n, d]; k, v [b, h, m, d] or [b, m, d]; mask bool [b, m]

`torch.ops.attend.attention` (out and lse) and `torch.ops.attend.attention_backward`
(dq, dk, dv) are registered with torch.library.custom_op, with fake (meta)
implementations and autograd, so `torch.compile(fullgraph=True)` traces through
them. torch is not linked: tensors cross by DLPack.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

import attend as _attend

__all__ = ["Attend", "attention"]


def _seed_of(seed: Tensor) -> int:
    return int(seed.item()) % 2**64


@torch.library.custom_op("attend::attention", mutates_args=())
def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], causal: bool, scale: float, dropout: float,
              seed: Tensor) -> Tuple[Tensor, Tensor]:
    """out = dropout(softmax(scale q kᵀ + masks)) v, and each row's log-sum-exp
    (float32 [b, h, n]; -inf for a row with every key masked). `seed` is a
    one-element int64 tensor: the dropout mask is a pure function of it."""
    return _attend.forward(q, k, v, mask, causal=causal, scale=scale, dropout=dropout, seed=_seed_of(seed),
                           return_lse=True)


@attention.register_fake
def _(q, k, v, mask, causal, scale, dropout, seed):
    b, h, n = q.shape[0], q.shape[1], q.shape[2]
    return q.new_empty((b, h, n, v.shape[-1])), q.new_empty((b, h, n), dtype=torch.float32)


@torch.library.custom_op("attend::attention_backward", mutates_args=())
def attention_backward(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor], out: Tensor, lse: Tensor,
                       dout: Tensor, causal: bool, scale: float, dropout: float,
                       seed: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The gradients of attention's out (dq, dk, dv in q's, k's and v's shapes)."""
    dout = dout if dout.dtype == q.dtype else dout.to(q.dtype)
    return _attend.backward(q, k, v, out, lse, dout, mask, causal=causal, scale=scale, dropout=dropout,
                            seed=_seed_of(seed))


@attention_backward.register_fake
def _(q, k, v, mask, out, lse, dout, causal, scale, dropout, seed):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, mask, causal, scale, dropout, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, seed, *([mask] if mask is not None else []))
    ctx.options = (causal, scale, dropout)
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse, seed, *mask = ctx.saved_tensors
    causal, scale, dropout = ctx.options
    dq, dk, dv = attention_backward(q, k, v, mask[0] if mask else None, out, lse, dout, causal, scale,
                                    dropout, seed)
    return dq, dk, dv, None, None, None, None, None


attention.register_autograd(_backward, setup_context=_setup_context)


class Attend(torch.nn.Module):
    """The seed module (naturalspeech2's Attend) on Attend's kernels.

    Attend(dropout=0., causal=False, use_flash=False); forward(q, k, v, mask=None)
    with q [b, h, n, d], k and v [b, h, m, d] or [b, m, d] (multi-query), mask
    bool [b, m] (True = attend). Scale d**-0.5; masked scores -finfo.max, so a
    row with every key masked gets the mean of v (as the seed's math path);
    dropout only in training mode, its seed drawn from torch's default
    generator (torch.manual_seed reproduces a step) and kept for the backward.
    `use_flash` is accepted and ignored: the seed's two paths are one kernel here.
    """

    def __init__(self, dropout: float = 0.0, causal: bool = False, use_flash: bool = False):
        super().__init__()
        self.dropout = dropout
        self.causal = causal
        self.use_flash = use_flash

    def forward(self, q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        p = self.dropout if self.training else 0.0
        if p > 0:
            seed = torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64)
        else:
            seed = torch.zeros(1, dtype=torch.int64)
        scale = q.shape[-1] ** -0.5
        if not torch.compiler.is_compiling() and not (
                torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
            # Nothing to record for autograd or a graph: the kernel without the custom
            # op's dispatch (about 100 us a call), the same result.
            return _attend.forward(q, k, v, mask, causal=self.causal, scale=scale, dropout=p, seed=_seed_of(seed))
        out, _ = attention(q, k, v, mask, self.causal, scale, p, seed)
        return out

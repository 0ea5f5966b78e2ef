// The oracle: attention in double precision, written as plainly as the math, to
// check every kernel against (tests, `attend demo`). O(n·m) memory per row block
// is fine here; speed is not its job.
#pragma once

#include <cstdint>
#include <vector>

#include "attend/attend.hpp"

namespace attend::reference {

// Dense C-order arrays in PyTorch's shapes: q [b, h, n, d]; k [b, kv_heads, m, d]
// and v [b, kv_heads, m, dv], or [b, m, d] / [b, m, dv] when kv_heads == 0
// (multi-query); mask [b, m] (nullptr: none), nonzero = attend.
struct Shape {
    int64_t b = 1, h = 1, kv_heads = 1, n = 1, m = 1, d = 1, dv = 1;
};

// Returns out [b, h, n, dv]. Uses options.scale, causal, causal_align, dropout,
// training, seed. lse (if not null) receives [b, h, n]: ln sum_j exp(s_ij) over
// the unmasked keys of each row, -inf for a row with every key masked.
ATTEND_API std::vector<double> forward(const Shape &shape, const float *q, const float *k, const float *v,
                                       const uint8_t *mask, const Options &options,
                                       std::vector<double> *lse = nullptr);

// The gradients of forward()'s out, as the original module's autograd gives them
// for an upstream gradient dout [b, h, n, dv]: dq [b, h, n, d], and dk, dv in k's
// and v's shapes, summed over the heads that share a kv head. Masked scores are a
// constant (masked_fill), so no gradient flows through them: a row with every
// key masked gives dq = 0 and nothing to dk, and its uniform weights 1/m over
// all keys (times the dropout factor Z/(1 - p)) send dv_j += Z_ij/(1 - p) dout_i / m
// to every key j.
// The *_terms arrays hold, per element, the sum of the absolute values of the
// terms it sums, every inner product (dP = dout·v, D = Σ_l P_l dP_l) taken
// with absolute values too: the scale that rounding errors of a float
// computation of that element are relative to (tests derive tolerances from it).
struct Gradients {
    std::vector<double> dq, dk, dv;
    std::vector<double> dq_terms, dk_terms, dv_terms;
};
ATTEND_API Gradients backward(const Shape &shape, const float *q, const float *k, const float *v,
                              const uint8_t *mask, const float *dout, const Options &options);

}  // namespace attend::reference

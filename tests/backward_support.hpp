// Test support for the backward: a backward problem (the forward's inputs, the
// oracle's out and lse, a random dout, NaN-filled gradients) and the check of
// each gradient element against its rounding bound (docs/contract.md §15).
#pragma once

#include <optional>

#include "low_precision.hpp"
#include "support.hpp"

namespace attend::test {

// One backward problem: the forward's inputs (a test::Problem), its out and lse
// from the oracle (rounded to float32, so the check sees the backward kernel's
// errors alone), a random dout, and gradients full of NaN (so an element the
// kernel does not write is caught).
struct Backward {
    test::Problem forward;
    Tensor<float> dout, dq, dk, dv;
    reference::Gradients expected;
    double largest_lse = 0;

    // rounded_to: q, k, v and dout rounded to values a 16-bit dtype holds (the
    // oracle then sees exactly what the kernel sees).
    Backward(const ProblemSpec &spec, const Options &options, std::vector<int> grad_order = {},
             std::optional<DType> rounded_to = std::nullopt) {
        forward = make_problem(spec, options);
        if (rounded_to) round_inputs(forward, *rounded_to);
        dout = random_tensor(forward.out.shape, spec.seed + 10);
        if (rounded_to) {
            for (float &x : dout.storage) x = bits_to_float(float_to_bits(x, *rounded_to), *rounded_to);
        }
        complete(options, grad_order);
    }

    // Given inputs (q, k, v, mask in `given`, e.g. read from golden files) and dout.
    Backward(test::Problem given, Tensor<float> given_dout, const Options &options)
        : forward(std::move(given)), dout(std::move(given_dout)) {
        forward.options = options;
        forward.lse = nan_tensor({forward.shape.b, forward.shape.h, forward.shape.n});
        complete(options, {});
    }

    // out and lse from the oracle, NaN gradients, the oracle's gradients.
    void complete(const Options &options, const std::vector<int> &grad_order) {
        const Expected e = forward.expected();
        const auto &s = forward.shape;
        forward.out = dense_as({s.b, s.h, s.n, s.dv}, e);
        for (size_t at = 0; at < e.lse.size(); at++) {
            forward.lse->storage[at] = float(e.lse[at]);
            if (std::isfinite(e.lse[at])) largest_lse = std::max(largest_lse, std::fabs(e.lse[at]));
        }
        dq = nan_tensor(forward.q.shape, grad_order);
        dk = nan_tensor(forward.k.shape, forward.k.shape.size() == 4 ? grad_order : std::vector<int>{});
        dv = nan_tensor(forward.v.shape, forward.v.shape.size() == 4 ? grad_order : std::vector<int>{});
        auto q = forward.q.dense(), k = forward.k.dense(), v = forward.v.dense(), d = dout.dense();
        std::vector<uint8_t> mask;
        if (forward.mask) mask = forward.mask->dense();
        expected = reference::backward(forward.shape, q.data(), k.data(), v.data(),
                                       forward.mask ? mask.data() : nullptr, d.data(), options);
    }

    // out [b, h, n, dv] in C order from the oracle's values.
    static Tensor<float> dense_as(std::vector<int64_t> shape, const std::vector<double> &values) {
        Tensor<float> dense = make_tensor<float>(shape, float32_type());
        REQUIRE(dense.numel() == int64_t(values.size()));
        for (size_t at = 0; at < values.size(); at++) dense.storage[at] = float(values[at]);
        return dense;
    }

    void run(const Options &options) {
        DLTensor q = forward.q.dl(), k = forward.k.dl(), v = forward.v.dl(), out = forward.out.dl(),
                 lse = forward.lse->dl(), d_out = dout.dl(), d_q = dq.dl(), d_k = dk.dl(), d_v = dv.dl();
        DLTensor mask = forward.mask ? forward.mask->dl() : DLTensor{};
        backward(q, k, v, forward.mask ? &mask : nullptr, out, lse, d_out, d_q, d_k, d_v, options);
    }

    // The float32 error bound of a gradient element: each term of its sum
    // carries the relative error of P (the score's d-term dot product through
    // the exponential, 2·sqrt(d)·eps·|score| as in the forward's bound, and
    // lse's rounding, eps·|lse|) and of the dv-term products dP and D (sqrt(dv)·eps);
    // the sum over `outer` terms adds sqrt(outer)·eps (probabilistic bounds,
    // Higham & Mary 2019), each relative to the sum of the absolute values of
    // the terms (the oracle's *_terms); the factor 4 as in support.hpp.
    double relative_bound(int64_t outer) const {
        const double eps = FLT_EPSILON;
        const double d = double(forward.shape.d), dv = double(forward.shape.dv);
        return 4.0 * eps *
               (2.0 * std::sqrt(d) * score_magnitude(forward) + std::sqrt(dv) + largest_lse + std::sqrt(double(outer)) + 8.0);
    }
};

struct GradientCheck {
    const char *name;
    std::vector<float> got;
    const std::vector<double> &expected, &terms;
    int64_t outer;  // terms summed per element
};

// Each element within `factor` times its bound (2 against another float32
// computation: both are within the bound of the exact result); `rounding`
// (the 16-bit unit roundoff, 0 for float32) adds the rounding of the result
// and of the 16-bit out that D reads,
// and `subnormal` the absolute rounding of a result below the dtype's smallest
// normal (half its subnormal spacing: 2^-25 for float16, whose gradients of
// tiny weights land there).
inline void check_gradients(const Backward &b, const std::vector<GradientCheck> &checks, double rounding = 0,
                            double subnormal = 0, double factor = 1) {
    for (const GradientCheck &c : checks) {
        REQUIRE(c.got.size() == c.expected.size());
        const double relative = factor * b.relative_bound(c.outer) + rounding;
        double worst = 0, largest_error = 0;
        int64_t not_finite = 0;
        for (size_t e = 0; e < c.got.size(); e++) {
            if (!std::isfinite(c.got[e])) {
                not_finite++;
                continue;
            }
            const double error = std::fabs(double(c.got[e]) - c.expected[e]);
            const double bound = relative * c.terms[e] + rounding * std::fabs(c.expected[e]) + subnormal + 1e-30;
            worst = std::max(worst, error / bound);
            largest_error = std::max(largest_error, error);
        }
        INFO(std::string(c.name) << ": largest error " << largest_error << ", largest error / bound " << worst
                                 << ", not written " << not_finite);
        CHECK(not_finite == 0);
        CHECK(worst <= 1.0);
    }
}

inline void check_float32(Backward &b) {
    const auto &s = b.forward.shape;
    const int64_t group_rows = s.n * (s.h / std::max<int64_t>(s.kv_heads, 1));
    check_gradients(b, {{"dq", b.dq.dense(), b.expected.dq, b.expected.dq_terms, s.m},
                        {"dk", b.dk.dense(), b.expected.dk, b.expected.dk_terms, group_rows},
                        {"dv", b.dv.dense(), b.expected.dv, b.expected.dv_terms, group_rows}});
}

// b's call on tensors of a 16-bit dtype (b built with rounded_to = dtype), its
// gradients checked against the oracle: out rounded to the dtype moves D by
// u·Σ|dout||out|, within u of the terms; each gradient is rounded once (u·|g|,
// or half the subnormal spacing below the smallest normal).
inline void check_16bit(Backward &b, DType dtype, const Options &options) {
    auto q = to_dtype(b.forward.q, dtype), k = to_dtype(b.forward.k, dtype), v = to_dtype(b.forward.v, dtype),
         out = to_dtype(b.forward.out, dtype), dout = to_dtype(b.dout, dtype), dq = to_dtype(b.dq, dtype),
         dk = to_dtype(b.dk, dtype), dv = to_dtype(b.dv, dtype);
    DLTensor tq = q.dl(), tk = k.dl(), tv = v.dl(), tout = out.dl(), tlse = b.forward.lse->dl(), tdout = dout.dl(),
             tdq = dq.dl(), tdk = dk.dl(), tdv = dv.dl();
    DLTensor mask = b.forward.mask ? b.forward.mask->dl() : DLTensor{};
    backward(tq, tk, tv, b.forward.mask ? &mask : nullptr, tout, tlse, tdout, tdq, tdk, tdv, options);
    auto values = [&](const Tensor<uint16_t> &t) {
        std::vector<float> x;
        for (uint16_t bits : t.dense()) x.push_back(bits_to_float(bits, dtype));
        return x;
    };
    const auto &s = b.forward.shape;
    const int64_t group_rows = s.n * (s.h / std::max<int64_t>(s.kv_heads, 1));
    check_gradients(b,
                    {{"dq", values(dq), b.expected.dq, b.expected.dq_terms, s.m},
                     {"dk", values(dk), b.expected.dk, b.expected.dk_terms, group_rows},
                     {"dv", values(dv), b.expected.dv, b.expected.dv_terms, group_rows}},
                    unit_roundoff(dtype), std::ldexp(1.0, dtype == DType::Float16 ? -25 : -134));
}

// The cases every backward kernel runs: each feature, and tiles cut short.
struct BackwardCase {
    std::string name;
    ProblemSpec spec;
    Options options;
};

inline std::vector<BackwardCase> backward_cases(int64_t d) {
    std::vector<BackwardCase> cases;
    auto add = [&](std::string name, ProblemSpec spec, Options options = {}) {
        cases.push_back({std::move(name), spec, options});
    };
    add("plain, n and m not multiples of the tiles", spec_of(2, 2, 77, 101, d));
    {
        ProblemSpec s = spec_of(2, 4, 50, 70, d);
        s.kv_heads = 2;
        s.mask = true;
        s.mask_keep = 0.6;
        add("grouped-query (4 heads, 2 kv heads), a mask", s);
    }
    {
        ProblemSpec s = spec_of(1, 3, 40, 90, d);
        s.kv_heads = 0;
        Options o;
        o.training = true;
        o.dropout = 0.25f;
        o.seed = 7;
        add("multi-query (3-D k, v), dropout 0.25", s, o);
    }
    {
        ProblemSpec s = spec_of(2, 2, 100, 100, d);
        s.mask = true;
        s.mask_keep = 0.8;
        Options o;
        o.causal = true;
        add("causal top-left, a mask", s, o);
    }
    {
        ProblemSpec s = spec_of(1, 2, 60, 130, d);
        Options o;
        o.causal = true;
        o.causal_align = CausalAlign::BottomRight;
        o.training = true;
        o.dropout = 0.1f;
        o.seed = 3;
        add("causal bottom-right (n < m), dropout", s, o);
    }
    {
        // n > m bottom-right: the first n - m rows see no key at all, more of
        // them than a block of query rows holds (CPU 64, GPU 16).
        ProblemSpec s = spec_of(2, 2, 150, 40, d);
        Options o;
        o.causal = true;
        o.causal_align = CausalAlign::BottomRight;
        add("causal bottom-right with n > m: 110 rows with every key masked", s, o);
    }
    {
        ProblemSpec s = spec_of(2, 2, 30, 60, d);
        s.mask = true;
        s.mask_keep = 0.0;  // every key of both batches masked
        Options o;
        o.training = true;
        o.dropout = 0.3f;
        add("every key masked (uniform weights: dv only), dropout", s, o);
    }
    {
        ProblemSpec s = spec_of(1, 2, 50, 80, d);
        Options o;
        o.causal = true;
        o.query_offset = 1000;
        o.key_offset = 1030;
        o.training = true;
        o.dropout = 0.2f;
        o.seed = 11;
        add("global positions (a shard: rows 1000.., keys 1030..), causal, dropout", s, o);
    }
    {
        // 32 kv heads: a CPU kernel runs each kv head's key tiles as one task.
        ProblemSpec s = spec_of(2, 16, 45, 110, d);
        s.mask = true;
        s.mask_keep = 0.7;
        add("32 kv heads, a mask (each kv head's keys one task)", s);
    }
    {
        // One kv head, 2590 keys: a CPU kernel runs its key tiles as 10 tasks
        // that sum their shares of dq (with 48-key tiles: 9 runs of 6 tiles
        // and an empty one).
        ProblemSpec s = spec_of(1, 1, 20, 2590, d);
        Options o;
        o.causal = true;
        o.causal_align = CausalAlign::BottomRight;
        add("one kv head, 2590 keys, causal bottom-right (the keys in many tasks)", s, o);
    }
    return cases;
}

}  // namespace attend::test

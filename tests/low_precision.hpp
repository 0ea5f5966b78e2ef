// Test support for float16 and bfloat16 kernels: a Problem's inputs rounded to
// the dtype (so the double reference sees exactly what the kernel sees), the
// same call on 16-bit tensors, and the comparison with its dtype's tolerance.
#pragma once

#include "attend/dlpack_types.hpp"
#include "attend/half.hpp"
#include "support.hpp"

namespace attend::test {

// Unit roundoff of the dtype: out is rounded once, to within this relative error.
inline double unit_roundoff(DType dtype) { return dtype == DType::Float16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8); }

// Rounds q, k and v of a float32 problem to values the dtype holds exactly.
inline void round_inputs(Problem &p, DType dtype) {
    for (Tensor<float> *t : {&p.q, &p.k, &p.v}) {
        for (float &x : t->storage) x = bits_to_float(float_to_bits(x, dtype), dtype);
    }
}

inline Tensor<uint16_t> to_dtype(const Tensor<float> &t, DType dtype) {
    Tensor<uint16_t> u;
    u.shape = t.shape;
    u.strides = t.strides;
    u.offset = t.offset;
    u.dtype = dlpack::type_of(dtype);
    for (float x : t.storage) u.storage.push_back(float_to_bits(x, dtype));
    return u;
}

// Problem p's call with q, k, v and out in the dtype (same layouts), mask and lse
// as they are.
struct LowPrecisionRun {
    DType dtype;
    Tensor<uint16_t> q, k, v, out;
    std::optional<Tensor<uint8_t>> mask;
    Tensor<float> lse;
    Options options;

    LowPrecisionRun(const Problem &p, DType type)
        : dtype(type), q(to_dtype(p.q, type)), k(to_dtype(p.k, type)), v(to_dtype(p.v, type)),
          out(to_dtype(p.out, type)), mask(p.mask), lse(nan_tensor({p.shape.b, p.shape.h, p.shape.n})),
          options(p.options) {
        std::fill(out.storage.begin(), out.storage.end(), dtype == DType::Float16 ? 0x7e00 : 0x7fc0);  // NaN
    }

    void run() {
        DLTensor dq = q.dl(), dk = k.dl(), dv = v.dl(), dout = out.dl(), dlse = lse.dl();
        DLTensor dmask = mask ? mask->dl() : DLTensor{};
        forward(dq, dk, dv, mask ? &dmask : nullptr, dout, &dlse, options);
    }
    std::vector<float> out_values() const {
        std::vector<float> values;
        for (uint16_t bits : out.dense()) values.push_back(bits_to_float(bits, dtype));
        return values;
    }
};

// out within the fp32 tolerance of the reference plus the rounding of out
// (unit roundoff of the dtype times |out|); against the float32 kernel's out,
// the rounding and a few fp32 roundings (the same sums in the same order,
// compiled apart); lse as for float32 (it is float32).
inline void check_low_precision(const Problem &p, LowPrecisionRun &run, const Expected &expected,
                                const std::vector<float> &fp32_out) {
    const auto got = run.out_values();
    REQUIRE(got.size() == expected.size());
    const double u = unit_roundoff(run.dtype), fp32 = fp32_tolerance(p);
    double max_v = 0;
    for (float x : p.v.dense()) max_v = std::max(max_v, double(std::fabs(x)));
    double worst_reference = 0, worst_fp32 = 0;  // error / tolerance, per element
    int64_t not_finite = 0;
    for (size_t e = 0; e < got.size(); e++) {
        if (!std::isfinite(got[e])) {
            not_finite++;
            continue;
        }
        const double g = got[e];
        worst_reference = std::max(worst_reference, std::fabs(g - expected[e]) / (fp32 + u * std::fabs(expected[e])));
        worst_fp32 = std::max(worst_fp32, std::fabs(g - fp32_out[e]) /
                                              (u * std::fabs(fp32_out[e]) + 4 * FLT_EPSILON * max_v));
    }
    INFO("error / tolerance: against the reference " << worst_reference << ", against float32 " << worst_fp32);
    CHECK(not_finite == 0);
    CHECK(worst_reference <= 1.0);
    CHECK(worst_fp32 <= 1.0);
    Problem with_lse = p;
    with_lse.lse = run.lse;
    check_lse(with_lse, expected.lse);
}

}  // namespace attend::test

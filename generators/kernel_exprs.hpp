// Expr helpers shared by the generators (the forward attention now; its
// backward next): the softmax's exponential and log-sum-exp, 16-bit float
// storage, the masks and dropout. Each is the one definition of its rule in
// the kernels; the host side of the same rules is in include/attend/
// (half.hpp, dropout_hash.hpp).
#pragma once

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <vector>

#include "Halide.h"
#include "attend/dropout_hash.hpp"

namespace attend::kernel_exprs {

using namespace Halide;

inline Expr u32(uint32_t x) { return Internal::make_const(UInt(32), x); }

// 2^x for x <= 0, which is every softmax argument here (each is max-subtracted).
// Cephes' degree-6 polynomial on [-0.5, 0.5] (relative error about 2e-7) times an
// exponent built from bits. From about -126.5 down the weight is exactly 0 (the
// exponent field of 2^-127 built that way is 0, which makes the product 0, with
// no compare), so masked keys (score -FLT_MAX) weigh nothing next to any
// unmasked key.
inline Expr exp2_nonpositive(Expr x) {
    Expr clamped = max(x, -127.0f);
    Expr whole = round(clamped);
    Expr f = clamped - whole;
    Expr p = 1.535336188319500e-4f;
    p = p * f + 1.339887440266574e-3f;
    p = p * f + 9.618437357674640e-3f;
    p = p * f + 5.550332471162809e-2f;
    p = p * f + 2.402264791363012e-1f;
    p = p * f + 6.931472028550421e-1f;
    p = p * f + 1.0f;
    Expr two_to_whole = reinterpret<float>((cast<int32_t>(whole) + 127) << 23);
    return p * two_to_whole;
}

// How a kernel stores q, k, v and out of `element` type: as that type, except on
// OpenCL without cl_khr_fp16 (e.g. PoCL), where 16-bit floats travel as their
// bits (uint16). The runtime reads the result from each kernel's metadata.
inline Type storage_type(const Target &target, Type element) {
    const bool no_half = target.has_feature(Target::OpenCL) && !target.has_feature(Target::CLHalf);
    return element.bits() == 16 && no_half ? UInt(16) : element;
}

// float16 and bfloat16 elements as float32 and back. bfloat16 is the top half of
// a float32 and is converted with bit operations everywhere (Halide 21's CUDA
// backend fails on bfloat16 casts). Stored as uint16 (see storage_type), float16
// is converted with bit operations too, as attend/half.hpp does on the host;
// rounding is to nearest, ties to even, in every case.
inline Expr widen(Expr x, Type element) {
    if (element == Float(32)) return x;
    if (element == Float(16) && x.type() == Float(16)) return cast<float>(x);
    Expr bits = cast<uint32_t>(reinterpret<uint16_t>(x));
    if (element == BFloat(16)) return reinterpret<float>(bits << 16);
    Expr sign = (bits & u32(0x8000)) << 16, exponent = (bits >> 10) & u32(0x1f), mantissa = bits & u32(0x3ff);
    Expr subnormal = cast<float>(mantissa) * (1.0f / 16777216.0f);  // exact: mantissa * 2^-24
    Expr wide = select(exponent == u32(31), u32(0x7f800000) | (mantissa << 13),
                       ((exponent + u32(112)) << 23) | (mantissa << 13));
    return reinterpret<float>(sign | reinterpret<uint32_t>(select(exponent == u32(0), subnormal, reinterpret<float>(wide))));
}

inline Expr narrow(Expr x, Type element, Type storage) {
    if (element == Float(32)) return x;
    if (storage == Float(16)) return cast(Float(16), x);
    Expr bits = reinterpret<uint32_t>(x), result;
    if (element == BFloat(16)) {
        result = select(is_nan(x), u32(0x7fc0), (bits + u32(0x7fff) + ((bits >> 16) & u32(1))) >> 16);
    } else {
        Expr sign = (bits >> 16) & u32(0x8000), magnitude = bits & u32(0x7fffffff);
        Expr subnormal = cast<uint32_t>(round(reinterpret<float>(magnitude) * 16777216.0f));  // ties to even
        Expr normal = ((magnitude + u32(0xfff) + ((magnitude >> 13) & u32(1))) >> 13) - u32(112 << 10);
        result = sign | select(magnitude > u32(0x7f800000), u32(0x7e00),      // NaN
                               magnitude >= u32(0x477ff000), u32(0x7c00),     // 65520 and above: inf
                               magnitude < u32(0x38800000), subnormal, normal);
    }
    return reinterpret(storage, cast<uint16_t>(result));
}

// ln(sum_j 2^(s_j)) from a row's state: its max and its sum of 2^(s_j - max), in
// log2 units. A row whose max is -FLT_MAX has every key masked: -inf.
inline Expr log_sum_exp(Expr max_log2, Expr sum) {
    Expr minus_infinity = Internal::make_const(Float(32), -INFINITY);
    return select(max_log2 == -FLT_MAX, minus_infinity, max_log2 * float(M_LN2) + log(sum));
}

// The online-softmax merge of a part (its max, its sum of weights and its
// weighted sums of v, in log2 units) into a running state (max, sum, outs...).
inline Tuple merge_softmax_state(const Tuple &state, Expr part_max, Expr part_sum, const std::vector<Expr> &part_outs) {
    Expr new_max = max(state[0], part_max);
    Expr old_factor = exp2_nonpositive(state[0] - new_max);
    Expr part_factor = exp2_nonpositive(part_max - new_max);
    std::vector<Expr> next{new_max, state[1] * old_factor + part_sum * part_factor};
    for (size_t column = 0; column < part_outs.size(); column++) {
        next.push_back(state[2 + column] * old_factor + part_outs[column] * part_factor);
    }
    return Tuple(next);
}

// Whether query `row` attends to key `key`: the padding mask (its byte for the
// key, read only when has_mask) and causal (key j is masked for query i when
// j > i + causal_offset). A masked score is -FLT_MAX, as the seed's masked_fill.
inline Expr key_allowed(Expr has_mask, Expr mask_byte, Expr causal, Expr key, Expr row, Expr causal_offset) {
    return (!has_mask || mask_byte != 0) && (!causal || key <= row + causal_offset);
}

// Whether dropout keeps the weight of (batch, head, row, key): the hash of
// attend/dropout_hash.hpp against the threshold (0: no dropout, all kept).
inline Expr dropout_kept(Expr seed_lo, Expr seed_hi, Expr batch, Expr head, Expr row, Expr key, Expr drop_threshold) {
    auto literal = [](uint32_t x) { return u32(x); };
    Expr head_key = attend::dropout::head_key<Expr>(seed_lo, seed_hi, cast<uint32_t>(batch), cast<uint32_t>(head), literal);
    Expr row_key = attend::dropout::row_key<Expr>(head_key, cast<uint32_t>(row), literal);
    return drop_threshold == u32(0) ||
           attend::dropout::uniform24<Expr>(row_key, cast<uint32_t>(key), literal) >= drop_threshold;
}

// Fails generation unless the generator's arguments are the kernel ABI's names
// in order (include/attend/kernel_abi.hpp): a kernel that would be called with
// its arguments swapped never builds.
template <size_t N>
void check_kernel_abi(const std::vector<Internal::AbstractGenerator::ArgInfo> &args, const char *const (&abi)[N]) {
    std::string got, expected;
    for (const auto &arg : args) got += (got.empty() ? "" : ", ") + arg.name;
    for (const char *name : abi) expected += (expected.empty() ? "" : ", ") + std::string(name);
    _halide_user_assert(got == expected) << "the generator's arguments (" << got
                                         << ") differ from the kernel ABI's (" << expected
                                         << "): include/attend/kernel_abi.hpp and the generator must agree";
}

}  // namespace attend::kernel_exprs

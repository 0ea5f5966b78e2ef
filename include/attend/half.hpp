// float16 and bfloat16 on the host, as bit patterns: conversions from float32
// rounding to nearest, ties to even (as the kernels round out), and back (exact).
// For callers that hold float32 data, the CLI and the tests.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "attend/attend.hpp"

namespace attend {

inline uint32_t float_bits(float value) {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof bits);
    return bits;
}

inline float float_from_bits(uint32_t bits) {
    float value;
    std::memcpy(&value, &bits, sizeof value);
    return value;
}

inline uint16_t float_to_float16_bits(float value) {
    const uint32_t bits = float_bits(value), sign = (bits >> 16) & 0x8000u, magnitude = bits & 0x7fffffffu;
    if (magnitude > 0x7f800000u) return uint16_t(sign | 0x7e00u);   // NaN
    if (magnitude >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // 65520 and above round to inf
    if (magnitude < 0x38800000u) {                                  // below 2^-14: a subnormal half (or 0)
        // value * 2^24 is exact; nearbyint rounds ties to even.
        return uint16_t(sign | uint32_t(std::nearbyint(float_from_bits(magnitude) * 16777216.0f)));
    }
    const uint32_t rounded = magnitude + 0xfffu + ((magnitude >> 13) & 1u);  // ties to even at bit 13
    return uint16_t(sign | ((rounded >> 13) - (112u << 10)));                // rebias 127 -> 15
}

inline float float16_bits_to_float(uint16_t half) {
    const uint32_t sign = uint32_t(half & 0x8000u) << 16, exponent = (half >> 10) & 0x1fu, mantissa = half & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24
        const float magnitude = std::ldexp(float(mantissa), -24);
        return sign ? -magnitude : magnitude;
    }
    if (exponent == 31) return float_from_bits(sign | 0x7f800000u | (mantissa << 13));  // inf, NaN
    return float_from_bits(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

inline uint16_t float_to_bfloat16_bits(float value) {
    const uint32_t bits = float_bits(value);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return uint16_t((bits >> 16) | 0x40u);  // NaN stays NaN
    return uint16_t((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);                // ties to even at bit 16
}

inline float bfloat16_bits_to_float(uint16_t bf16) { return float_from_bits(uint32_t(bf16) << 16); }

// The same for a 16-bit DType (Float16 or BFloat16).
inline uint16_t float_to_bits(float value, DType dtype) {
    return dtype == DType::BFloat16 ? float_to_bfloat16_bits(value) : float_to_float16_bits(value);
}
inline float bits_to_float(uint16_t bits, DType dtype) {
    return dtype == DType::BFloat16 ? bfloat16_bits_to_float(bits) : float16_bits_to_float(bits);
}

}  // namespace attend

// DLPack element types as Attend reads them, defined once: the bool code (the
// bundled dlpack.h predates kDLBool), DType <-> DLDataType, and names for errors.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include <HalideRuntime.h>
#include <dlpack/dlpack.h>

#include "attend/attend.hpp"

namespace attend::dlpack {

inline constexpr uint8_t kBoolCode = 6;  // kDLBool in DLPack >= 0.8
inline constexpr DLDataType kBool{kBoolCode, 8, 1};
inline constexpr DLDataType kFloat32{kDLFloat, 32, 1};

// DLPack's name for a DType.
inline DLDataType type_of(DType dtype) {
    switch (dtype) {
    case DType::Float16: return DLDataType{kDLFloat, 16, 1};
    case DType::BFloat16: return DLDataType{kDLBfloat, 16, 1};
    default: return kFloat32;
    }
}

// The DType of a DLPack type; nullopt unless float32, float16 or bfloat16.
inline std::optional<DType> dtype_of(DLDataType t) {
    if (t.lanes != 1) return std::nullopt;
    if (t.code == kDLFloat && t.bits == 32) return DType::Float32;
    if (t.code == kDLFloat && t.bits == 16) return DType::Float16;
    if (t.code == kDLBfloat && t.bits == 16) return DType::BFloat16;
    return std::nullopt;
}

inline bool is_float32(DLDataType t) { return t.code == kDLFloat && t.bits == 32 && t.lanes == 1; }

// A key mask: bool, or uint8 (nonzero = attend).
inline bool is_mask_type(DLDataType t) { return (t.code == kBoolCode || t.code == kDLUInt) && t.bits == 8 && t.lanes == 1; }

// Halide's element type as DLPack's (Halide's bool, uint1, is one byte: DLPack bool).
inline DLDataType from_halide(halide_type_t t) {
    if (t.code == halide_type_uint && t.bits == 1) return DLDataType{kBoolCode, 8, uint16_t(t.lanes)};
    const uint8_t code = t.code == halide_type_float ? uint8_t(kDLFloat)
                         : t.code == halide_type_int ? uint8_t(kDLInt)
                         : t.code == halide_type_uint ? uint8_t(kDLUInt)
                                                      : uint8_t(kDLBfloat);
    return DLDataType{code, t.bits, t.lanes};
}

// And back (DLPack bool: Halide's bool; a code Halide has no type for: a
// handle, which validation rejects).
inline halide_type_t to_halide(DLDataType t) {
    if (t.code == kBoolCode) return halide_type_t(halide_type_uint, 1, t.lanes);
    const halide_type_code_t code = t.code == kDLFloat    ? halide_type_float
                                    : t.code == kDLInt    ? halide_type_int
                                    : t.code == kDLUInt   ? halide_type_uint
                                    : t.code == kDLBfloat ? halide_type_bfloat
                                                          : halide_type_handle;
    return halide_type_t(code, t.bits, t.lanes);
}

// For error messages: "float32", "bool", "uint8", "float16x4", ...
inline std::string name_of(DLDataType t) {
    std::string s;
    switch (t.code) {
    case kDLInt: s = "int" + std::to_string(t.bits); break;
    case kDLUInt: s = "uint" + std::to_string(t.bits); break;
    case kDLFloat: s = "float" + std::to_string(t.bits); break;
    case kDLBfloat: s = "bfloat" + std::to_string(t.bits); break;
    case kBoolCode: s = "bool"; break;
    default: s = "dtype code " + std::to_string(t.code) + " (" + std::to_string(t.bits) + " bits)";
    }
    if (t.lanes != 1) s += "x" + std::to_string(t.lanes);
    return s;
}

}  // namespace attend::dlpack

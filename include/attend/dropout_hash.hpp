// The dropout keep/drop decision: a pure function of (seed, b, h, i, j), shared by
// every kernel (through the Halide generators) and by the test oracle, so the same
// seed drops the same weights on every device and schedule.
//
// Written once as a template over the integer type: U is uint32_t on the host and
// a UInt(32) Halide::Expr inside the generators. `lit` turns a constant into a U.
#pragma once
#include <cstdint>

namespace attend::dropout {

// The 32-bit finaliser of MurmurHash3: a bijection with full avalanche.
template <class U, class Lit>
U mix32(U x, Lit lit) {
    x = x ^ (x >> lit(16));
    x = x * lit(0x85ebca6bu);
    x = x ^ (x >> lit(13));
    x = x * lit(0xc2b2ae35u);
    x = x ^ (x >> lit(16));
    return x;
}

// Key of one (seed, batch, head): computed once per head, outside the hot loop.
template <class U, class Lit>
U head_key(U seed_lo, U seed_hi, U batch, U head, Lit lit) {
    U x = mix32(seed_hi + lit(0x9e3779b9u), lit);
    x = mix32(x ^ seed_lo, lit);
    x = mix32(x + batch * lit(0x632be5abu), lit);
    return mix32(x + head * lit(0x85157af5u), lit);
}

// Key of one query row.
template <class U, class Lit>
U row_key(U head_key_value, U row, Lit lit) {
    return mix32(head_key_value + row * lit(0x9e3779b9u), lit);
}

// 24 uniform bits for (row, key): a weight is dropped when these are below
// threshold = round(p * 2^24), so p = 0 keeps all and p = 1 drops all.
template <class U, class Lit>
U uniform24(U row_key_value, U key, Lit lit) {
    return mix32(row_key_value ^ (key * lit(0xcc9e2d51u)), lit) >> lit(8);
}

inline uint32_t threshold_for(double p) {
    return static_cast<uint32_t>(p * 16777216.0 + 0.5);
}

// Host versions, used by the oracle and to document the contract.
inline uint32_t host_lit(uint32_t x) { return x; }
inline bool keep(uint64_t seed, uint32_t b, uint32_t h, uint32_t i, uint32_t j, uint32_t threshold) {
    uint32_t hk = head_key<uint32_t>(uint32_t(seed), uint32_t(seed >> 32), b, h, host_lit);
    return uniform24<uint32_t>(row_key<uint32_t>(hk, i, host_lit), j, host_lit) >= threshold;
}

}  // namespace attend::dropout

// Calls past the sizes of 32-bit indexing, for real (several GiB of memory each,
// so not run under the sanitizers): a float32 q of 2.5 GiB (past 2^31 bytes,
// under 2^31 elements: one kernel call, which the runtime once refused), and a
// 16-bit q of 2^31 + 2^19 elements (4 GiB: the runtime runs it in pieces of
// heads, its batch stride past 32 bits). Each against slices of its rows
// computed as calls of their own (query_offset keeping causal global).
#include <sys/sysinfo.h>

#include <cstring>
#include <random>

#include <doctest/doctest.h>

#include "attend/attend.hpp"
#include "attend/dlpack_types.hpp"
#include "attend/half.hpp"

using namespace attend;

namespace {

// A host tensor in C order.
struct Host {
    std::vector<int64_t> shape, strides;
    DLDataType dtype;
    std::vector<uint8_t> bytes;

    Host(std::vector<int64_t> dims, DLDataType type) : shape(std::move(dims)), dtype(type) {
        strides.assign(shape.size(), 1);
        for (int i = int(shape.size()) - 2; i >= 0; i--) {
            strides[size_t(i)] = strides[size_t(i) + 1] * shape[size_t(i) + 1];
        }
        bytes.resize(size_t(strides[0] * shape[0]) * element_bytes());
    }
    size_t element_bytes() const { return size_t(dtype.bits / 8); }

    // The view of heads [h, h + 1) and rows [i0, i0 + rows) of a [b, h, n, d] tensor (batch 0).
    DLTensor rows(int64_t h, int64_t i0, int64_t count) {
        DLTensor t = whole();
        t.byte_offset = uint64_t(h * strides[1] + i0 * strides[2]) * element_bytes();
        view_shape = {1, 1, count, shape[3]};
        t.shape = view_shape.data();
        return t;
    }
    DLTensor head(int64_t h) { return rows(h, 0, shape[2]); }
    DLTensor whole() {
        DLTensor t{};
        t.data = bytes.data();
        t.device = {kDLCPU, 0};
        t.ndim = int(shape.size());
        t.dtype = dtype;
        t.shape = shape.data();
        t.strides = strides.data();
        return t;
    }
    std::vector<int64_t> view_shape;
};

// Random values in [-2, 2) in the dtype, a block of 2^20 elements repeated (fast to fill).
void fill(Host &t, DType dtype, uint32_t seed) {
    std::mt19937 rng(seed);
    std::uniform_real_distribution<float> uniform(-2.0f, 2.0f);
    const size_t block = size_t(1) << 20, size = t.element_bytes();
    std::vector<uint8_t> pattern(block * size);
    for (size_t i = 0; i < block; i++) {
        const float x = uniform(rng);
        if (dtype == DType::Float32) std::memcpy(&pattern[i * size], &x, size);
        else {
            const uint16_t bits = float_to_bits(x, dtype);
            std::memcpy(&pattern[i * size], &bits, size);
        }
    }
    for (size_t at = 0; at < t.bytes.size(); at += pattern.size()) {
        std::memcpy(&t.bytes[at], pattern.data(), std::min(pattern.size(), t.bytes.size() - at));
    }
}

bool built(DType dtype) {
    for (const KernelInfo &k : available_kernels()) {
        if (k.dtype == dtype && k.device == Device::CPU && k.operation == Operation::Forward) return true;
    }
    return false;
}

bool enough_memory(double gib) {
    struct sysinfo info {};
    if (sysinfo(&info) != 0) return true;
    return double(info.totalram) * info.mem_unit >= gib * double(1 << 30);
}

// forward over q [1, h, n, 64] and k, v [1, h, 16, 64] (top-left causal), then
// rows at the start and end of the first and last heads as calls of their own:
// bitwise the same out and lse.
void check_large(DType dtype, int64_t h, int64_t n) {
    const DLDataType type = dlpack::type_of(dtype);
    const int64_t m = 16, d = 64, slice = 4096;
    Host q({1, h, n, d}, type), k({1, h, m, d}, type), v({1, h, m, d}, type), out({1, h, n, d}, type);
    Host lse({1, h, n}, DLDataType{kDLFloat, 32, 1});
    fill(q, dtype, 1);
    fill(k, dtype, 2);
    fill(v, dtype, 3);
    Options options;
    options.causal = true;
    {
        DLTensor tq = q.whole(), tk = k.whole(), tv = v.whole(), tout = out.whole(), tlse = lse.whole();
        forward(tq, tk, tv, nullptr, tout, &tlse, options);
    }
    for (int64_t head : {int64_t(0), h - 1}) {
        for (int64_t i0 : {int64_t(0), n - slice}) {
            Host part_out({1, 1, slice, d}, type), part_lse({1, 1, slice}, DLDataType{kDLFloat, 32, 1});
            Options at = options;
            at.query_offset = i0;  // the rows' global positions: causal as in the whole call
            DLTensor tq = q.rows(head, i0, slice), tk = k.head(head), tv = v.head(head), tout = part_out.whole(),
                     tlse = part_lse.whole();
            forward(tq, tk, tv, nullptr, tout, &tlse, at);
            const size_t row_bytes = size_t(d) * q.element_bytes();
            const uint8_t *whole_out = &out.bytes[size_t(head * n + i0) * row_bytes];
            const uint8_t *whole_lse = &lse.bytes[size_t(head * n + i0) * sizeof(float)];
            INFO(to_string(dtype) << ": head " << head << ", rows from " << i0);
            CHECK(std::memcmp(whole_out, part_out.bytes.data(), part_out.bytes.size()) == 0);
            CHECK(std::memcmp(whole_lse, part_lse.bytes.data(), part_lse.bytes.size()) == 0);
        }
    }
}

}  // namespace

TEST_CASE("float32 q of 2.5 GiB: past 2^31 bytes, one kernel call, equal to its slices") {
    if (!enough_memory(12)) {
        MESSAGE("skipped: needs 12 GiB of memory");
        return;
    }
    check_large(DType::Float32, 4, 2621440);  // 4 · 2621440 · 64 = 671088640 elements
}

TEST_CASE("16-bit q of 2^31 + 2^19 elements: in pieces of heads, equal to its slices") {
    const DType dtype = built(DType::Float16) ? DType::Float16 : DType::BFloat16;
    if (!built(dtype)) {
        MESSAGE("skipped: no 16-bit kernels in this build");
        return;
    }
    if (!enough_memory(16)) {
        MESSAGE("skipped: needs 16 GiB of memory");
        return;
    }
    check_large(dtype, 2, 16781312);  // 2 · 16781312 · 64 = 2148007936 elements
}

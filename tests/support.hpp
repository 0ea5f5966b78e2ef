// Test support: tensors that own their memory and lend DLTensor views, random
// inputs, and the comparison with the double-precision oracle.
// (doctest 2.4 prints a const char * given to INFO or MESSAGE as its address:
// pass a std::string.)
#pragma once

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include <doctest/doctest.h>

#include "attend/attend.hpp"
#include "attend/dlpack_types.hpp"
#include "attend/reference.hpp"

namespace attend::test {

// A tensor in PyTorch's order over its own storage, with any strides.
template <class T>
struct Tensor {
    std::vector<T> storage;
    std::vector<int64_t> shape, strides;
    DLDataType dtype{};
    int64_t offset = 0;  // elements before the first one

    int64_t numel() const {
        int64_t n = 1;
        for (auto s : shape) n *= s;
        return n;
    }
    // Element at a multi-index (PyTorch order).
    T &at(std::initializer_list<int64_t> index) {
        int64_t o = offset, d = 0;
        for (auto i : index) o += i * strides[size_t(d++)];
        return storage[size_t(o)];
    }
    DLTensor dl() {
        DLTensor t{};
        t.data = storage.data();
        t.byte_offset = uint64_t(offset) * sizeof(T);
        t.device = {kDLCPU, 0};
        t.ndim = int(shape.size());
        t.dtype = dtype;
        t.shape = shape.data();
        t.strides = strides.data();
        return t;
    }
    // The elements in C order (undoing any strides).
    std::vector<T> dense() const {
        std::vector<T> out;
        out.reserve(size_t(numel()));
        std::vector<int64_t> index(shape.size(), 0);
        for (int64_t e = 0; e < numel(); e++) {
            int64_t o = offset;
            for (size_t d = 0; d < shape.size(); d++) o += index[d] * strides[d];
            out.push_back(storage[size_t(o)]);
            for (int d = int(shape.size()) - 1; d >= 0; d--) {
                if (++index[size_t(d)] < shape[size_t(d)]) break;
                index[size_t(d)] = 0;
            }
        }
        return out;
    }
};

// The kernels this build was configured with (tests/CMakeLists.txt passes
// ATTEND_HEAD_DIMS and ATTEND_DTYPES): a test tree may have fewer than the
// defaults (./build.sh's TSan tree does, and says so in its test names), and the
// tests run the kernels it has.
inline std::vector<std::string> split_list(const std::string &list) {
    std::vector<std::string> items;
    for (size_t start = 0; start <= list.size();) {
        size_t end = std::min(list.find(',', start), list.size());
        if (end > start) items.push_back(list.substr(start, end - start));
        start = end + 1;
    }
    return items;
}
// The message of the std::invalid_argument that call() throws; empty when it throws none.
template <typename Call>
std::string rejection_of(Call &&call) {
    try {
        call();
    } catch (const std::invalid_argument &e) {
        return e.what();
    }
    return {};
}

inline std::vector<int64_t> built_head_dims() {
    std::vector<int64_t> dims;
    for (const auto &d : split_list(ATTEND_TEST_HEAD_DIMS)) dims.push_back(std::stoll(d));
    return dims;
}
inline bool has_head_dim(int64_t d) {
    auto dims = built_head_dims();
    return std::find(dims.begin(), dims.end(), d) != dims.end();
}
// Those of `wanted` the build has a specialised kernel for; if none, its first one.
inline std::vector<int64_t> built_among(std::initializer_list<int64_t> wanted) {
    std::vector<int64_t> dims;
    for (int64_t d : wanted) {
        if (has_head_dim(d)) dims.push_back(d);
    }
    if (dims.empty()) dims.push_back(built_head_dims().at(0));
    return dims;
}
inline std::vector<DType> built_dtypes() {
    std::vector<DType> dtypes;
    for (const auto &name : split_list(ATTEND_TEST_DTYPES)) {
        for (DType t : {DType::Float32, DType::Float16, DType::BFloat16}) {
            if (name == to_string(t)) dtypes.push_back(t);
        }
    }
    return dtypes;
}
inline std::vector<DType> built_16bit_dtypes() {
    std::vector<DType> dtypes = built_dtypes();
    dtypes.erase(std::remove(dtypes.begin(), dtypes.end(), DType::Float32), dtypes.end());
    return dtypes;
}

inline DLDataType float32_type() { return DLDataType{kDLFloat, 32, 1}; }
inline DLDataType bool_type() { return dlpack::kBool; }

// A dense tensor, C order, or with its dims laid out in memory in `memory_order`
// (a permutation, outermost first), e.g. {0, 2, 1, 3}: [b, n, h, d] memory seen as [b, h, n, d].
template <class T>
Tensor<T> make_tensor(std::vector<int64_t> shape, DLDataType dtype, std::vector<int> memory_order = {}) {
    Tensor<T> t;
    t.shape = shape;
    t.dtype = dtype;
    t.strides.assign(shape.size(), 0);
    if (memory_order.empty()) {
        for (size_t i = 0; i < shape.size(); i++) memory_order.push_back(int(i));
    }
    int64_t stride = 1;
    for (int r = int(memory_order.size()) - 1; r >= 0; r--) {
        t.strides[size_t(memory_order[size_t(r)])] = stride;
        stride *= shape[size_t(memory_order[size_t(r)])];
    }
    t.storage.assign(size_t(std::max<int64_t>(stride, 1)), T{});
    return t;
}

inline Tensor<float> random_tensor(std::vector<int64_t> shape, uint32_t seed, std::vector<int> memory_order = {}) {
    auto t = make_tensor<float>(shape, float32_type(), memory_order);
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    for (auto &x : t.storage) x = normal(rng);
    return t;
}

inline Tensor<float> nan_tensor(std::vector<int64_t> shape, std::vector<int> memory_order = {}) {
    auto t = make_tensor<float>(shape, float32_type(), memory_order);
    std::fill(t.storage.begin(), t.storage.end(), std::numeric_limits<float>::quiet_NaN());
    return t;
}

// mask [b, m]: each key kept with probability keep_fraction.
inline Tensor<uint8_t> random_mask(int64_t b, int64_t m, double keep_fraction, uint32_t seed) {
    auto t = make_tensor<uint8_t>({b, m}, bool_type());
    std::mt19937 rng(seed);
    std::bernoulli_distribution keep(keep_fraction);
    for (auto &x : t.storage) x = keep(rng) ? 1 : 0;
    return t;
}

// The oracle's answer: out [b, h, n, dv] (the vector itself) and lse [b, h, n].
struct Expected : std::vector<double> {
    std::vector<double> lse;
};

// One attention problem: inputs, outputs full of NaN (so an element a kernel
// fails to write is caught), and the oracle's answer.
struct Problem {
    reference::Shape shape;
    Tensor<float> q, k, v, out;
    std::optional<Tensor<uint8_t>> mask;
    std::optional<Tensor<float>> lse;  // asked for when present
    Options options;

    void run() {
        DLTensor dq = q.dl(), dk = k.dl(), dv = v.dl(), dout = out.dl();
        DLTensor dmask = mask ? mask->dl() : DLTensor{}, dlse = lse ? lse->dl() : DLTensor{};
        attend::forward(dq, dk, dv, mask ? &dmask : nullptr, dout, lse ? &dlse : nullptr, options);
    }
    Expected expected() const {
        auto qd = q.dense(), kd = k.dense(), vd = v.dense();
        std::vector<uint8_t> md;
        if (mask) md = mask->dense();
        Expected e;
        static_cast<std::vector<double> &>(e) = reference::forward(shape, qd.data(), kd.data(), vd.data(),
                                                                   mask ? md.data() : nullptr, options, &e.lse);
        return e;
    }
};

struct ProblemSpec {
    int64_t b = 1, h = 1, kv_heads = 1, n = 1, m = 1, d = 8, dv = 8;  // kv_heads 0: multi-query
    bool mask = false;
    double mask_keep = 0.7;
    std::vector<int> q_order, kv_order, out_order;  // memory layouts (empty: C order)
    uint32_t seed = 1;
    bool lse = true;  // ask for lse (checked against the oracle's)
};

// b batches of h heads (and as many kv heads), n queries, m keys, d = dv.
inline ProblemSpec spec_of(int64_t b, int64_t h, int64_t n, int64_t m, int64_t d) {
    ProblemSpec spec;
    spec.b = b;
    spec.h = spec.kv_heads = h;
    spec.n = n;
    spec.m = m;
    spec.d = spec.dv = d;
    return spec;
}

inline Problem make_problem(const ProblemSpec &s, Options options = {}) {
    Problem p;
    p.shape = reference::Shape{s.b, s.h, s.kv_heads, s.n, s.m, s.d, s.dv};
    p.q = random_tensor({s.b, s.h, s.n, s.d}, s.seed, s.q_order);
    if (s.kv_heads == 0) {
        p.k = random_tensor({s.b, s.m, s.d}, s.seed + 1);
        p.v = random_tensor({s.b, s.m, s.dv}, s.seed + 2);
    } else {
        p.k = random_tensor({s.b, s.kv_heads, s.m, s.d}, s.seed + 1, s.kv_order);
        p.v = random_tensor({s.b, s.kv_heads, s.m, s.dv}, s.seed + 2, s.kv_order);
    }
    p.out = nan_tensor({s.b, s.h, s.n, s.dv}, s.out_order);
    if (s.mask) p.mask = random_mask(s.b, s.m, s.mask_keep, s.seed + 3);
    if (s.lse) p.lse = nan_tensor({s.b, s.h, s.n});
    p.options = options;
    return p;
}

// The fp32 error bound of one output element, from a probabilistic rounding
// analysis (errors of n-term sums grow like sqrt(n)·eps with high probability,
// Higham & Mary 2019), with a safety factor of 4:
//  - each score is a d-term dot product: absolute error ~ sqrt(d)·eps·scale·Σ|q k|,
//    and Σ|q k| <= |q|·|k| (Cauchy-Schwarz, largest row norms);
//  - the softmax turns a score error Δ into a relative weight error of about 2Δ,
//    plus the 2^x polynomial (2e-7, inside the constant term);
//  - the weighted sum and the normaliser are m-term sums: relative error ~ sqrt(m)·eps.
// Scaled by the largest |v| and by the dropout factor 1/(1-p).
inline double largest_row_norm(const std::vector<float> &dense, int64_t row_length) {
    double largest = 0;
    for (size_t r = 0; r + size_t(row_length) <= dense.size(); r += size_t(row_length)) {
        double sum = 0;
        for (int64_t c = 0; c < row_length; c++) sum += double(dense[r + size_t(c)]) * dense[r + size_t(c)];
        largest = std::max(largest, std::sqrt(sum));
    }
    return largest;
}

// The largest |score| the Cauchy-Schwarz bound allows: scale·|q|·|k|.
inline double score_magnitude(const Problem &p) {
    double scale = p.options.scale ? std::fabs(*p.options.scale) : 1.0 / std::sqrt(double(p.shape.d));
    return scale * largest_row_norm(p.q.dense(), p.shape.d) * largest_row_norm(p.k.dense(), p.shape.d);
}

inline double fp32_tolerance(const Problem &p) {
    const double eps = FLT_EPSILON;
    double max_v = 0;
    for (auto x : p.v.dense()) max_v = std::max(max_v, double(std::fabs(x)));
    double d = double(p.shape.d), m = double(p.shape.m);
    bool dropout = p.options.training && p.options.dropout > 0 && p.options.dropout < 1;
    double keep_scale = dropout ? 1.0 / (1.0 - p.options.dropout) : 1.0;
    return 4.0 * eps * max_v * keep_scale * (2.0 * std::sqrt(d) * score_magnitude(p) + std::sqrt(m) + 8.0);
}

struct Comparison {
    double max_error = 0;
    int64_t not_finite = 0;  // NaN left in out: an element the kernel did not write
};

inline Comparison compare(const std::vector<float> &got, const std::vector<double> &expected) {
    Comparison c;
    REQUIRE(got.size() == expected.size());
    for (size_t i = 0; i < got.size(); i++) {
        if (!std::isfinite(got[i])) {
            c.not_finite++;
            continue;
        }
        c.max_error = std::max(c.max_error, std::fabs(double(got[i]) - expected[i]));
    }
    return c;
}

// The fp32 error bound of lse = ln sum_j exp(s_j) = max + ln(sum of 2^(s_j - max)):
// the score error of fp32_tolerance (sqrt(d)·eps·|q|·|k|·scale, absolute, passes
// through unchanged), the m-term sum (sqrt(m)·eps relative, so absolute in the
// log), and rounding of the result itself (eps·|lse|), with the same factor 4.
inline double lse_tolerance(const Problem &p, double largest_lse) {
    const double eps = FLT_EPSILON;
    double d = double(p.shape.d), m = double(p.shape.m);
    return 4.0 * eps * (std::sqrt(d) * score_magnitude(p) + std::sqrt(m) + largest_lse + 8.0);
}

// lse against the oracle: -inf exactly where every key is masked, else within
// lse_tolerance.
inline void check_lse(const Problem &p, const std::vector<double> &expected) {
    auto got = p.lse->dense();
    REQUIRE(got.size() == expected.size());
    double largest = 0, max_error = 0;
    int64_t wrong_infinite = 0;
    for (double e : expected) largest = std::isfinite(e) ? std::max(largest, std::fabs(e)) : largest;
    for (size_t i = 0; i < got.size(); i++) {
        if (std::isinf(expected[i]) || !std::isfinite(got[i])) {
            wrong_infinite += got[i] != expected[i];
            continue;
        }
        max_error = std::max(max_error, std::fabs(double(got[i]) - expected[i]));
    }
    double tolerance = lse_tolerance(p, largest);
    INFO("lse max error " << max_error << ", tolerance " << tolerance << ", wrong where -inf expected or not finite "
                          << wrong_infinite);
    CHECK(wrong_infinite == 0);
    CHECK(max_error <= tolerance);
}

// The bound on a merge of `parts` parts: each part's out is within
// fp32_tolerance (its m is smaller); a weight exp(lse_p - lse) is off by about
// the lse error (relative), which scales the largest |v|; each merge rounds out
// once more (eps |v|).
inline double merge_tolerance(const Problem &whole, const Expected &expected, int parts) {
    double max_v = 0, largest_lse = 0;
    for (float x : whole.v.dense()) max_v = std::max(max_v, double(std::fabs(x)));
    for (double l : expected.lse) largest_lse = std::isfinite(l) ? std::max(largest_lse, std::fabs(l)) : largest_lse;
    return fp32_tolerance(whole) + 2.0 * lse_tolerance(whole, largest_lse) * max_v + double(parts) * FLT_EPSILON * max_v;
}

// Runs p and checks it (out, and lse if p asks for it) against the oracle within
// the fp32 tolerance.
inline void check_against_reference(Problem &p, const Expected &expected) {
    p.run();
    auto c = compare(p.out.dense(), expected);
    double tolerance = fp32_tolerance(p);
    INFO("max error " << c.max_error << ", tolerance " << tolerance << ", unwritten " << c.not_finite);
    CHECK(c.not_finite == 0);
    CHECK(c.max_error <= tolerance);
    if (p.lse) check_lse(p, expected.lse);
}

}  // namespace attend::test

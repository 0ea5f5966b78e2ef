// attend_tune_probe: checks and times candidate kernels for tools/tune.py.
//
//   attend_tune_probe [--backward] HEAD_DIM REPEATS LIBRARY.so:FUNCTION... -- SHAPE...
//
// Each LIBRARY.so holds FUNCTION, a float32 CPU kernel generated for this machine
// with `-user_context-no_runtime` (it uses libattend's Halide runtime): a forward
// kernel, or with --backward a backward one. The probe registers each with
// attend::add_kernel, so it runs through the same validation and marshalling as
// a built-in kernel, then:
//   1. checks each against the double-precision reference on small shapes that cut
//      tiles and key blocks short (grouped-query heads, a padding mask with a fully
//      masked row, bottom-right causal, dropout): a wrong schedule is never timed;
//   2. times each SHAPE (b,h,n,m[,causal]) on the others, interleaved call by call:
//      a warm-up round, then at least REPEATS rounds and at least 0.25 s per kernel
//      (small shapes get more rounds, up to 200). A backward call gets out and lse
//      from the build's own forward kernel, computed once per shape.
// It prints one JSON object: {"kernels": [{"function", "ok", ...}], "shapes":
// [{..., "ms": [[per kernel]]}]}. Exit status: 0, or 1 when a kernel is wrong (the
// others are still timed) or cannot be loaded, 2 for bad usage.
#include <dlfcn.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "attend/attend.hpp"
#include "attend/kernel_abi.hpp"
#include "attend/reference.hpp"
#include "timing.hpp"

namespace {

using namespace attend;

std::vector<float> normal_floats(size_t count, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    std::vector<float> x(count);
    for (auto &e : x) e = normal(rng);
    return x;
}

DLTensor host_tensor(std::vector<float> &data, std::vector<int64_t> &shape) {
    DLTensor t{};
    t.data = data.data();
    t.device = {kDLCPU, 0};
    t.ndim = int(shape.size());
    t.shape = shape.data();
    t.dtype = {kDLFloat, 32, 1};
    return t;
}

std::vector<float> to_float(const std::vector<double> &x) { return std::vector<float>(x.begin(), x.end()); }

double largest_row_norm(const std::vector<float> &x, int64_t d) {
    double largest = 0;
    for (size_t row = 0; row < x.size() / size_t(d); row++) {
        double sum = 0;
        for (int64_t c = 0; c < d; c++) sum += double(x[row * size_t(d) + size_t(c)]) * x[row * size_t(d) + size_t(c)];
        largest = std::max(largest, std::sqrt(sum));
    }
    return largest;
}

struct Problem {
    reference::Shape shape;
    std::vector<float> q, k, v;
    std::vector<uint8_t> mask;  // empty: none
    Options options;

    std::vector<int64_t> q_shape() const { return {shape.b, shape.h, shape.n, shape.d}; }
    std::vector<int64_t> k_shape() const { return {shape.b, shape.kv_heads, shape.m, shape.d}; }
    std::vector<int64_t> v_shape() const { return {shape.b, shape.kv_heads, shape.m, shape.dv}; }
    std::vector<int64_t> out_shape() const { return {shape.b, shape.h, shape.n, shape.dv}; }
    double score_magnitude() const {
        const double scale = options.scale ? *options.scale : 1.0 / std::sqrt(double(shape.d));
        return scale * largest_row_norm(q, shape.d) * largest_row_norm(k, shape.d);
    }
};

// The mask of p as a DLTensor (its shape in `shape`), or an empty one.
DLTensor mask_tensor(const Problem &p, std::vector<int64_t> &shape) {
    DLTensor mask{};
    shape = {p.shape.b, p.shape.m};
    if (!p.mask.empty()) {
        mask.data = const_cast<uint8_t *>(p.mask.data());
        mask.device = {kDLCPU, 0};
        mask.ndim = 2;
        mask.dtype = {kDLUInt, 8, 1};
        mask.shape = shape.data();
    }
    return mask;
}

// The largest error / bound ratio of `got` against `expected`, and that error and
// bound (NaN or infinity in got: an infinite error).
struct Check {
    double ratio = -1, error = 0, bound = 0;
    void add(double got_error, double element_bound) {
        if (!(got_error / element_bound <= ratio)) {  // NaN counts as worst
            ratio = got_error / element_bound;
            error = got_error;
            bound = element_bound;
        }
    }
};

// Runs p's forward through the candidate and returns (max |error| against the
// reference, the float32 bound). The bound is the test suite's
// (tests/support.hpp, fp32_tolerance): rounding of the scores (sqrt(d) eps |q|
// |k| scale, through the softmax into out), of the m-term sums (sqrt(m) eps),
// and of the result, times 4.
std::pair<double, double> check_forward(const Problem &p) {
    auto q = p.q, k = p.k, v = p.v;
    std::vector<float> out(size_t(p.shape.b * p.shape.h * p.shape.n * p.shape.dv));
    auto q_shape = p.q_shape(), k_shape = p.k_shape(), v_shape = p.v_shape(), out_shape = p.out_shape();
    std::vector<int64_t> mask_shape;
    DLTensor dq = host_tensor(q, q_shape), dk = host_tensor(k, k_shape), dv = host_tensor(v, v_shape),
             dout = host_tensor(out, out_shape), dmask = mask_tensor(p, mask_shape);
    forward(dq, dk, dv, p.mask.empty() ? nullptr : &dmask, dout, p.options);
    auto expected = reference::forward(p.shape, p.q.data(), p.k.data(), p.v.data(),
                                       p.mask.empty() ? nullptr : p.mask.data(), p.options);
    double error = 0;
    for (size_t e = 0; e < out.size(); e++) {
        double diff = std::fabs(double(out[e]) - expected[e]);
        error = std::isfinite(out[e]) ? std::max(error, diff) : INFINITY;
    }
    const double eps = FLT_EPSILON, d = double(p.shape.d), m = double(p.shape.m);
    double max_v = 0;
    for (float x : p.v) max_v = std::max(max_v, double(std::fabs(x)));
    const bool dropout = p.options.training && p.options.dropout > 0;
    const double keep_scale = dropout ? 1.0 / (1.0 - p.options.dropout) : 1.0;
    return {error, 4.0 * eps * max_v * keep_scale * (2.0 * std::sqrt(d) * p.score_magnitude() + std::sqrt(m) + 8.0)};
}

// Runs p's backward through the candidate, from the reference's out and lse
// (rounded to float32: the check sees the candidate's errors alone) and a random
// dout, and returns the worst (error, bound) over dq, dk and dv by ratio. The
// bound is the test suite's (tests/backward_support.hpp, relative_bound): per
// element, 4 eps (2 sqrt(d) |score| + sqrt(dv) + |lse| + sqrt(terms summed) + 8)
// times the sum of the absolute values of its terms.
std::pair<double, double> check_backward(const Problem &p) {
    std::vector<double> lse_exact;
    auto out_exact = reference::forward(p.shape, p.q.data(), p.k.data(), p.v.data(),
                                        p.mask.empty() ? nullptr : p.mask.data(), p.options, &lse_exact);
    auto q = p.q, k = p.k, v = p.v, out = to_float(out_exact), lse = to_float(lse_exact);
    auto dout = normal_floats(out.size(), 4);
    std::vector<float> dq(q.size(), NAN), dk(k.size(), NAN), dv(v.size(), NAN);
    auto q_shape = p.q_shape(), k_shape = p.k_shape(), v_shape = p.v_shape(), out_shape = p.out_shape();
    std::vector<int64_t> lse_shape{p.shape.b, p.shape.h, p.shape.n}, mask_shape;
    DLTensor tq = host_tensor(q, q_shape), tk = host_tensor(k, k_shape), tv = host_tensor(v, v_shape),
             tout = host_tensor(out, out_shape), tlse = host_tensor(lse, lse_shape),
             tdout = host_tensor(dout, out_shape), tdq = host_tensor(dq, q_shape), tdk = host_tensor(dk, k_shape),
             tdv = host_tensor(dv, v_shape), tmask = mask_tensor(p, mask_shape);
    backward(tq, tk, tv, p.mask.empty() ? nullptr : &tmask, tout, tlse, tdout, tdq, tdk, tdv, p.options);
    const auto expected = reference::backward(p.shape, p.q.data(), p.k.data(), p.v.data(),
                                              p.mask.empty() ? nullptr : p.mask.data(), dout.data(), p.options);
    double largest_lse = 0;
    for (double x : lse_exact) {
        if (std::isfinite(x)) largest_lse = std::max(largest_lse, std::fabs(x));
    }
    const double eps = FLT_EPSILON, d = double(p.shape.d), dv_dim = double(p.shape.dv);
    const int64_t group_rows = p.shape.n * (p.shape.h / p.shape.kv_heads);
    const double scores = p.score_magnitude();
    Check worst;
    auto compare = [&](const std::vector<float> &got, const std::vector<double> &exact,
                       const std::vector<double> &terms, int64_t outer) {
        const double relative =
            4.0 * eps * (2.0 * std::sqrt(d) * scores + std::sqrt(dv_dim) + largest_lse + std::sqrt(double(outer)) + 8.0);
        for (size_t e = 0; e < got.size(); e++) {
            const double error = std::isfinite(got[e]) ? std::fabs(double(got[e]) - exact[e]) : INFINITY;
            worst.add(error, relative * terms[e] + 1e-30);
        }
    };
    compare(dq, expected.dq, expected.dq_terms, p.shape.m);
    compare(dk, expected.dk, expected.dk_terms, group_rows);
    compare(dv, expected.dv, expected.dv_terms, group_rows);
    return {worst.error, worst.bound};
}

struct Shape {
    int64_t b, h, n, m;
    bool causal;
};

Shape parse_shape(const std::string &text) {
    Shape s{};
    char causal[16] = "";
    int fields = std::sscanf(text.c_str(), "%lld,%lld,%lld,%lld,%15s", (long long *)&s.b, (long long *)&s.h,
                             (long long *)&s.n, (long long *)&s.m, causal);
    if (fields < 4 || s.b < 1 || s.h < 1 || s.n < 1 || s.m < 1 || (fields == 5 && std::string(causal) != "causal")) {
        throw std::invalid_argument("SHAPE: expected b,h,n,m or b,h,n,m,causal with positive sizes, got '" + text + "'");
    }
    s.causal = fields == 5;
    return s;
}

// The reference check of one kernel: partial query tiles and key blocks (150 rows,
// 600 keys), two query heads per kv head, batch 1 padded after 430 keys, and
// every feature. Returns (worst error, its bound) over the variants, worst by ratio.
std::pair<double, double> check_kernel(const std::string &kernel, int head_dim, bool backward_kernel) {
    Problem p;
    p.shape = {2, 4, 2, 150, 600, head_dim, head_dim};
    p.q = normal_floats(size_t(2 * 4 * 150 * head_dim), 1);
    p.k = normal_floats(size_t(2 * 2 * 600 * head_dim), 2);
    p.v = normal_floats(size_t(2 * 2 * 600 * head_dim), 3);
    p.options.kernel = kernel;
    Check worst;
    for (int variant = 0; variant < 4; variant++) {
        p.mask.clear();
        p.options.causal = variant == 2;
        p.options.causal_align = CausalAlign::BottomRight;
        p.options.training = variant == 3;
        p.options.dropout = variant == 3 ? 0.2f : 0.0f;
        p.options.seed = 7;
        if (variant >= 1) {
            p.mask.assign(2 * 600, 1);
            std::fill(p.mask.begin() + 600 + 430, p.mask.end(), 0);
            if (variant == 1) std::fill(p.mask.begin(), p.mask.begin() + 600, 0);  // batch 0 fully masked
        }
        auto [error, bound] = backward_kernel ? check_backward(p) : check_forward(p);
        worst.add(error, bound);
    }
    return {worst.error, worst.bound};
}

int probe(int argc, char **argv) {
    const bool backward_kernels = argc > 1 && std::string(argv[1]) == "--backward";
    if (backward_kernels) {  // the rest as without it
        argv++;
        argc--;
    }
    int separator = 3;
    while (separator < argc && std::string(argv[separator]) != "--") separator++;
    if (argc < 6 || separator == 3 || separator >= argc - 1) {
        std::fprintf(stderr, "usage: %s [--backward] HEAD_DIM REPEATS LIBRARY.so:FUNCTION... -- SHAPE...\n", argv[0]);
        return 2;
    }
    const int head_dim = std::atoi(argv[1]), repeats = std::atoi(argv[2]);
    if (head_dim < 1) throw std::invalid_argument(std::string("HEAD_DIM: expected a positive head dim, got ") + argv[1]);
    if (repeats < 1) throw std::invalid_argument(std::string("REPEATS: expected at least 1, got ") + argv[2]);
    std::vector<Shape> shapes;
    for (int a = separator + 1; a < argc; a++) shapes.push_back(parse_shape(argv[a]));

    // Load and register every candidate: "candidate0", "candidate1", ...
    std::vector<std::string> functions;
    for (int a = 3; a < separator; a++) {
        const std::string spec = argv[a];
        const size_t colon = spec.rfind(':');
        if (colon == std::string::npos) throw std::invalid_argument("LIBRARY.so:FUNCTION: no ':' in '" + spec + "'");
        const std::string library = spec.substr(0, colon), function = spec.substr(colon + 1);
        void *handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!handle) throw std::runtime_error("LIBRARY: cannot load " + library + ": " + dlerror());
        void *kernel = dlsym(handle, function.c_str());
        if (!kernel) throw std::runtime_error("FUNCTION: " + library + " has no function " + function);
        KernelInfo info;
        info.name = "candidate" + std::to_string(functions.size());
        info.head_dim = head_dim;
        if (backward_kernels) {
            info.operation = Operation::Backward;
            add_kernel(info, reinterpret_cast<BackwardKernel>(kernel));
        } else {
            add_kernel(info, reinterpret_cast<ForwardKernel>(kernel));
        }
        functions.push_back(function);
    }

    // 1. The check; a wrong kernel is reported and never timed.
    std::vector<size_t> timed;
    std::printf("{\"kernels\": [");
    for (size_t c = 0; c < functions.size(); c++) {
        // A kernel that fails to run (a Halide error: e.g. out-of-bounds loads
        // of a schedule whose tiles do not fit) is as wrong as one that
        // computes the wrong numbers.
        double error = INFINITY, bound = 0;
        std::string failure;
        try {
            std::tie(error, bound) = check_kernel("candidate" + std::to_string(c), head_dim, backward_kernels);
        } catch (const std::exception &e) {
            failure = e.what();
        }
        const bool ok = failure.empty() && error <= bound;
        auto json_number = [](double x) { return std::isfinite(x) ? std::to_string(x) : std::string("null"); };
        std::printf("%s{\"function\": \"%s\", \"ok\": %s, \"max_error\": %s, \"bound\": %s}", c ? ", " : "",
                    functions[c].c_str(), ok ? "true" : "false", json_number(error).c_str(), json_number(bound).c_str());
        if (ok) {
            timed.push_back(c);
        } else if (!failure.empty()) {
            std::fprintf(stderr, "attend_tune_probe: %s is wrong: it failed: %s\n", functions[c].c_str(), failure.c_str());
        } else {
            std::fprintf(stderr, "attend_tune_probe: %s is wrong: max error %.3g > bound %.3g\n", functions[c].c_str(),
                         error, bound);
        }
    }

    // 2. Timing, the candidates interleaved call by call (the machine's load
    // drifts; interleaving spreads it over all of them alike).
    std::printf("], \"shapes\": [");
    for (size_t s = 0; s < shapes.size(); s++) {
        const Shape &shape = shapes[s];
        std::vector<int64_t> q_shape{shape.b, shape.h, shape.n, head_dim}, k_shape{shape.b, shape.h, shape.m, head_dim},
            lse_shape{shape.b, shape.h, shape.n};
        auto q = normal_floats(size_t(shape.b * shape.h * shape.n * head_dim), 11),
             k = normal_floats(size_t(shape.b * shape.h * shape.m * head_dim), 12),
             v = normal_floats(size_t(shape.b * shape.h * shape.m * head_dim), 13), out = q, dout = q, dq = q,
             dk = k, dv = v;
        std::vector<float> lse(size_t(shape.b * shape.h * shape.n));
        DLTensor tq = host_tensor(q, q_shape), tk = host_tensor(k, k_shape), tv = host_tensor(v, k_shape),
                 tout = host_tensor(out, q_shape), tlse = host_tensor(lse, lse_shape),
                 tdout = host_tensor(dout, q_shape), tdq = host_tensor(dq, q_shape), tdk = host_tensor(dk, k_shape),
                 tdv = host_tensor(dv, k_shape);
        if (backward_kernels) {  // out and lse from the build's forward
            Options options;
            options.causal = shape.causal;
            forward(tq, tk, tv, nullptr, tout, &tlse, options);
        }
        std::vector<std::vector<double>> ms(functions.size());
        double total_ms = 0;
        for (int round = 0; round <= repeats || (total_ms < 250.0 * double(timed.size()) && round <= 200); round++) {
            for (size_t c : timed) {
                Options options;
                options.kernel = "candidate" + std::to_string(c);
                options.causal = shape.causal;
                const double elapsed = timing::milliseconds([&] {
                    if (backward_kernels) {
                        backward(tq, tk, tv, nullptr, tout, tlse, tdout, tdq, tdk, tdv, options);
                    } else {
                        forward(tq, tk, tv, nullptr, tout, options);
                    }
                });
                if (round > 0) {  // the first round warms up
                    ms[c].push_back(elapsed);
                    total_ms += elapsed;
                }
            }
        }
        std::printf("%s{\"b\": %lld, \"h\": %lld, \"n\": %lld, \"m\": %lld, \"d\": %d, \"causal\": %s, \"ms\": [",
                    s ? ", " : "", (long long)shape.b, (long long)shape.h, (long long)shape.n, (long long)shape.m,
                    head_dim, shape.causal ? "true" : "false");
        for (size_t c = 0; c < functions.size(); c++) {
            std::printf("%s[", c ? ", " : "");
            for (size_t r = 0; r < ms[c].size(); r++) std::printf("%s%.4f", r ? ", " : "", ms[c][r]);
            std::printf("]");
        }
        std::printf("]}");
        std::fflush(stdout);
    }
    std::printf("]}\n");
    return timed.size() == functions.size() ? 0 : 1;
}

}  // namespace

int main(int argc, char **argv) {
    try {
        return probe(argc, argv);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "attend_tune_probe: %s\n", e.what());
        return 1;
    }
}

// attend_tune_probe: checks and times candidate kernels for tools/tune.py.
//
//   attend_tune_probe HEAD_DIM REPEATS LIBRARY.so:FUNCTION... -- SHAPE...
//
// Each LIBRARY.so holds FUNCTION, a float32 CPU kernel generated for this machine
// with `-user_context-no_runtime` (it uses libattend's Halide runtime). The probe
// registers each with attend::add_kernel, so it runs through the same validation
// and marshalling as a built-in kernel, then:
//   1. checks each against the double-precision reference on small shapes that cut
//      tiles and key blocks short (grouped-query heads, a padding mask with a fully
//      masked row, bottom-right causal, dropout): a wrong schedule is never timed;
//   2. times each SHAPE (b,h,n,m[,causal]) on the others, interleaved call by call:
//      a warm-up round, then at least REPEATS rounds and at least 0.25 s per kernel
//      (small shapes get more rounds, up to 200).
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
};

// Runs p through the candidate and returns (max |error| against the reference,
// the float32 bound). The bound is the test suite's (tests/support.hpp,
// fp32_tolerance): rounding of the scores (sqrt(d) eps |q| |k| scale, through the
// softmax into out), of the m-term sums (sqrt(m) eps), and of the result, times 4.
std::pair<double, double> check(const Problem &p) {
    auto q = p.q, k = p.k, v = p.v;
    std::vector<float> out(size_t(p.shape.b * p.shape.h * p.shape.n * p.shape.dv));
    std::vector<int64_t> q_shape{p.shape.b, p.shape.h, p.shape.n, p.shape.d},
        k_shape{p.shape.b, p.shape.kv_heads, p.shape.m, p.shape.d},
        v_shape{p.shape.b, p.shape.kv_heads, p.shape.m, p.shape.dv}, out_shape{p.shape.b, p.shape.h, p.shape.n, p.shape.dv},
        mask_shape{p.shape.b, p.shape.m};
    DLTensor dq = host_tensor(q, q_shape), dk = host_tensor(k, k_shape), dv = host_tensor(v, v_shape),
             dout = host_tensor(out, out_shape);
    DLTensor dmask{};
    if (!p.mask.empty()) {
        dmask.data = const_cast<uint8_t *>(p.mask.data());
        dmask.device = {kDLCPU, 0};
        dmask.ndim = 2;
        dmask.dtype = {kDLUInt, 8, 1};
        dmask.shape = mask_shape.data();
    }
    forward(dq, dk, dv, p.mask.empty() ? nullptr : &dmask, dout, p.options);
    auto expected = reference::forward(p.shape, p.q.data(), p.k.data(), p.v.data(),
                                       p.mask.empty() ? nullptr : p.mask.data(), p.options);
    double error = 0;
    for (size_t e = 0; e < out.size(); e++) {
        double diff = std::fabs(double(out[e]) - expected[e]);
        error = std::isfinite(out[e]) ? std::max(error, diff) : INFINITY;
    }
    const double eps = FLT_EPSILON, d = double(p.shape.d), m = double(p.shape.m);
    const double scale = p.options.scale ? *p.options.scale : 1.0 / std::sqrt(d);
    const double scores = scale * largest_row_norm(p.q, p.shape.d) * largest_row_norm(p.k, p.shape.d);
    double max_v = 0;
    for (float x : p.v) max_v = std::max(max_v, double(std::fabs(x)));
    const bool dropout = p.options.training && p.options.dropout > 0;
    const double keep_scale = dropout ? 1.0 / (1.0 - p.options.dropout) : 1.0;
    return {error, 4.0 * eps * max_v * keep_scale * (2.0 * std::sqrt(d) * scores + std::sqrt(m) + 8.0)};
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
std::pair<double, double> check_kernel(const std::string &kernel, int head_dim) {
    Problem p;
    p.shape = {2, 4, 2, 150, 600, head_dim, head_dim};
    p.q = normal_floats(size_t(2 * 4 * 150 * head_dim), 1);
    p.k = normal_floats(size_t(2 * 2 * 600 * head_dim), 2);
    p.v = normal_floats(size_t(2 * 2 * 600 * head_dim), 3);
    p.options.kernel = kernel;
    double worst_ratio = -1, worst_error = 0, worst_bound = 0;
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
        auto [error, bound] = check(p);
        if (!(error / bound <= worst_ratio)) {  // NaN counts as worst
            worst_ratio = error / bound;
            worst_error = error;
            worst_bound = bound;
        }
    }
    return {worst_error, worst_bound};
}

int probe(int argc, char **argv) {
    int separator = 3;
    while (separator < argc && std::string(argv[separator]) != "--") separator++;
    if (argc < 6 || separator == 3 || separator >= argc - 1) {
        std::fprintf(stderr, "usage: %s HEAD_DIM REPEATS LIBRARY.so:FUNCTION... -- SHAPE...\n", argv[0]);
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
        auto kernel = reinterpret_cast<ForwardKernel>(dlsym(handle, function.c_str()));
        if (!kernel) throw std::runtime_error("FUNCTION: " + library + " has no function " + function);
        KernelInfo info;
        info.name = "candidate" + std::to_string(functions.size());
        info.head_dim = head_dim;
        add_kernel(info, kernel);
        functions.push_back(function);
    }

    // 1. The check; a wrong kernel is reported and never timed.
    std::vector<size_t> timed;
    std::printf("{\"kernels\": [");
    for (size_t c = 0; c < functions.size(); c++) {
        auto [error, bound] = check_kernel("candidate" + std::to_string(c), head_dim);
        const bool ok = error <= bound;
        std::printf("%s{\"function\": \"%s\", \"ok\": %s, \"max_error\": %.3g, \"bound\": %.3g}", c ? ", " : "",
                    functions[c].c_str(), ok ? "true" : "false", error, bound);
        if (ok) {
            timed.push_back(c);
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
        std::vector<int64_t> q_shape{shape.b, shape.h, shape.n, head_dim}, k_shape{shape.b, shape.h, shape.m, head_dim};
        auto q = normal_floats(size_t(shape.b * shape.h * shape.n * head_dim), 11),
             k = normal_floats(size_t(shape.b * shape.h * shape.m * head_dim), 12),
             v = normal_floats(size_t(shape.b * shape.h * shape.m * head_dim), 13), out = q;
        DLTensor dq = host_tensor(q, q_shape), dk = host_tensor(k, k_shape), dv = host_tensor(v, k_shape),
                 dout = host_tensor(out, q_shape);
        std::vector<std::vector<double>> ms(functions.size());
        double total_ms = 0;
        for (int round = 0; round <= repeats || (total_ms < 250.0 * double(timed.size()) && round <= 200); round++) {
            for (size_t c : timed) {
                Options options;
                options.kernel = "candidate" + std::to_string(c);
                options.causal = shape.causal;
                const double elapsed = timing::milliseconds([&] { forward(dq, dk, dv, nullptr, dout, options); });
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

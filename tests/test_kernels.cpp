// Every CPU kernel of the build, on every CPU instruction set this machine has,
// against the double-precision oracle (tests/test_gpu.cpp checks the GPU kernels).
#include <map>

#include "support.hpp"

using namespace attend;
using namespace attend::test;

namespace {

// The kernels that can run head dim d (d == dv), each with each CPU ISA.
struct Variant {
    std::string kernel;
    CpuIsa isa;
};

std::vector<Variant> variants_for(int64_t d, int64_t dv) {
    std::vector<Variant> out;
    for (const auto &k : available_kernels()) {
        if (k.operation != Operation::Forward || k.device != Device::CPU || k.dtype != DType::Float32) continue;  // float16/bfloat16: test_low_precision
        if (k.head_dim != 0 && !(k.head_dim == d && k.head_dim == dv)) continue;
        for (CpuIsa isa : supported_cpu_isas()) out.push_back({k.name, isa});
    }
    return out;
}

std::string describe(const Variant &v) { return v.kernel + "/" + to_string(v.isa); }

// Runs the problem on every variant that can take it.
void check_all_variants(const ProblemSpec &spec, Options options = {}) {
    auto problem = make_problem(spec, options);
    auto expected = problem.expected();
    auto variants = variants_for(spec.d, spec.dv);
    REQUIRE(!variants.empty());
    for (const auto &v : variants) {
        INFO(describe(v) << " b=" << spec.b << " h=" << spec.h << " kv_heads=" << spec.kv_heads << " n=" << spec.n
                         << " m=" << spec.m << " d=" << spec.d << " dv=" << spec.dv << " mask=" << spec.mask
                         << " causal=" << options.causal);
        auto p = make_problem(spec, options);
        p.options.kernel = v.kernel;
        p.options.cpu_isa = v.isa;
        check_against_reference(p, expected);
    }
}

const int64_t kSizes[] = {1, 2, 7, 63, 65, 257, 1000};

}  // namespace

TEST_CASE("the build has a CPU forward and backward kernel for each configured head dim and dtype, and generic ones") {
    for (Operation operation : {Operation::Forward, Operation::Backward}) {
        INFO(std::string(to_string(operation)));
        std::map<std::pair<int, DType>, int> count, decode_count;
        size_t cpu_kernels = 0;
        for (const auto &k : available_kernels()) {
            if (k.device != Device::CPU || k.operation != operation) continue;
            if (k.max_rows > 0) {
                CHECK(operation == Operation::Forward);
                decode_count[{k.head_dim, k.dtype}]++;
                continue;
            }
            count[{k.head_dim, k.dtype}]++;
            cpu_kernels++;
        }
        // The decode kernels: one per head dim and dtype, forward only.
        for (DType dtype : built_dtypes()) {
            for (int64_t d : built_head_dims()) {
                CHECK(decode_count[{int(d), dtype}] == (operation == Operation::Forward ? 1 : 0));
            }
        }
        REQUIRE(!built_head_dims().empty());
        REQUIRE(!built_dtypes().empty());
        for (DType dtype : built_dtypes()) {
            for (int64_t d : built_head_dims()) CHECK(count[{int(d), dtype}] == 1);
            CHECK(count[{0, dtype}] == 1);
        }
        CHECK(cpu_kernels == (built_head_dims().size() + 1) * built_dtypes().size());
    }
}

TEST_CASE("select_kernel prefers the specialised kernel and falls back to the generic one") {
    Features none;
    const int64_t d = built_among({64})[0], largest = built_head_dims().back();
    CHECK(select_kernel(Device::CPU, DType::Float32, d, d, none)->name == "attend_cpu_d" + std::to_string(d));
    CHECK(select_kernel(Device::Auto, DType::Float32, largest, largest, none)->head_dim == largest);
    CHECK(select_kernel(Device::CPU, DType::Float32, d, d / 2, none)->head_dim == 0);
    CHECK(select_kernel(Device::CPU, DType::Float32, 17, 17, none)->head_dim == 0);
    std::string why;
    CHECK_FALSE(select_kernel(Device::CPU, DType::Float32, 0, 64, none, &why));
    CHECK(why.find("positive") != std::string::npos);
}

TEST_CASE("sizes that are not multiples of any tile, every kernel, every ISA") {
    for (int64_t d : {16, 32, 64, 80, 128}) {
        for (int64_t n : kSizes) {
            for (int64_t m : kSizes) {
                // The largest pairs only at one head dim per size class, to bound the oracle's time.
                if (n * m >= 257 * 1000 && d != 64) continue;
                ProblemSpec spec;
                spec.h = 2;
                spec.n = n;
                spec.m = m;
                spec.d = spec.dv = d;
                spec.seed = uint32_t(n * 131 + m * 7 + d);
                check_all_variants(spec);
            }
        }
    }
}

TEST_CASE("padding mask, causal, and both") {
    for (int64_t d : {32, 64, 80, 128}) {
        for (auto [n, m] : {std::pair<int64_t, int64_t>{65, 65}, {257, 257}, {63, 200}, {200, 63}, {1, 300}}) {
            ProblemSpec spec;
            spec.b = 2;
            spec.h = 2;
            spec.n = n;
            spec.m = m;
            spec.d = spec.dv = d;
            spec.mask = true;
            check_all_variants(spec);  // mask
            Options causal;
            causal.causal = true;
            check_all_variants(spec, causal);  // mask + causal
            spec.mask = false;
            check_all_variants(spec, causal);  // causal
        }
    }
}

TEST_CASE("keys in chunks merged afterwards (options.key_splits) on the CPU too") {
    for (int splits : {2, 5}) {
        ProblemSpec spec = spec_of(2, 2, 70, 300, 64);
        spec.mask = true;
        Options options;
        options.key_splits = splits;
        options.causal = true;
        check_all_variants(spec, options);
        spec.d = spec.dv = 24;  // the generic kernel
        check_all_variants(spec, options);
    }
}

TEST_CASE("query rows in runs of tiles (options.query_splits): the same bits for any number of runs") {
    // A run of tiles is one task with its own copy of v's panels; how the tiles
    // are cut into runs may change which task computes a tile, never its
    // arithmetic. Partial tiles, mask, both causal alignments and dropout; the
    // automatic choice (0) too; more runs than tiles are capped at one a tile.
    for (int64_t d : {64, 24}) {  // a specialised kernel (v panels on AVX2) and the generic one
        ProblemSpec spec = spec_of(2, 3, 333, 290, d);
        spec.mask = true;
        for (int causal : {0, 1, 2}) {  // none, top-left, bottom-right
            Options options;
            options.causal = causal > 0;
            options.causal_align = causal == 2 ? CausalAlign::BottomRight : CausalAlign::TopLeft;
            options.dropout = 0.25f;
            options.training = true;
            options.seed = 9;
            for (const auto &v : variants_for(d, d)) {
                if (v.kernel.find("decode") != std::string::npos) continue;  // one task per chunk of keys instead
                auto one_run = make_problem(spec, options);
                one_run.options.kernel = v.kernel;
                one_run.options.cpu_isa = v.isa;
                one_run.options.query_splits = 1;
                one_run.run();
                const auto out = one_run.out.dense(), lse = one_run.lse->dense();
                for (int splits : {0, 2, 3, 11, 1000}) {
                    INFO(describe(v) << " d=" << d << " causal=" << causal << " query_splits=" << splits);
                    auto p = make_problem(spec, options);
                    p.options = one_run.options;
                    p.options.query_splits = splits;
                    p.run();
                    CHECK(p.out.dense() == out);
                    CHECK(p.lse->dense() == lse);
                }
            }
        }
    }
}

TEST_CASE("large working buffers reused across calls (v panels of 1 MiB and more): each call stays right") {
    // A thread keeps the largest block it freed for its next allocation that
    // fits (runtime/kernel_call.cpp): a smaller call, a larger one that must not
    // get the smaller block, a smaller one into the larger block, the larger
    // again. Under ASan a block used past its end or freed twice fails here.
    ProblemSpec large = spec_of(1, 2, 70, 8192, 64), small = spec_of(1, 2, 40, 5000, 64);
    small.seed = 5;
    std::map<int64_t, std::vector<float>> first_out;
    for (const ProblemSpec &spec : {small, large, small, large}) {
        INFO("m=" << spec.m);
        auto p = make_problem(spec);
        check_against_reference(p, p.expected());
        auto [at, first] = first_out.emplace(spec.m, p.out.dense());
        if (!first) CHECK(p.out.dense() == at->second);
    }
}

TEST_CASE("a few query rows per head (tiles one register tile high on a CPU), every kernel, every ISA") {
    // Around the short tile's height (16 rows with AVX2's tiles, 12 with the
    // baseline's, 24 for the generic kernel; AVX-512's 48-row tile is one
    // register tile already) and past it: one tile per head, or two.
    for (int64_t d : {64, 24}) {
        for (int64_t n : {9, 12, 13, 16, 17, 49}) {
            ProblemSpec spec = spec_of(2, 2, n, 300, d);
            spec.mask = true;
            spec.seed = uint32_t(n);
            check_all_variants(spec);
            Options options;
            options.causal = true;
            options.causal_align = CausalAlign::BottomRight;
            options.training = true;
            options.dropout = 0.25f;
            options.seed = 3;
            check_all_variants(spec, options);
        }
    }
}

TEST_CASE("bottom-right causal alignment (decoding with a KV cache), with and without a mask") {
    for (auto [n, m] : {std::pair<int64_t, int64_t>{1, 300}, {7, 130}, {63, 200}, {65, 65}, {200, 63}, {100, 1}}) {
        for (bool mask : {false, true}) {
            ProblemSpec spec;
            spec.b = 2;
            spec.h = 2;
            spec.kv_heads = 2;
            spec.n = n;
            spec.m = m;
            spec.d = spec.dv = 64;
            spec.mask = mask;
            Options options;
            options.causal = true;
            options.causal_align = CausalAlign::BottomRight;
            check_all_variants(spec, options);
        }
    }
}

TEST_CASE("bottom-right causal: row i sees keys up to i + m - n, rows before the cache see every key uniformly") {
    // n > m: the first n - m rows have no visible key, so (as fully masked rows) they get the mean of v.
    ProblemSpec spec;
    spec.n = 10;
    spec.m = 4;
    spec.d = spec.dv = 32;
    Options options;
    options.causal = true;
    options.causal_align = CausalAlign::BottomRight;
    auto p = make_problem(spec, options);
    p.run();
    auto out = p.out.dense();
    const double tolerance = fp32_tolerance(p);
    for (int64_t c = 0; c < spec.dv; c++) {
        double mean = 0;
        for (int64_t j = 0; j < spec.m; j++) mean += p.v.at({0, 0, j, c}) / double(spec.m);
        for (int64_t i = 0; i < spec.n - spec.m; i++) CHECK(std::fabs(out[size_t(i * spec.dv + c)] - mean) <= tolerance);
    }
    // The last row sees every key: the same as no causal mask at all.
    auto full = make_problem(spec);
    full.run();
    auto unmasked = full.out.dense();
    for (int64_t c = 0; c < spec.dv; c++) {
        size_t last = size_t((spec.n - 1) * spec.dv + c);
        CHECK(out[last] == doctest::Approx(unmasked[last]).epsilon(1e-6));
    }
}

TEST_CASE("a caller-given scale") {
    ProblemSpec spec;
    spec.h = 2;
    spec.n = 65;
    spec.m = 130;
    spec.d = spec.dv = 64;
    Options options;
    options.scale = 0.37f;
    check_all_variants(spec, options);
    options.scale = -2.0f;
    check_all_variants(spec, options);
}

TEST_CASE("multi-query and grouped-query k/v") {
    for (int64_t kv_heads : {0, 1, 2, 4}) {
        ProblemSpec spec;
        spec.b = 2;
        spec.h = 4;
        spec.kv_heads = kv_heads;
        spec.n = 70;
        spec.m = 90;
        spec.d = spec.dv = 64;
        spec.mask = true;
        Options causal;
        causal.causal = true;
        check_all_variants(spec, causal);
    }
}

TEST_CASE("multi-query and grouped-query equal the same computation with k/v expanded per head") {
    for (int64_t kv_heads : {0, 2}) {
        ProblemSpec spec;
        spec.b = 2;
        spec.h = 4;
        spec.kv_heads = kv_heads;
        spec.n = 33;
        spec.m = 150;
        spec.d = spec.dv = 32;
        auto shared = make_problem(spec);
        // The same k/v copied for each head.
        auto expanded = make_problem(spec);
        int64_t group = kv_heads == 0 ? spec.h : spec.h / kv_heads;
        expanded.k = make_tensor<float>({spec.b, spec.h, spec.m, spec.d}, float32_type());
        expanded.v = make_tensor<float>({spec.b, spec.h, spec.m, spec.dv}, float32_type());
        for (int64_t b = 0; b < spec.b; b++)
            for (int64_t h = 0; h < spec.h; h++)
                for (int64_t j = 0; j < spec.m; j++)
                    for (int64_t c = 0; c < spec.d; c++) {
                        float kx = kv_heads == 0 ? shared.k.at({b, j, c}) : shared.k.at({b, h / group, j, c});
                        float vx = kv_heads == 0 ? shared.v.at({b, j, c}) : shared.v.at({b, h / group, j, c});
                        expanded.k.at({b, h, j, c}) = kx;
                        expanded.v.at({b, h, j, c}) = vx;
                    }
        shared.run();
        expanded.run();
        CHECK(shared.out.dense() == expanded.out.dense());
    }
}

TEST_CASE("dv different from d runs on the generic kernel") {
    for (auto [d, dv] : {std::pair<int64_t, int64_t>{64, 32}, {16, 96}, {8, 12}, {80, 64}}) {
        ProblemSpec spec;
        spec.b = 2;
        spec.h = 2;
        spec.kv_heads = 0;
        spec.n = 45;
        spec.m = 77;
        spec.d = d;
        spec.dv = dv;
        spec.mask = true;
        Options causal;
        causal.causal = true;
        check_all_variants(spec, causal);
        CHECK(select_kernel(Device::CPU, DType::Float32, d, dv, {})->head_dim == 0);
    }
}

TEST_CASE("strided layouts: [b, n, h, d] memory viewed as [b, h, n, d], and strided k/v") {
    for (int64_t d : {32, 64}) {
        ProblemSpec spec;
        spec.b = 2;
        spec.h = 3;
        spec.n = 50;
        spec.m = 70;
        spec.d = spec.dv = d;
        spec.q_order = {0, 2, 1, 3};
        spec.out_order = {0, 2, 1, 3};
        spec.kv_order = {0, 2, 1, 3};
        spec.mask = true;
        check_all_variants(spec);
        // k and v with their head dim outermost in memory: not dense, so copied.
        spec.kv_order = {3, 0, 1, 2};
        Options causal;
        causal.causal = true;
        check_all_variants(spec, causal);
    }
}

TEST_CASE("rows whose keys are all masked get the mean of v, as the original module") {
    ProblemSpec spec;
    spec.b = 2;
    spec.h = 2;
    spec.kv_heads = 2;
    spec.n = 100;
    spec.m = 150;
    spec.d = spec.dv = 64;
    spec.mask = true;
    for (bool causal : {false, true}) {
        Options options;
        options.causal = causal;
        auto p = make_problem(spec, options);
        // Batch 1: every key masked. Batch 0: the first 40 keys masked, so with
        // causal the first 40 rows see only masked keys.
        for (int64_t j = 0; j < spec.m; j++) {
            p.mask->at({1, j}) = 0;
            p.mask->at({0, j}) = j >= 40;
        }
        auto expected = p.expected();
        check_against_reference(p, expected);
        auto out = p.out.dense();
        const double tolerance = fp32_tolerance(p);
        for (int64_t b = 0; b < spec.b; b++) {
            int64_t fully_masked_rows = b == 1 ? spec.n : causal ? 40 : 0;
            for (int64_t h = 0; h < spec.h; h++) {
                for (int64_t i = 0; i < fully_masked_rows; i++) {
                    for (int64_t c = 0; c < spec.dv; c++) {
                        double mean = 0;
                        for (int64_t j = 0; j < spec.m; j++) mean += p.v.at({b, h, j, c});
                        mean /= double(spec.m);
                        double got = out[size_t(((b * spec.h + h) * spec.n + i) * spec.dv + c)];
                        REQUIRE(std::fabs(got - mean) <= tolerance);
                    }
                }
            }
        }
    }
}

TEST_CASE("empty batch, heads, rows or value dim are a no-op") {
    for (auto [b, h, n] : {std::tuple<int64_t, int64_t, int64_t>{0, 2, 5}, {1, 0, 5}, {1, 2, 0}}) {
        ProblemSpec spec;
        spec.b = b;
        spec.h = h;
        spec.n = n;
        spec.m = 9;
        auto p = make_problem(spec);
        CHECK_NOTHROW(p.run());
    }
}

// The kernel a forward call of this shape gets (float32, CPU).
std::string chosen_for(const ProblemSpec &spec) {
    KernelRequest request;
    request.head_dim = request.value_dim = spec.d;
    request.rows_per_head = spec.n;
    auto choice = select_kernel(request);
    REQUIRE(choice);
    return choice->kernel.name;
}

TEST_CASE("decoding: calls of at most the decode kernel's query rows per head get it, and it equals the oracle") {
    const int64_t d = built_among({64})[0];
    const std::string decode = "attend_cpu_decode_d" + std::to_string(d), plain = "attend_cpu_d" + std::to_string(d);
    int max_rows = 0;
    for (const auto &k : available_kernels()) {
        if (k.name == decode) max_rows = k.max_rows;
    }
    INFO("ATTEND_DECODE_ROWS_PER_HEAD is " << max_rows << "; these cases need at least 4");
    REQUIRE(max_rows >= 4);
    // The selection: n, the rows of each head, against the kernel's rows; the
    // heads of a group do not count (the decode kernel runs them row by row).
    CHECK(chosen_for(spec_of(1, 8, 1, 100, d)) == decode);
    CHECK(chosen_for(spec_of(2, 8, max_rows, 100, d)) == decode);
    CHECK(chosen_for(spec_of(2, 8, max_rows + 1, 100, d)) == plain);
    ProblemSpec grouped = spec_of(1, 8, max_rows, 100, d);
    grouped.kv_heads = 1;  // 8 heads a kv head: 8 x max_rows rows read it
    CHECK(chosen_for(grouped) == decode);
    grouped.n = max_rows + 1;
    CHECK(chosen_for(grouped) == plain);
    {
        KernelRequest unknown;  // rows not given (select_kernel's short form): never the decode kernel
        unknown.head_dim = unknown.value_dim = d;
        CHECK(select_kernel(unknown)->kernel.name == plain);
    }

    // Decode shapes, the kernel chosen by the call itself: chunks of keys run in
    // parallel (m / 512 of them at most) and merged.
    struct Case {
        const char *name;
        ProblemSpec spec;
        Options options;
    };
    std::vector<Case> cases;
    cases.push_back({"one query, 2 heads: 4 chunks of keys", spec_of(1, 2, 1, 3000, d), {}});
    {
        Case c{"grouped-query (8 heads, 2 kv heads), 2 queries, mask, bottom-right causal, dropout",
               spec_of(2, 8, 2, 1500, d), {}};
        c.spec.kv_heads = 2;
        c.spec.mask = true;
        c.options.causal = true;
        c.options.causal_align = CausalAlign::BottomRight;
        c.options.training = true;
        c.options.dropout = 0.2f;
        c.options.seed = 9;
        cases.push_back(c);
    }
    {
        Case c{"multi-query (4 heads), 2 queries, top-left causal", spec_of(1, 4, 2, 2100, d), {}};
        c.spec.kv_heads = 0;
        c.options.causal = true;
        cases.push_back(c);
    }
    {
        Case c{"every key of both batches masked: the mean of v", spec_of(2, 2, 2, 1100, d), {}};
        c.spec.mask = true;
        c.spec.mask_keep = 0.0;
        cases.push_back(c);
    }
    {
        Case c{"a shard at global positions, causal, dropout", spec_of(1, 2, 4, 1300, d), {}};
        c.options.causal = true;
        c.options.query_offset = 2000;
        c.options.key_offset = 800;
        c.options.training = true;
        c.options.dropout = 0.5f;
        cases.push_back(c);
    }
    for (Case &c : cases) {
        INFO(std::string(c.name));
        CHECK(chosen_for(c.spec) == decode);
        auto p = make_problem(c.spec, c.options);
        check_against_reference(p, p.expected());
    }
}

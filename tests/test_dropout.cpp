// Dropout in training mode: nn.Dropout on the attention weights, with a mask that
// is a pure function of (seed, b, h, i, j).
#include "attend/dropout_hash.hpp"
#include "support.hpp"

using namespace attend;
using namespace attend::test;

namespace {

ProblemSpec dropout_spec(int64_t d = 64) {
    ProblemSpec spec;
    spec.b = 2;
    spec.h = 3;
    spec.n = 70;
    spec.m = 130;
    spec.d = spec.dv = d;
    return spec;
}

Options training(float p, uint64_t seed = 42) {
    Options o;
    o.training = true;
    o.dropout = p;
    o.seed = seed;
    return o;
}

std::vector<float> run(const ProblemSpec &spec, const Options &options) {
    auto p = make_problem(spec, options);
    p.run();
    return p.out.dense();
}

}  // namespace

TEST_CASE("dropout matches the oracle, which draws the same mask, on every kernel and ISA") {
    for (int64_t d : {32, 64, 128, 24}) {
        for (bool causal : {false, true}) {
            auto spec = dropout_spec(d);
            spec.mask = true;
            auto options = training(0.3f, 7);
            options.causal = causal;
            auto reference_problem = make_problem(spec, options);
            auto expected = reference_problem.expected();
            for (const auto &k : available_kernels()) {
                if (k.operation != Operation::Forward || k.device != Device::CPU || k.dtype != DType::Float32 ||
                    (k.head_dim != 0 && k.head_dim != d)) {
                    continue;
                }
                for (CpuIsa isa : supported_cpu_isas()) {
                    INFO(k.name << "/" << std::string(to_string(isa)) << " d=" << d << " causal=" << causal);
                    auto p = make_problem(spec, options);
                    p.options.kernel = k.name;
                    p.options.cpu_isa = isa;
                    check_against_reference(p, expected);
                }
            }
        }
    }
}

TEST_CASE("p = 0 in training, and any p in eval mode, equal no dropout exactly") {
    auto spec = dropout_spec();
    auto plain = run(spec, Options{});
    CHECK(run(spec, training(0.0f)) == plain);
    Options eval = training(0.5f);
    eval.training = false;
    CHECK(run(spec, eval) == plain);
}

TEST_CASE("p = 1 gives zeros") {
    for (int64_t d : {64, 24}) {
        auto out = run(dropout_spec(d), training(1.0f));
        for (float x : out) REQUIRE(x == 0.0f);
    }
}

TEST_CASE("same seed same output, different seeds differ") {
    auto spec = dropout_spec();
    auto a = run(spec, training(0.2f, 1));
    CHECK(run(spec, training(0.2f, 1)) == a);
    CHECK(run(spec, training(0.2f, 2)) != a);
    CHECK(run(spec, training(0.2f, 1ull << 40)) != a);  // the seed's high word counts too
}

// With v the identity (dv = m), out[i][j] is the weight of key j for query i after
// dropout: 0 where dropped, softmax weight / (1 - p) where kept.
TEST_CASE("kept fraction within binomial bounds, survivors scaled by 1/(1-p)") {
    ProblemSpec spec;
    spec.b = 2;
    spec.h = 2;
    spec.kv_heads = 2;
    spec.n = 96;
    spec.m = spec.d = spec.dv = 64;
    for (float p : {0.1f, 0.5f, 0.9f}) {
        auto dropped = make_problem(spec, training(p, 99));
        auto plain = make_problem(spec, Options{});
        for (auto *problem : {&dropped, &plain}) {
            for (int64_t b = 0; b < spec.b; b++)
                for (int64_t h = 0; h < spec.h; h++)
                    for (int64_t j = 0; j < spec.m; j++)
                        for (int64_t c = 0; c < spec.dv; c++) problem->v.at({b, h, j, c}) = j == c ? 1.0f : 0.0f;
        }
        dropped.run();
        plain.run();
        auto with = dropped.out.dense(), without = plain.out.dense();
        int64_t kept = 0;
        double worst_scale_error = 0;
        for (size_t e = 0; e < with.size(); e++) {
            REQUIRE(without[e] > 0.0f);  // every weight is positive without dropout
            if (with[e] == 0.0f) continue;
            kept++;
            worst_scale_error = std::max(worst_scale_error, std::fabs(with[e] / without[e] * (1.0 - p) - 1.0));
        }
        double trials = double(with.size()), expected_kept = trials * (1.0 - p);
        double sigma = std::sqrt(trials * p * (1.0 - p));
        INFO("p=" << p << " kept " << kept << " of " << trials << ", expected " << expected_kept);
        CHECK(std::fabs(double(kept) - expected_kept) <= 5.0 * sigma);  // 5 sigma: a false alarm ~ 1 in 1.7 million
        CHECK(worst_scale_error <= 8 * FLT_EPSILON);  // one fp32 division and product
    }
}

TEST_CASE("the keep decision is the documented pure function") {
    // Thresholds: p = 0 keeps everything, p = 1 drops everything.
    CHECK(dropout::threshold_for(0.0) == 0u);
    CHECK(dropout::threshold_for(1.0) == (1u << 24));
    int kept = 0;
    for (uint32_t j = 0; j < 10000; j++) kept += dropout::keep(5, 1, 2, 3, j, dropout::threshold_for(0.25));
    CHECK(kept > 7300);
    CHECK(kept < 7700);
}

// Calls from many threads at once: identical results, bitwise, to one call alone.
#include <atomic>
#include <thread>

#include "support.hpp"

using namespace attend;
using namespace attend::test;

TEST_CASE("8 threads x many calls on shared inputs give the single-threaded result bitwise") {
    ProblemSpec spec;
    spec.b = 2;
    spec.h = 2;
    spec.n = 100;
    spec.m = 120;
    spec.d = spec.dv = 64;
    spec.mask = true;
    Options options;
    options.causal = true;
    options.training = true;
    options.dropout = 0.1f;
    options.seed = 3;
    auto shared = make_problem(spec, options);
    // Half the threads run this CPU's best target, half the baseline: each
    // against the single-threaded result of its own target.
    const CpuIsa isas[2] = {supported_cpu_isas().at(1), CpuIsa::Baseline};
    std::vector<float> alone[2];
    for (int i = 0; i < 2; i++) {
        shared.options.cpu_isa = isas[i];
        shared.run();
        alone[i] = shared.out.dense();
    }

    constexpr int kThreads = 8, kCalls = 25;
    std::atomic<int> mismatches{0}, failures{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; t++) {
        threads.emplace_back([&, t] {
            auto out = nan_tensor({spec.b, spec.h, spec.n, spec.dv});
            Options mine = options;
            mine.cpu_isa = isas[t % 2];
            for (int call = 0; call < kCalls; call++) {
                try {
                    DLTensor q = shared.q.dl(), k = shared.k.dl(), v = shared.v.dl(), m = shared.mask->dl(),
                             o = out.dl();
                    forward(q, k, v, &m, o, mine);
                    if (out.dense() != alone[t % 2]) mismatches++;
                } catch (...) {
                    failures++;
                }
            }
        });
    }
    for (auto &t : threads) t.join();
    CHECK(failures == 0);
    CHECK(mismatches == 0);
}

TEST_CASE("repeated calls are bitwise identical") {
    ProblemSpec spec;
    spec.h = 3;
    spec.n = 257;
    spec.m = 300;
    spec.d = spec.dv = 80;
    auto p = make_problem(spec);
    p.run();
    auto first = p.out.dense();
    for (int i = 0; i < 5; i++) {
        p.run();
        REQUIRE(p.out.dense() == first);
    }
}

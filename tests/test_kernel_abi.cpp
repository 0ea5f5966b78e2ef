// attend::add_kernel: a kernel generated outside the build (how `attend tune`
// runs its candidates) goes through the same validation and marshalling.
#include "attend/kernel_abi.hpp"
#include "support.hpp"

using namespace attend;
using namespace attend::test;

// Built kernels of this build, reached as a generated library outside it would be.
extern "C" int attend_cpu_d32_baseline ATTEND_KERNEL_PARAMS;
extern "C" int attend_cpu_generic_baseline ATTEND_KERNEL_PARAMS;

namespace {

// A kernel that returns success without writing anything.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
int writes_nothing ATTEND_KERNEL_PARAMS { return 0; }
#pragma GCC diagnostic pop

void register_once() {
    static bool done = [] {
        add_kernel(KernelInfo{"added_d32", Device::CPU, 32, DType::Float32}, attend_cpu_d32_baseline);
        add_kernel(KernelInfo{"added_generic", Device::CPU, 0, DType::Float32}, attend_cpu_generic_baseline);
        add_kernel(KernelInfo{"writes_nothing", Device::CPU, 32, DType::Float32}, writes_nothing);
        return true;
    }();
    (void)done;
}

}  // namespace

TEST_CASE("an added kernel runs when Options::kernel names it, and matches the reference") {
    register_once();
    for (const char *name : {"added_d32", "added_generic"}) {
        ProblemSpec spec = spec_of(2, 4, 70, 131, 32);
        spec.kv_heads = 2;
        spec.mask = true;
        Options options;
        options.causal = true;
        auto p = make_problem(spec, options);
        auto expected = p.expected();
        p.options.kernel = name;
        INFO(std::string(name));
        check_against_reference(p, expected);
    }
}

TEST_CASE("add_kernel: select_kernel never picks an added kernel, and the listing stays the build's") {
    register_once();
    auto chosen = select_kernel(Device::CPU, DType::Float32, 32, 32, {});
    REQUIRE(chosen);
    CHECK(chosen->name == "attend_cpu_d32");
    for (const auto &k : available_kernels()) CHECK(k.name.rfind("added_", 0) != 0);
}

TEST_CASE("add_kernel: the runtime really calls the added function") {
    register_once();
    auto p = make_problem(spec_of(1, 1, 5, 5, 32));
    p.options.kernel = "writes_nothing";
    p.run();
    for (float x : p.out.dense()) CHECK(std::isnan(x));  // out is made of NaN sentinels
}

TEST_CASE("add_kernel and Options::kernel reject bad registrations and calls, naming the argument") {
    register_once();
    auto rejects = [](const KernelInfo &info, KernelFunction f, const std::string &what) {
        INFO(what);
        try {
            add_kernel(info, f);
            FAIL("accepted");
        } catch (const std::invalid_argument &e) {
            CHECK(std::string(e.what()).find(what) != std::string::npos);
        }
    };
    rejects({"", Device::CPU, 32, DType::Float32}, attend_cpu_d32_baseline, "info.name: must not be empty");
    rejects({"added_d32", Device::CPU, 32, DType::Float32}, attend_cpu_d32_baseline, "'added_d32' exists");
    rejects({"attend_cpu_d64", Device::CPU, 64, DType::Float32}, attend_cpu_d32_baseline, "'attend_cpu_d64' exists");
    rejects({"on_gpu", Device::CUDA, 32, DType::Float32}, attend_cpu_d32_baseline, "info.device: only CPU");
    rejects({"negative", Device::CPU, -1, DType::Float32}, attend_cpu_d32_baseline, "info.head_dim");
    rejects({"null", Device::CPU, 32, DType::Float32}, nullptr, "function: must not be null");

    auto p = make_problem(spec_of(1, 1, 5, 5, 64));
    p.options.kernel = "added_d32";
    CHECK_THROWS_WITH_AS(p.run(), doctest::Contains("needs d == dv == 32"), std::invalid_argument);
    auto q = make_problem(spec_of(1, 1, 5, 5, 32));
    q.options.kernel = "added_d32";
    q.options.cpu_isa = CpuIsa::Baseline;
    CHECK_THROWS_WITH_AS(q.run(), doctest::Contains("added at run time with one target"), std::invalid_argument);
}

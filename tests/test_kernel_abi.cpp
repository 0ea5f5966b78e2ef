// attend::add_kernel: a kernel generated outside the build (how `attend tune`
// runs its candidates) goes through the same validation and marshalling.
#include <dlfcn.h>

#include "attend/kernel_abi.hpp"
#include "support.hpp"

using namespace attend;
using namespace attend::test;

namespace {

// Built kernels of this build (baseline target), reached by their symbols as a
// generated library outside it would be: one specialised, and the generic one.
const int kDim = int(built_among({32})[0]);
KernelFunction built_function(const std::string &name) {
    auto function = reinterpret_cast<KernelFunction>(dlsym(RTLD_DEFAULT, name.c_str()));
    if (!function) FAIL(name << " is not exported by libattend");
    return function;
}
KernelFunction specialised() { return built_function("attend_cpu_d" + std::to_string(kDim) + "_baseline"); }
const std::string kAdded = "added_d" + std::to_string(kDim);

// A kernel that returns success without writing anything.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
int writes_nothing ATTEND_KERNEL_PARAMS { return 0; }
#pragma GCC diagnostic pop

void register_once() {
    static bool done = [] {
        add_kernel(KernelInfo{kAdded, Device::CPU, kDim, DType::Float32}, specialised());
        add_kernel(KernelInfo{"added_generic", Device::CPU, 0, DType::Float32},
                   built_function("attend_cpu_generic_baseline"));
        add_kernel(KernelInfo{"writes_nothing", Device::CPU, kDim, DType::Float32}, writes_nothing);
        return true;
    }();
    (void)done;
}

}  // namespace

TEST_CASE("an added kernel runs when Options::kernel names it, and matches the reference") {
    register_once();
    for (const std::string &name : {kAdded, std::string("added_generic")}) {
        ProblemSpec spec = spec_of(2, 4, 70, 131, kDim);
        spec.kv_heads = 2;
        spec.mask = true;
        Options options;
        options.causal = true;
        auto p = make_problem(spec, options);
        auto expected = p.expected();
        p.options.kernel = name;
        INFO(name);
        check_against_reference(p, expected);
    }
}

TEST_CASE("add_kernel: select_kernel never picks an added kernel, and the listing stays the build's") {
    register_once();
    auto chosen = select_kernel(Device::CPU, DType::Float32, kDim, kDim, {});
    REQUIRE(chosen);
    CHECK(chosen->name == "attend_cpu_d" + std::to_string(kDim));
    for (const auto &k : available_kernels()) CHECK(k.name.rfind("added_", 0) != 0);
}

TEST_CASE("add_kernel: the runtime really calls the added function") {
    register_once();
    auto p = make_problem(spec_of(1, 1, 5, 5, kDim));
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
    const KernelFunction f = specialised();
    const std::string built = "attend_cpu_d" + std::to_string(kDim);
    rejects({"", Device::CPU, kDim, DType::Float32}, f, "info.name: must not be empty");
    rejects({kAdded, Device::CPU, kDim, DType::Float32}, f, "'" + kAdded + "' exists");
    rejects({built, Device::CPU, kDim, DType::Float32}, f, "'" + built + "' exists");
    rejects({"on_gpu", Device::CUDA, kDim, DType::Float32}, f, "info.device: only CPU");
    rejects({"negative", Device::CPU, -1, DType::Float32}, f, "info.head_dim");
    rejects({"null", Device::CPU, kDim, DType::Float32}, nullptr, "function: must not be null");

    auto p = make_problem(spec_of(1, 1, 5, 5, kDim * 2));
    p.options.kernel = kAdded;
    CHECK_THROWS_WITH_AS(p.run(), doctest::Contains(("needs d == dv == " + std::to_string(kDim)).c_str()), std::invalid_argument);
    auto q = make_problem(spec_of(1, 1, 5, 5, kDim));
    q.options.kernel = kAdded;
    q.options.cpu_isa = CpuIsa::Baseline;
    CHECK_THROWS_WITH_AS(q.run(), doctest::Contains("added at run time with one target"), std::invalid_argument);
}

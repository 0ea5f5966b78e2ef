// attend::add_kernel: a kernel generated outside the build (how `attend tune`
// runs its candidates) goes through the same validation and marshalling.
#include "attend/kernel_abi.hpp"
#include "support.hpp"

using namespace attend;
using namespace attend::test;

namespace {

// Two kernels of this build (baseline target), linked into this program as a
// library generated outside the build would be: their own code, calling
// libattend's Halide runtime (tests/CMakeLists.txt links their archives, not
// their runtime). libattend itself does not export its kernels.
extern "C" int ATTEND_TEST_ABI_SPECIALISED ATTEND_FORWARD_KERNEL_PARAMS;
extern "C" int ATTEND_TEST_ABI_GENERIC ATTEND_FORWARD_KERNEL_PARAMS;
const int kDim = ATTEND_TEST_ABI_DIM;
ForwardKernel specialised() { return ATTEND_TEST_ABI_SPECIALISED; }
const std::string kAdded = "added_d" + std::to_string(kDim);

// A float32 kernel's description for add_kernel.
KernelInfo info(std::string name, int head_dim, Device device = Device::CPU, Operation operation = Operation::Forward) {
    KernelInfo i;
    i.name = std::move(name);
    i.head_dim = head_dim;
    i.device = device;
    i.operation = operation;
    return i;
}

// A kernel that returns success without writing anything.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
int writes_nothing ATTEND_FORWARD_KERNEL_PARAMS { return 0; }
#pragma GCC diagnostic pop

void register_once() {
    static bool done = [] {
        add_kernel(info(kAdded, kDim, Device::CPU), specialised());
        add_kernel(info("added_generic", 0, Device::CPU),
                   ATTEND_TEST_ABI_GENERIC);
        add_kernel(info("writes_nothing", kDim, Device::CPU), writes_nothing);
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
    auto rejects = [](const KernelInfo &kernel_info, ForwardKernel f, const std::string &what) {
        INFO(what);
        try {
            add_kernel(kernel_info, f);
            FAIL("accepted");
        } catch (const std::invalid_argument &e) {
            CHECK(std::string(e.what()).find(what) != std::string::npos);
        }
    };
    const ForwardKernel f = specialised();
    const std::string built = "attend_cpu_d" + std::to_string(kDim);
    rejects(info("", kDim, Device::CPU), f, "info.name: must not be empty");
    rejects(info(kAdded, kDim, Device::CPU), f, "'" + kAdded + "' exists");
    rejects(info(built, kDim, Device::CPU), f, "'" + built + "' exists");
    rejects(info("on_gpu", kDim, Device::CUDA), f, "info.device: only CPU");
    rejects(info("negative", -1, Device::CPU), f, "info.head_dim");
    rejects(info("unknown_op", kDim, Device::CPU, Operation(7)), f, "info.operation");
    rejects(info("null", kDim, Device::CPU), nullptr, "function: must not be null");

    auto p = make_problem(spec_of(1, 1, 5, 5, kDim * 2));
    p.options.kernel = kAdded;
    CHECK_THROWS_WITH_AS(p.run(), doctest::Contains(("needs d == dv == " + std::to_string(kDim)).c_str()), std::invalid_argument);
    auto q = make_problem(spec_of(1, 1, 5, 5, kDim));
    q.options.kernel = kAdded;
    q.options.cpu_isa = CpuIsa::Baseline;
    CHECK_THROWS_WITH_AS(q.run(), doctest::Contains("added at run time with one target"), std::invalid_argument);
}

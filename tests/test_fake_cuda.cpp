// Device faults on CUDA, on any machine: attend against a fake CUDA driver
// (tests/fake_cuda) that reports no device, runs out of device memory or has a
// kernel fault, when told to. Each is an attend::Error naming the cause, never an
// abort; out stays untouched; the CPU path keeps working in the same process.
// (tests/test_gpu.cpp makes the same faults happen on a real GPU.)
//
// The program links the fake (soname libcuda.so.1), so attend's
// dlopen("libcuda.so.1") finds it already loaded, never a real driver. attend
// loads the driver once per process: each test case needs a process of its own,
// as ctest runs them.
#include <atomic>
#include <cstdlib>
#include <thread>

#include <HalideRuntime.h>

#include "fake_cuda/fake_cuda.h"
#include "support.hpp"

using namespace attend;
using namespace attend::test;

namespace {

// Every case starts with this: the driver's settings for the process.
void start(const char *settings) {
    static int cases = 0;
    REQUIRE_MESSAGE(++cases == 1, "attend loads the CUDA driver once per process: run each case in a process of "
                                  "its own (as ctest does, or with --test-case=NAME)");
    REQUIRE(attend_fake_cuda_configure(settings) == 0);
}

AttendFakeCudaStats stats() {
    AttendFakeCudaStats s{};
    attend_fake_cuda_stats(&s);
    return s;
}

// Halide keeps freed device memory for reuse; emptying that cache frees it.
uint64_t live_bytes_after_emptying_the_cache() {
    halide_reuse_device_allocations(nullptr, false);
    halide_reuse_device_allocations(nullptr, true);
    return stats().live_bytes;
}

// A call on CUDA with host tensors (Halide makes the device copies), out filled
// with a sentinel.
Problem cuda_problem(const ProblemSpec &spec) {
    auto p = make_problem(spec);
    p.options.device = Device::CUDA;
    std::fill(p.out.storage.begin(), p.out.storage.end(), 7.0f);
    return p;
}

bool untouched(const Problem &p) {
    return std::all_of(p.out.storage.begin(), p.out.storage.end(), [](float x) { return x == 7.0f; }) &&
           std::all_of(p.lse->storage.begin(), p.lse->storage.end(), [](float x) { return std::isnan(x); });
}

void check_cpu_still_works() {
    auto cpu = make_problem(spec_of(1, 2, 40, 50, 64));
    check_against_reference(cpu, cpu.expected());
}

// The error message of a call that must fail with attend::Error.
std::string error_of(Problem &p) {
    try {
        p.run();
    } catch (const attend::Error &e) {
        return e.what();
    }
    FAIL("the call did not throw attend::Error");
    return "";
}

}  // namespace

TEST_CASE("no usable GPU (cuInit fails): attend::Error naming the driver's error, out untouched") {
    start("init=100");
    auto p = cuda_problem(spec_of(1, 2, 33, 40, 64));
    std::string message = error_of(p);
    CHECK(message.find("cuInit failed: CUDA_ERROR_NO_DEVICE") != std::string::npos);
    CHECK(untouched(p));
    CHECK(stats().work_calls == 0);
    check_cpu_still_works();
}

TEST_CASE("no CUDA device: attend::Error saying device 0 does not exist") {
    start("devices=0");
    auto p = cuda_problem(spec_of(1, 2, 33, 40, 64));
    CHECK(error_of(p).find("device 0 does not exist (this machine has 0 CUDA devices)") != std::string::npos);
    CHECK(untouched(p));
    check_cpu_still_works();
}

TEST_CASE("device memory runs out part-way: OUT_OF_MEMORY, out untouched, nothing left allocated, usable after") {
    start("");
    auto p = cuda_problem(spec_of(1, 4, 2048, 2048, 64));
    // What the call allocates, measured on a large device (the call gets as far
    // as the launch, which this driver does not run).
    CHECK(error_of(p).find("CUDA_ERROR_NOT_SUPPORTED") != std::string::npos);
    const uint64_t needed = stats().peak_live_bytes, allocations = stats().allocations;
    INFO("the call allocates " << needed << " bytes in " << allocations << " allocations");
    REQUIRE(allocations >= 3);
    REQUIRE(live_bytes_after_emptying_the_cache() == 0);

    // One byte less: the last allocation fails, with the others on the device.
    REQUIRE(attend_fake_cuda_configure(("memory=" + std::to_string(needed - 1)).c_str()) == 0);
    std::string message = error_of(p);
    CHECK(message.find("CUDA_ERROR_OUT_OF_MEMORY") != std::string::npos);
    CHECK(message.find("unusable") == std::string::npos);  // not a fault: the context is fine
    CHECK(untouched(p));
    CHECK(stats().allocations - allocations == allocations - 1);
    CHECK(live_bytes_after_emptying_the_cache() == 0);  // every device buffer of the failed call was released

    // With the memory back the same call gets as far as the launch again.
    REQUIRE(attend_fake_cuda_configure(("memory=" + std::to_string(needed)).c_str()) == 0);
    CHECK(error_of(p).find("CUDA_ERROR_NOT_SUPPORTED") != std::string::npos);
    CHECK(untouched(p));
    check_cpu_still_works();
}

TEST_CASE("a launch error that is not a fault: reported, and the context stays usable") {
    start("");
    auto p = cuda_problem(spec_of(2, 2, 100, 70, 32));
    for (int call = 1; call <= 3; call++) {
        std::string message = error_of(p);
        CHECK(message.find("CUDA_ERROR_NOT_SUPPORTED") != std::string::npos);
        CHECK(message.find("unusable") == std::string::npos);
        CHECK(stats().launches == uint64_t(call));  // each call reached the device again
    }
    CHECK(untouched(p));
}

TEST_CASE("a kernel fault: reported, later calls refused with no work sent to the driver, the CPU path works") {
    start("fault=launch");
    auto p = cuda_problem(spec_of(1, 2, 64, 64, 64));
    // The launch succeeds; the fault shows at the next call that works in the
    // context (the next kernel's, or the copy back).
    std::string message = error_of(p);
    CHECK(message.find("CUDA_ERROR_ILLEGAL_ADDRESS") != std::string::npos);
    CHECK(message.find("unusable after a kernel fault") != std::string::npos);
    CHECK(untouched(p));
    CHECK(stats().launches == 1);

    // Later calls are refused before any work reaches the driver.
    const uint64_t work_before = stats().work_calls;
    message = error_of(p);
    CHECK(message.find("makes no more calls") != std::string::npos);
    CHECK(message.find("CUDA_ERROR_ILLEGAL_ADDRESS") != std::string::npos);
    CHECK(stats().work_calls == work_before);
    CHECK(untouched(p));
    check_cpu_still_works();
}

TEST_CASE("a fault while the results come back: out and lse untouched, though out's copy had arrived") {
    // Launches succeed (doing nothing); the second copy to the host, lse's after
    // out's, faults. out's data reached the host first, into attend's scratch.
    start("launch=noop,fault=copy_to_host:2");
    auto p = cuda_problem(spec_of(1, 2, 33, 40, 64));
    std::string message = error_of(p);
    CHECK(message.find("copying lse to the host") != std::string::npos);
    CHECK(message.find("CUDA_ERROR_ILLEGAL_ADDRESS") != std::string::npos);
    CHECK(stats().copies_to_host == 2);
    CHECK(untouched(p));
    check_cpu_still_works();
}

TEST_CASE("8 threads on CUDA while one kernel faults: every call an attend::Error, then refusals, the CPU works") {
    start("fault=launch");
    constexpr int kThreads = 8, kCalls = 10;
    std::atomic<int> other_exceptions{0}, successes{0}, faults{0}, refusals{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; t++) {
        threads.emplace_back([&, t] {
            auto p = cuda_problem(spec_of(1, 2, 40 + t, 50, 64));
            for (int call = 0; call < kCalls; call++) {
                try {
                    p.run();
                    successes++;
                } catch (const attend::Error &e) {
                    const std::string message = e.what();
                    faults += message.find("unusable after a kernel fault") != std::string::npos;
                    refusals += message.find("makes no more calls") != std::string::npos;
                } catch (...) {
                    other_exceptions++;
                }
            }
        });
    }
    for (auto &t : threads) t.join();
    CHECK(successes == 0);
    CHECK(other_exceptions == 0);
    CHECK(faults >= 1);
    CHECK(refusals >= 1);
    auto p = cuda_problem(spec_of(1, 2, 40, 50, 64));
    CHECK(error_of(p).find("makes no more calls") != std::string::npos);
    check_cpu_still_works();
}

namespace {

// Each float32 CUDA kernel of the build, run once without and once with dropout
// (its two specialisations); launches do nothing. Returns how many kernels ran.
int run_every_float32_cuda_kernel() {
    int kernels = 0;
    for (const auto &k : available_kernels()) {
        if (k.operation != Operation::Forward || k.device != Device::CUDA || k.dtype != DType::Float32) continue;
        for (bool dropout : {false, true}) {
            auto p = cuda_problem(spec_of(1, 2, 33, 40, k.head_dim));
            p.options.kernel = k.name;
            p.options.training = dropout;
            p.options.dropout = 0.25f;
            p.run();
        }
        kernels++;
    }
    return kernels;
}

std::vector<AttendFakeCudaModule> loaded_modules() {
    std::vector<AttendFakeCudaModule> modules(size_t(attend_fake_cuda_modules(nullptr, 0)));
    attend_fake_cuda_modules(modules.data(), int(modules.size()));
    return modules;
}

// ptxas (CMake found it, or ""): the fake then reports what it makes of each module.
const std::string kPtxas = ATTEND_PTXAS;

}  // namespace

// Halide 21 alone JIT-compiles every module with at most 64 registers per thread,
// and the flash schedules need up to 255: the rest would spill to local memory.
TEST_CASE("every CUDA kernel is JIT-compiled with the registers it needs, and cuda_functions reports them") {
    start(("launch=noop" + (kPtxas.empty() ? "" : ",ptxas=" + kPtxas)).c_str());
    REQUIRE(std::getenv("HL_CUDA_JIT_MAX_REGISTERS") == nullptr);
    const int kernels = run_every_float32_cuda_kernel();
    REQUIRE(kernels > 0);

    const auto modules = loaded_modules();
    CHECK(int(modules.size()) >= kernels);
    for (const auto &m : modules) {
        // Without ptxas what a kernel needs is not known here: only no cap (255) is enough for every kernel.
        const int needed = m.registers_needed >= 0 ? m.registers_needed : 255;
        INFO("module limit " << m.max_registers << ", needs " << m.registers_needed << " (-1: not known)");
        CHECK((m.max_registers == -1 || m.max_registers >= needed));
    }

    const auto functions = cuda_functions();
    CHECK(functions.size() >= size_t(2 * kernels));  // each kernel: its partial states, then their merge
    int above_64 = 0;
    for (const auto &f : functions) {
        INFO(f.kernel << " " << f.function << ": limit " << f.max_registers << ", " << f.registers
                      << " registers, " << f.local_bytes << " local bytes");
        CHECK(f.kernel.rfind("attend_cuda_", 0) == 0);
        CHECK(f.max_registers == 255);
        if (kPtxas.empty()) {
            CHECK(f.registers == -1);  // the fake says NOT_SUPPORTED: reported as unknown
        } else {
            CHECK(f.registers > 0);
            CHECK(f.registers <= f.max_registers);
            above_64 += f.registers > 64;
        }
    }
    // With ptxas: the cap Halide would set is not academic here.
    if (!kPtxas.empty()) CHECK(above_64 > 0);
}

TEST_CASE("a register limit the caller sets (HL_CUDA_JIT_MAX_REGISTERS) is kept") {
    REQUIRE(setenv("HL_CUDA_JIT_MAX_REGISTERS", "128", 1) == 0);
    start("launch=noop");
    auto p = cuda_problem(spec_of(1, 2, 33, 40, 64));
    p.run();
    const auto modules = loaded_modules();
    REQUIRE_FALSE(modules.empty());
    for (const auto &m : modules) CHECK(m.max_registers == 128);
    for (const auto &f : cuda_functions()) CHECK(f.max_registers == 128);
}

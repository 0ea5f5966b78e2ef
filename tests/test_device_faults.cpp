// Device faults through the library: a device that is not there is an
// attend::Error naming it, never an abort; out stays untouched and the CPU path
// keeps working in the same process.
#include <cstdlib>

#include "support.hpp"

using namespace attend;
using namespace attend::test;

TEST_CASE("no OpenCL platform: attend::Error, out untouched, the CPU path still works") {
    // ocl-icd reads its vendor list once, at the first OpenCL call of the process:
    // nothing in this test program has made one before (ctest runs each test case
    // in a process of its own, too).
    REQUIRE(setenv("OCL_ICD_VENDORS", "/nonexistent/attend-test", 1) == 0);
    Options opencl;
    opencl.device = Device::OpenCL;
    const int64_t d = built_among({64})[0];
    auto p = make_problem(spec_of(1, 2, 40, 50, d), opencl);
    std::fill(p.out.storage.begin(), p.out.storage.end(), 7.0f);
    CHECK_THROWS_WITH_AS(p.run(), doctest::Contains(("attend_opencl_d" + std::to_string(d)).c_str()), attend::Error);
    CHECK(std::all_of(p.out.storage.begin(), p.out.storage.end(), [](float x) { return x == 7.0f; }));
    unsetenv("OCL_ICD_VENDORS");

    auto cpu = make_problem(spec_of(1, 2, 40, 50, 64));
    auto expected = cpu.expected();
    check_against_reference(cpu, expected);
}

TEST_CASE("no CUDA driver or GPU: attend::Error naming CUDA, the CPU path still works") {
    Options cuda;
    cuda.device = Device::CUDA;
    auto p = make_problem(spec_of(1, 1, 8, 8, 32), cuda);
    bool has_cuda = true;
    try {
        device_interface(Device::CUDA);
    } catch (const attend::Error &) {
        has_cuda = false;
    }
    if (has_cuda) return;  // a machine with a GPU: tests/test_gpu.cpp runs it
    std::fill(p.out.storage.begin(), p.out.storage.end(), 7.0f);
    CHECK_THROWS_WITH_AS(p.run(), doctest::Contains("CUDA"), attend::Error);
    CHECK(std::all_of(p.out.storage.begin(), p.out.storage.end(), [](float x) { return x == 7.0f; }));
    auto cpu = make_problem(spec_of(1, 1, 8, 8, 32));
    auto expected = cpu.expected();
    check_against_reference(cpu, expected);
}

// Which CPU instruction sets this machine runs: what the CPU kernels' targets
// are matched against (kernel_table.cpp picks the best built one).
#include <cpuid.h>

#include "attend/attend.hpp"

namespace attend {
namespace {

// F16C (CPUID leaf 1, ECX bit 29): clang's __builtin_cpu_supports does not know it.
bool cpu_has_f16c() {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
}

}  // namespace

std::vector<CpuIsa> supported_cpu_isas() {
    // Read once: cpuid traps to the hypervisor on a virtual machine, and every
    // call validates its cpu_isa against this.
    static const std::vector<CpuIsa> supported = [] {
        __builtin_cpu_init();
        std::vector<CpuIsa> isas{CpuIsa::Auto};
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
            __builtin_cpu_supports("avx512vl")) {
            isas.push_back(CpuIsa::AVX512);
        }
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c() &&
            __builtin_cpu_supports("sse4.1")) {
            isas.push_back(CpuIsa::AVX2);
        }
        isas.push_back(CpuIsa::Baseline);
        return isas;
    }();
    return supported;
}

}  // namespace attend

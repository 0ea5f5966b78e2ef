// The kernels a call can run: the build's (the table CMake writes from each
// attend_add_kernel) and those added at run time (add_kernel), and select(), the
// one decision of which of them runs a call. Owns nothing about tensors.
#pragma once

#include <optional>
#include <string>

#include <HalideRuntime.h>

#include "attend/attend.hpp"

namespace attend::detail {

// A kernel of one operation. Its functions are stored type-erased; the
// operation's runner casts them back with Selection::function_for<op>() (the
// table checked them against KernelSignature<op> when it was compiled). Every
// kernel of the build has every feature (mask, causal, dropout).
using ErasedKernel = void (*)();
struct KernelEntry {
    const char *name = "";
    Operation operation = Operation::Forward;
    Device device = Device::CPU;
    int head_dim = 0;  // 0: generic
    DType dtype = DType::Float32;
    int max_rows = 0;  // > 0: a decode kernel (KernelInfo::max_rows)
    halide_type_t element{};  // how the kernel takes q, k, v and out (OpenCL: 16-bit floats as uint16)
    ErasedKernel single_function = nullptr;  // a GPU kernel or an added one: its one function
    ErasedKernel by_isa[4] = {};  // a built CPU kernel: one function per target, indexed by CpuIsa
};

// Everything a call needs to run: the kernel, its function for this CPU, and
// whether d and dv are padded to its head dim.
struct Selection {
    const KernelEntry *kernel = nullptr;
    ErasedKernel function = nullptr;
    CpuIsa cpu_isa = CpuIsa::Auto;
    bool padded = false;

    template <Operation op>
    typename KernelSignature<op>::type function_for() const {
        return reinterpret_cast<typename KernelSignature<op>::type>(function);
    }
};

// The one decision. nullopt with *why_not when nothing in the build fits the
// request (the text says why, naming the option at fault); *no_kernel_fits says
// whether that is because no kernel of the build fits the call (rather than an
// option: a forced kernel, a CPU cap).
std::optional<Selection> select(const KernelRequest &request, std::string *why_not, bool *no_kernel_fits = nullptr);

}  // namespace attend::detail

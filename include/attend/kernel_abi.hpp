// The C signature of every kernel that generators/attention_generator.cpp makes
// (its inputs in order, then the two outputs), and a way to run a kernel generated
// outside this build through the same runtime: `attend tune` (tools/tune.py)
// generates candidate schedules, loads each with dlopen and registers it here, so
// a candidate is validated, marshalled and timed exactly as a built-in kernel.
#pragma once

#include <HalideRuntime.h>

#include "attend/attend.hpp"

#define ATTEND_KERNEL_PARAMS                                                                                    \
    (const void *user_context, halide_buffer_t *q, halide_buffer_t *k, halide_buffer_t *v, halide_buffer_t *mask, \
     float scale, bool causal, bool has_mask, uint32_t drop_threshold, float keep_scale, uint32_t seed_lo,      \
     uint32_t seed_hi, int32_t causal_offset, int32_t all_keys_rows, int32_t key_splits, halide_buffer_t *out, \
     halide_buffer_t *lse)

namespace attend {

using KernelFunction = int(*) ATTEND_KERNEL_PARAMS;

// Adds a CPU kernel (generated for this machine with the `-user_context` target
// feature, and linked against libattend's Halide runtime: `-no_runtime`) under
// info.name. Options::kernel = info.name runs it; select_kernel never picks it,
// and options.cpu_isa must stay Auto. Throws std::invalid_argument when the name is
// empty or taken, the device is not CPU, or function is null. Kernels stay
// registered until the process ends.
ATTEND_API void add_kernel(const KernelInfo &info, KernelFunction function);

}  // namespace attend

// Running one kernel call: the context Halide's runtime gets (errors collected,
// not aborted; the call's CUDA device and stream), GPU buffers readied, the
// kernel launched, results copied back, what the call made released. Knows
// nothing about which kernel or operation runs, nor how tensors become buffers
// (device_buffers.hpp).
#pragma once

#include <functional>
#include <initializer_list>
#include <mutex>
#include <string>

#include "internal.hpp"

namespace attend::detail {

struct KernelBuffer;

// Passed to every kernel as Halide's user_context: errors raised on any thread of
// the call are collected here (instead of Halide's abort()), and the CUDA hooks
// read the call's device and stream from it.
struct CallContext {
    std::mutex lock;
    std::string errors;
    int cuda_device = 0;
    void *cuda_stream = nullptr;
};

// Halide's error handler (errors reach the CallContext of the call that raised
// them) and its device allocation cache, installed once per process.
void install_halide_hooks();

// One kernel call on `device` (CUDA: on device `cuda_device`, ordered on
// `cuda_stream`): GPU buffers are readied (KernelBuffer::to_device), `launch`
// runs the kernel with the call's user_context, to_host outputs come back,
// device memory the call made is freed. Throws attend::Error naming `kernel` and the step that failed.
void run_kernel(const char *kernel, Device device, int cuda_device, void *cuda_stream,
                std::initializer_list<KernelBuffer *> buffers, const std::function<int(void *)> &launch);

}  // namespace attend::detail

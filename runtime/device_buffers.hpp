// Marshalling: tensors as the halide_buffer_t a kernel takes, on the host or on
// a GPU (the caller's Halide device state, a caller's CUDA pointer, or a device
// copy of host data), and the dense host copies a kernel may need. Knows nothing
// about which kernel or operation runs, nor how a call runs (kernel_call.hpp).
#pragma once

#include <cstdint>
#include <vector>

#include <HalideRuntime.h>

#include "internal.hpp"
#include "kernel_call.hpp"  // CallContext

namespace attend::detail {

// A halide_buffer_t over a TensorView, dims reversed (Halide's dim 0 is innermost).
struct KernelBuffer {
    halide_dimension_t dims[4];
    halide_buffer_t buffer{};
    const TensorView &view;
    bool is_output = false;
    bool to_host = false;  // a GPU call copies this output back to host memory after the kernel
    const char *label;     // what it holds, for errors: "copying <label> to the host failed"
    bool wrapped = false;  // buffer.device is the caller's CUDA pointer

    KernelBuffer(const TensorView &t, halide_type_t type);

    // Before a GPU kernel runs; returns a Halide error code.
    int to_device(CallContext *call, const halide_device_interface_t *interface);
    // After it, for to_host outputs: copies the device result to host memory
    // (an innermost dim of stride 0, lse's broadcast view, is copied once).
    int copy_to_host(CallContext *call);
    // After the call: keep the caller's Halide buffer in step, drop what the call made.
    int release(CallContext *call);
};

// A dense host tensor (C order) of t's shape with its last dim `width`, in
// `storage`: zeros (all-zero bits: +0 in every float type), or, with
// dense_copy, t's elements (`bytes` each) and zeros in the columns past t's.
// Zero columns of q and k add nothing to a score; those of v give output
// columns that copy_into drops.
TensorView zeros(const TensorView &t, int64_t width, size_t bytes, std::vector<uint8_t> &storage);
TensorView dense_copy(const TensorView &t, int64_t width, size_t bytes, std::vector<uint8_t> &storage);

// t with its last dim dense: t itself when it is, else a dense copy.
TensorView dense_last_dim(const TensorView &t, size_t bytes, std::vector<uint8_t> &storage);

// Copies a dense host result (C order; its last dim at least out's: the extra
// columns of a padded one are dropped) into out's memory, by out's strides.
void copy_into(const TensorView &dense, const TensorView &out, size_t bytes);

// A CPU kernel wrote the host memory of a caller's Halide buffer: mark its device copy stale.
void mark_host_written(const TensorView &t);

}  // namespace attend::detail

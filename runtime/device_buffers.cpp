// Marshalling of tensors into kernel buffers, and dense host copies.
#include "device_buffers.hpp"

#include <cstring>

#include <HalideRuntimeCuda.h>

namespace attend {
namespace detail {
namespace {

// Copies t's elements into the dense C-order layout of `dense` (whose last dim
// may be wider), or back when `to_t`.
void copy_elements(const TensorView &t, const TensorView &dense, size_t bytes, bool to_t) {
    auto *t_bytes = static_cast<uint8_t *>(t.data);
    auto *dense_bytes = static_cast<uint8_t *>(dense.data);
    const int64_t size = int64_t(bytes);
    for (int64_t a = 0; a < t.shape[0]; a++)
        for (int64_t b = 0; b < t.shape[1]; b++)
            for (int64_t c = 0; c < t.shape[2]; c++)
                for (int64_t e = 0; e < t.shape[3]; e++) {
                    uint8_t *in_t = t_bytes + (a * t.strides[0] + b * t.strides[1] + c * t.strides[2] + e * t.strides[3]) * size;
                    uint8_t *in_dense = dense_bytes + (a * dense.strides[0] + b * dense.strides[1] + c * dense.strides[2] + e) * size;
                    if (to_t) {
                        std::memcpy(in_t, in_dense, bytes);
                    } else {
                        std::memcpy(in_dense, in_t, bytes);
                    }
                }
}

}  // namespace

KernelBuffer::KernelBuffer(const TensorView &t, halide_type_t type) : view(t), label(t.name) {
    for (int i = 0; i < t.ndim; i++) {
        int from = t.ndim - 1 - i;
        // A dim of size 1 is never stepped: its stride may be a piece's past 32 bits.
        const int64_t stride = t.shape[from] == 1 && t.strides[from] > INT32_MAX ? 0 : t.strides[from];
        dims[i] = halide_dimension_t(0, int32_t(t.shape[from]), int32_t(stride));
    }
    buffer.host = static_cast<uint8_t *>(t.data);
    buffer.type = type;
    buffer.dimensions = t.ndim;
    buffer.dim = dims;
}

int KernelBuffer::to_device(CallContext *call, const halide_device_interface_t *interface) {
    if (view.halide && view.halide->device) {
        buffer.device = view.halide->device;
        buffer.device_interface = view.halide->device_interface;
        buffer.flags = view.halide->flags;
        return 0;
    }
    if (!view.data) {  // a stand-in that is never read, or a result Halide allocates: device memory
        return halide_device_malloc(call, &buffer, interface);
    }
#if ATTEND_HAS_CUDA
    if (view.device.device_type == kDLCUDA) {
        buffer.host = nullptr;
        wrapped = true;
        return halide_cuda_wrap_device_ptr(call, &buffer, uint64_t(reinterpret_cast<uintptr_t>(view.data)));
    }
#endif
    // Host data (written by the caller through plain pointers): Halide copies
    // host-dirty inputs to the device. Outputs are written there, not read.
    if (!is_output) buffer.set_host_dirty(true);
    return 0;
}

int KernelBuffer::copy_to_host(CallContext *call) {
    if (buffer.dimensions == 0 || buffer.dim[0].stride != 0) return halide_copy_to_host(call, &buffer);
    // A copy of the stride-0 view would move each element extent times.
    halide_buffer_t once = buffer;
    once.dimensions--;
    once.dim++;
    const int status = halide_copy_to_host(call, &once);
    buffer.flags = once.flags;
    return status;
}

int KernelBuffer::release(CallContext *call) {
#if ATTEND_HAS_CUDA
    if (wrapped) return halide_cuda_detach_device_ptr(call, &buffer);
#endif
    if (view.halide && view.halide->device) {
        const_cast<halide_buffer_t *>(view.halide)->flags = buffer.flags;
        return 0;
    }
    return buffer.device ? halide_device_free(call, &buffer) : 0;
}

TensorView zeros(const TensorView &t, int64_t width, size_t bytes, std::vector<uint8_t> &storage) {
    TensorView dense = t;
    dense.halide = nullptr;
    dense.device = DLDevice{kDLCPU, 0};
    dense.on_device_only = false;
    dense.shape[3] = width;
    int64_t stride = 1;
    for (int i = 3; i >= 0; i--) {
        dense.strides[i] = stride;
        stride *= dense.shape[i];
    }
    storage.assign(size_t(stride) * bytes, 0);
    dense.data = storage.data();
    return dense;
}

TensorView dense_copy(const TensorView &t, int64_t width, size_t bytes, std::vector<uint8_t> &storage) {
    TensorView dense = zeros(t, width, bytes, storage);
    copy_elements(t, dense, bytes, /*to_t=*/false);
    return dense;
}

TensorView dense_last_dim(const TensorView &t, size_t bytes, std::vector<uint8_t> &storage) {
    if (t.strides[3] == 1 || t.shape[3] <= 1) return t;
    return dense_copy(t, t.shape[3], bytes, storage);
}

void copy_into(const TensorView &dense, const TensorView &out, size_t bytes) {
    copy_elements(out, dense, bytes, /*to_t=*/true);
}

void mark_host_written(const TensorView &t) {
    if (t.halide && t.halide->device_interface) {
        const_cast<halide_buffer_t *>(t.halide)->flags |= halide_buffer_flag_host_dirty;
    }
}

}  // namespace detail

}  // namespace attend

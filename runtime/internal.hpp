// The runtime's internals: one view of a tensor whatever it came as, the checked
// problem that validation hands to dispatch, and the kernel call.
#pragma once

#include <cstdint>
#include <string>

#include "attend/attend.hpp"

namespace attend::detail {

// A tensor in PyTorch's order (outermost first), strides in elements, data
// already advanced by any byte offset.
struct TensorView {
    const char *name = "";
    bool present = false;
    void *data = nullptr;
    DLDataType dtype{};
    DLDevice device{kDLCPU, 0};
    bool on_device_only = false;  // a Halide buffer whose current data is on a device
    int ndim = 0;
    int64_t shape[4] = {};
    int64_t strides[4] = {};
};

TensorView view_of(const char *name, const DLTensor &t);
TensorView view_of(const char *name, const halide_buffer_t &b);

// A call that passed validation: every field is consistent and in range.
struct Problem {
    int64_t b = 0, h = 0, kv_heads = 0, n = 0, m = 0, d = 0, dv = 0;
    TensorView q, k, v, mask, out;  // k, v always 4-D here ([b, 1, m, d] for multi-query)
    Device device = Device::CPU;
    Features features;
    float scale = 1.0f;
    uint32_t drop_threshold = 0;  // weights whose 24-bit uniform is below it are dropped
    float keep_scale = 1.0f;      // 1 / (1 - p); 0 when p = 1
    uint64_t seed = 0;
    int64_t causal_offset = 0;    // key j is masked for query i when j > i + causal_offset
    bool empty() const { return b == 0 || h == 0 || n == 0 || dv == 0; }
};

// Throws std::invalid_argument naming the argument, the expectation and what was given.
Problem validate(const TensorView &q, const TensorView &k, const TensorView &v, const TensorView &mask,
                 const TensorView &out, const Options &options);

// Runs the selected kernel; throws attend::Error when it fails.
void run(const Problem &problem, const Options &options);

}  // namespace attend::detail

// The public entry points: turn what the caller gave into views, validate once
// (which also selects the kernel), run. Also the small public functions: names
// and flop counts.
#include "internal.hpp"

namespace attend {
namespace {

using detail::TensorView;
using detail::view_of;
using HostBuffer = Halide::Runtime::Buffer<const void>;

TensorView optional_view(const char *name, const DLTensor *t) { return t ? view_of(name, *t) : detail::absent(name); }

// A default-constructed Halide buffer means "not given".
TensorView optional_view(const char *name, const halide_buffer_t &b) {
    return b.dimensions > 0 || b.host != nullptr ? view_of(name, b) : detail::absent(name);
}

}  // namespace

void forward(const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask, const DLTensor &out,
             const DLTensor *lse, const Options &options) {
    auto problem = detail::validate(view_of("q", q), view_of("k", k), view_of("v", v), optional_view("mask", mask),
                                    view_of("out", out), optional_view("lse", lse), options);
    detail::run_forward(problem, options);
}

void check_forward(const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask,
                   const DLTensor &out, const DLTensor *lse, const Options &options) {
    detail::validate(view_of("q", q), view_of("k", k), view_of("v", v), optional_view("mask", mask),
                     view_of("out", out), optional_view("lse", lse), options);
}

void forward(const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask, const DLTensor &out,
             const Options &options) {
    forward(q, k, v, mask, out, nullptr, options);
}

void forward(const HostBuffer &q, const HostBuffer &k, const HostBuffer &v, const HostBuffer &mask,
             const Halide::Runtime::Buffer<void> &out, const Halide::Runtime::Buffer<void> &lse,
             const Options &options) {
    auto problem = detail::validate(view_of("q", *q.raw_buffer()), view_of("k", *k.raw_buffer()),
                                    view_of("v", *v.raw_buffer()), optional_view("mask", *mask.raw_buffer()),
                                    view_of("out", *out.raw_buffer()), optional_view("lse", *lse.raw_buffer()),
                                    options);
    detail::run_forward(problem, options);
}

void forward(const HostBuffer &q, const HostBuffer &k, const HostBuffer &v, const HostBuffer &mask,
             const Halide::Runtime::Buffer<void> &out, const Options &options) {
    forward(q, k, v, mask, out, Halide::Runtime::Buffer<void>(), options);
}

void backward(const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask, const DLTensor &out,
              const DLTensor &lse, const DLTensor &dout, const DLTensor &dq, const DLTensor &dk, const DLTensor &dv,
              const Options &options) {
    auto problem = detail::validate_backward(view_of("q", q), view_of("k", k), view_of("v", v),
                                             optional_view("mask", mask), view_of("out", out), view_of("lse", lse),
                                             view_of("dout", dout), view_of("dq", dq), view_of("dk", dk),
                                             view_of("dv", dv), options);
    detail::run_backward(problem, options);
}

void backward(const HostBuffer &q, const HostBuffer &k, const HostBuffer &v, const HostBuffer &mask,
              const HostBuffer &out, const HostBuffer &lse, const HostBuffer &dout,
              const Halide::Runtime::Buffer<void> &dq, const Halide::Runtime::Buffer<void> &dk,
              const Halide::Runtime::Buffer<void> &dv, const Options &options) {
    auto problem = detail::validate_backward(
        view_of("q", *q.raw_buffer()), view_of("k", *k.raw_buffer()), view_of("v", *v.raw_buffer()),
        optional_view("mask", *mask.raw_buffer()), view_of("out", *out.raw_buffer()),
        optional_view("lse", *lse.raw_buffer()), view_of("dout", *dout.raw_buffer()), view_of("dq", *dq.raw_buffer()),
        view_of("dk", *dk.raw_buffer()), view_of("dv", *dv.raw_buffer()), options);
    detail::run_backward(problem, options);
}

void merge(const DLTensor &out_a, const DLTensor &lse_a, int64_t keys_a, const DLTensor &out_b,
           const DLTensor &lse_b, int64_t keys_b, const DLTensor &out, const DLTensor &lse) {
    detail::merge(view_of("out_a", out_a), view_of("lse_a", lse_a), keys_a, view_of("out_b", out_b),
                  view_of("lse_b", lse_b), keys_b, view_of("out", out), view_of("lse", lse));
}

void merge(const HostBuffer &out_a, const HostBuffer &lse_a, int64_t keys_a, const HostBuffer &out_b,
           const HostBuffer &lse_b, int64_t keys_b, const Halide::Runtime::Buffer<void> &out,
           const Halide::Runtime::Buffer<void> &lse) {
    detail::merge(view_of("out_a", *out_a.raw_buffer()), view_of("lse_a", *lse_a.raw_buffer()), keys_a,
                  view_of("out_b", *out_b.raw_buffer()), view_of("lse_b", *lse_b.raw_buffer()), keys_b,
                  view_of("out", *out.raw_buffer()), view_of("lse", *lse.raw_buffer()));
}

const char *to_string(CpuIsa isa) {
    switch (isa) {
    case CpuIsa::Auto: return "auto";
    case CpuIsa::AVX512: return "avx512";
    case CpuIsa::AVX2: return "avx2";
    case CpuIsa::Baseline: return "baseline";
    }
    return "unknown";
}

const char *to_string(DType dtype) {
    switch (dtype) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    }
    return "unknown";
}

const char *to_string(Operation operation) {
    switch (operation) {
    case Operation::Forward: return "forward";
    case Operation::Backward: return "backward";
    }
    return "unknown";
}

const char *to_string(Device device) {
    switch (device) {
    case Device::Auto: return "auto";
    case Device::CPU: return "cpu";
    case Device::CUDA: return "cuda";
    case Device::OpenCL: return "opencl";
    }
    return "unknown";
}

double flop_count(int64_t b, int64_t h, int64_t n, int64_t m, int64_t d, int64_t dv, bool causal) {
    return 2.0 * double(b) * double(h) * double(n) * double(m) * double(d + dv) * (causal ? 0.5 : 1.0);
}

double backward_flop_count(int64_t b, int64_t h, int64_t n, int64_t m, int64_t d, int64_t dv, bool causal) {
    return 2.0 * double(b) * double(h) * double(n) * double(m) * double(3 * d + 2 * dv) * (causal ? 0.5 : 1.0);
}

}  // namespace attend

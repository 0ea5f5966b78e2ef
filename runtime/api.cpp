// The public entry points: turn what the caller gave into views, validate once,
// run. Everything else lives in validate.cpp, kernels.cpp and merge.cpp.
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
    detail::run(problem, options);
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
    detail::run(problem, options);
}

void forward(const HostBuffer &q, const HostBuffer &k, const HostBuffer &v, const HostBuffer &mask,
             const Halide::Runtime::Buffer<void> &out, const Options &options) {
    forward(q, k, v, mask, out, Halide::Runtime::Buffer<void>(), options);
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

}  // namespace attend

// The public entry points: turn what the caller gave into views, validate once,
// run. Everything else lives in validate.cpp and kernels.cpp.
#include "internal.hpp"

namespace attend {

void forward(const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask, const DLTensor &out,
             const Options &options) {
    using detail::view_of;
    detail::TensorView mask_view;
    mask_view.name = "mask";
    if (mask) mask_view = view_of("mask", *mask);
    auto problem = detail::validate(view_of("q", q), view_of("k", k), view_of("v", v), mask_view,
                                    view_of("out", out), options);
    detail::run(problem, options);
}

void forward(const Halide::Runtime::Buffer<const void> &q, const Halide::Runtime::Buffer<const void> &k,
             const Halide::Runtime::Buffer<const void> &v, const Halide::Runtime::Buffer<const void> &mask,
             const Halide::Runtime::Buffer<void> &out, const Options &options) {
    using detail::view_of;
    detail::TensorView mask_view;
    mask_view.name = "mask";
    bool has_mask = mask.dimensions() > 0 || mask.data() != nullptr;  // default-constructed: no mask
    if (has_mask) mask_view = view_of("mask", *mask.raw_buffer());
    auto problem = detail::validate(view_of("q", *q.raw_buffer()), view_of("k", *k.raw_buffer()),
                                    view_of("v", *v.raw_buffer()), mask_view, view_of("out", *out.raw_buffer()),
                                    options);
    detail::run(problem, options);
}

}  // namespace attend

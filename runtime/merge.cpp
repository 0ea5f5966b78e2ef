// attend::merge: the log-sum-exp merge of two attentions over disjoint key sets,
// row by row on the host (it reads and writes each element once: memory-bound).
#include <algorithm>
#include <cmath>

#include "internal.hpp"

namespace attend::detail {
namespace {

// Element (a, b, c[, e]) of a validated float32 host tensor.
float &at(const TensorView &t, int64_t a, int64_t b, int64_t c, int64_t e = 0) {
    return static_cast<float *>(t.data)[a * t.strides[0] + b * t.strides[1] + c * t.strides[2] +
                                        (t.ndim == 4 ? e * t.strides[3] : 0)];
}

}  // namespace

void merge(const TensorView &out_a, const TensorView &lse_a, int64_t keys_a, const TensorView &out_b,
           const TensorView &lse_b, int64_t keys_b, const TensorView &out, const TensorView &lse) {
    validate_merge(out_a, lse_a, keys_a, out_b, lse_b, keys_b, out, lse);
    const int64_t dv = out.shape[3];
    for (int64_t b = 0; b < out.shape[0]; b++) {
        for (int64_t h = 0; h < out.shape[1]; h++) {
            for (int64_t i = 0; i < out.shape[2]; i++) {
                const double la = at(lse_a, b, h, i), lb = at(lse_b, b, h, i);
                const double top = std::max(la, lb);
                double wa, wb, merged_lse;
                if (top == -INFINITY) {  // every key masked in both: the seed's uniform weights
                    wa = double(keys_a) / double(keys_a + keys_b);
                    wb = 1.0 - wa;
                    merged_lse = -INFINITY;
                } else {  // a part with lse -inf (all masked) weighs exp(-inf) = 0
                    const double ea = std::exp(la - top), eb = std::exp(lb - top);
                    wa = ea / (ea + eb);
                    wb = eb / (ea + eb);
                    merged_lse = top + std::log(ea + eb);
                }
                for (int64_t e = 0; e < dv; e++) {
                    at(out, b, h, i, e) = float(wa * at(out_a, b, h, i, e) + wb * at(out_b, b, h, i, e));
                }
                at(lse, b, h, i) = float(merged_lse);
            }
        }
    }
}

}  // namespace attend::detail

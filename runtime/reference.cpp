// The double-precision oracle (attend/reference.hpp): the math of the seed module,
// one query row at a time.
#include "attend/reference.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "attend/dropout_hash.hpp"

namespace attend::reference {

std::vector<double> forward(const Shape &s, const float *q, const float *k, const float *v, const uint8_t *mask,
                            const Options &options, std::vector<double> *lse) {
    const int64_t kv_heads = s.kv_heads == 0 ? 1 : s.kv_heads;  // 0: multi-query [b, m, d]
    const int64_t group = s.h / kv_heads;
    const double scale = options.scale ? *options.scale : 1.0 / std::sqrt(double(s.d));
    const bool dropout = options.training && options.dropout > 0.0f;
    const uint32_t threshold = dropout ? dropout::threshold_for(options.dropout) : 0;
    const double keep_scale = options.dropout < 1.0f ? 1.0 / (1.0 - double(options.dropout)) : 0.0;
    const int64_t causal_offset = (options.causal_align == CausalAlign::BottomRight ? s.m - s.n : 0) +
                                  options.query_offset - options.key_offset;

    std::vector<double> out(size_t(s.b * s.h * s.n * s.dv), 0.0), score(size_t(s.m));
    if (lse) lse->assign(size_t(s.b * s.h * s.n), 0.0);
    for (int64_t b = 0; b < s.b; b++) {
        for (int64_t h = 0; h < s.h; h++) {
            const int64_t kvh = h / group;
            const float *kb = k + (b * kv_heads + kvh) * s.m * s.d;
            const float *vb = v + (b * kv_heads + kvh) * s.m * s.dv;
            for (int64_t i = 0; i < s.n; i++) {
                const float *qi = q + ((b * s.h + h) * s.n + i) * s.d;
                double max_score = -INFINITY;
                for (int64_t j = 0; j < s.m; j++) {
                    double dot = 0.0;
                    for (int64_t c = 0; c < s.d; c++) dot += double(qi[c]) * double(kb[j * s.d + c]);
                    bool masked = (mask && !mask[b * s.m + j]) || (options.causal && j > i + causal_offset);
                    score[j] = masked ? -double(FLT_MAX) : dot * scale;  // the seed's masked_fill
                    max_score = std::max(max_score, score[j]);
                }
                double sum = 0.0;
                for (int64_t j = 0; j < s.m; j++) sum += (score[j] = std::exp(score[j] - max_score));
                if (lse) {  // masked keys add exp(-FLT_MAX - max) = 0 unless all are masked
                    (*lse)[size_t((b * s.h + h) * s.n + i)] =
                        max_score == -double(FLT_MAX) ? -INFINITY : max_score + std::log(sum);
                }
                double *oi = &out[size_t(((b * s.h + h) * s.n + i) * s.dv)];
                for (int64_t j = 0; j < s.m; j++) {
                    double weight = score[j] / sum;
                    if (dropout) {
                        bool kept = dropout::keep(options.seed, uint32_t(b), uint32_t(h),
                                                  uint32_t(i + options.query_offset), uint32_t(j + options.key_offset),
                                                  threshold);
                        weight = kept ? weight * keep_scale : 0.0;
                    }
                    for (int64_t c = 0; c < s.dv; c++) oi[c] += weight * double(vb[j * s.dv + c]);
                }
            }
        }
    }
    return out;
}

}  // namespace attend::reference

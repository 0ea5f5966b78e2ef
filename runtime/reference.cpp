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

Gradients backward(const Shape &s, const float *q, const float *k, const float *v, const uint8_t *mask,
                   const float *dout, const Options &options) {
    const int64_t kv_heads = s.kv_heads == 0 ? 1 : s.kv_heads;
    const int64_t group = s.h / kv_heads;
    const double scale = options.scale ? *options.scale : 1.0 / std::sqrt(double(s.d));
    const bool dropout = options.training && options.dropout > 0.0f;
    const uint32_t threshold = dropout ? dropout::threshold_for(options.dropout) : 0;
    const double keep_scale = options.dropout < 1.0f ? 1.0 / (1.0 - double(options.dropout)) : 0.0;
    const int64_t causal_offset = (options.causal_align == CausalAlign::BottomRight ? s.m - s.n : 0) +
                                  options.query_offset - options.key_offset;

    Gradients g;
    g.dq.assign(size_t(s.b * s.h * s.n * s.d), 0.0);
    g.dk.assign(size_t(s.b * kv_heads * s.m * s.d), 0.0);
    g.dv.assign(size_t(s.b * kv_heads * s.m * s.dv), 0.0);
    std::vector<double> p(size_t(s.m)), kept(size_t(s.m)), dp(size_t(s.m));
    std::vector<bool> masked(size_t(s.m));
    for (int64_t b = 0; b < s.b; b++) {
        for (int64_t h = 0; h < s.h; h++) {
            const int64_t kvh = h / group;
            const float *kb = k + (b * kv_heads + kvh) * s.m * s.d;
            const float *vb = v + (b * kv_heads + kvh) * s.m * s.dv;
            double *dkb = &g.dk[size_t((b * kv_heads + kvh) * s.m * s.d)];
            double *dvb = &g.dv[size_t((b * kv_heads + kvh) * s.m * s.dv)];
            for (int64_t i = 0; i < s.n; i++) {
                const float *qi = q + ((b * s.h + h) * s.n + i) * s.d;
                const float *doi = dout + ((b * s.h + h) * s.n + i) * s.dv;
                double *dqi = &g.dq[size_t(((b * s.h + h) * s.n + i) * s.d)];
                // P: the softmax of the masked scores, as forward() computes it.
                double max_score = -INFINITY;
                for (int64_t j = 0; j < s.m; j++) {
                    double dot = 0.0;
                    for (int64_t c = 0; c < s.d; c++) dot += double(qi[c]) * double(kb[j * s.d + c]);
                    masked[size_t(j)] = (mask && !mask[b * s.m + j]) || (options.causal && j > i + causal_offset);
                    p[size_t(j)] = masked[size_t(j)] ? -double(FLT_MAX) : dot * scale;
                    max_score = std::max(max_score, p[size_t(j)]);
                }
                double sum = 0.0;
                for (int64_t j = 0; j < s.m; j++) sum += (p[size_t(j)] = std::exp(p[size_t(j)] - max_score));
                // P~ = P Z / (1 - p): dv_j += P~_j dout_i; dP_j = Z_j / (1 - p) dout_i . v_j.
                double row_dot = 0.0;  // sum_j P_j dP_j
                for (int64_t j = 0; j < s.m; j++) {
                    p[size_t(j)] /= sum;
                    double factor = 1.0;
                    if (dropout) {
                        factor = dropout::keep(options.seed, uint32_t(b), uint32_t(h), uint32_t(i + options.query_offset),
                                               uint32_t(j + options.key_offset), threshold)
                                     ? keep_scale
                                     : 0.0;
                    }
                    kept[size_t(j)] = p[size_t(j)] * factor;
                    double do_v = 0.0;
                    for (int64_t c = 0; c < s.dv; c++) {
                        dvb[j * s.dv + c] += kept[size_t(j)] * double(doi[c]);
                        do_v += double(doi[c]) * double(vb[j * s.dv + c]);
                    }
                    dp[size_t(j)] = factor * do_v;
                    row_dot += p[size_t(j)] * dp[size_t(j)];
                }
                // dS_j = P_j (dP_j - sum_l P_l dP_l) where the score is live; 0 where masked.
                for (int64_t j = 0; j < s.m; j++) {
                    if (masked[size_t(j)]) continue;
                    const double ds = p[size_t(j)] * (dp[size_t(j)] - row_dot) * scale;
                    for (int64_t c = 0; c < s.d; c++) {
                        dqi[c] += ds * double(kb[j * s.d + c]);
                        dkb[j * s.d + c] += ds * double(qi[c]);
                    }
                }
            }
        }
    }
    return g;
}

}  // namespace attend::reference

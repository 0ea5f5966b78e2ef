// The double-precision oracle (attend/reference.hpp): the math of the seed module,
// one query row at a time; its backward reuses the forward's row.
#include "attend/reference.hpp"

#include <algorithm>
#include <cfloat>
#include <cmath>

#include "attend/dropout_hash.hpp"

namespace attend::reference {
namespace {

// What a call's shape and options fix for every row.
struct Rules {
    int64_t kv_heads, group;
    double scale, keep_scale;
    bool dropout;
    uint32_t threshold;
    int64_t causal_offset;  // key j is masked for query i when j > i + causal_offset

    Rules(const Shape &s, const Options &o)
        : kv_heads(s.kv_heads == 0 ? 1 : s.kv_heads),  // 0: multi-query [b, m, d]
          group(s.h / kv_heads),
          scale(o.scale ? *o.scale : 1.0 / std::sqrt(double(s.d))),
          keep_scale(o.dropout < 1.0f ? 1.0 / (1.0 - double(o.dropout)) : 0.0),
          dropout(o.training && o.dropout > 0.0f),
          threshold(dropout ? dropout::threshold_for(o.dropout) : 0),
          causal_offset((o.causal_align == CausalAlign::BottomRight ? s.m - s.n : 0) + o.query_offset - o.key_offset) {}
};

// Row i of (b, h): its softmax weights w over the m keys (masked scores
// -FLT_MAX, the seed's masked_fill), the dropout factor Z/(1 - p) of each key
// (1 without dropout), which keys are masked, and the row's log-sum-exp.
struct Row {
    std::vector<double> w, factor;
    std::vector<bool> masked;
    double lse = 0.0;

    void compute(const Shape &s, const Options &o, const Rules &r, const float *qi, const float *kb,
                 const uint8_t *mask, int64_t b, int64_t h, int64_t i) {
        w.resize(size_t(s.m));
        factor.assign(size_t(s.m), 1.0);
        masked.resize(size_t(s.m));
        double max_score = -INFINITY;
        for (int64_t j = 0; j < s.m; j++) {
            double dot = 0.0;
            for (int64_t c = 0; c < s.d; c++) dot += double(qi[c]) * double(kb[j * s.d + c]);
            masked[size_t(j)] = (mask && !mask[b * s.m + j]) || (o.causal && j > i + r.causal_offset);
            w[size_t(j)] = masked[size_t(j)] ? -double(FLT_MAX) : dot * r.scale;
            max_score = std::max(max_score, w[size_t(j)]);
        }
        double sum = 0.0;
        for (int64_t j = 0; j < s.m; j++) sum += (w[size_t(j)] = std::exp(w[size_t(j)] - max_score));
        // Masked keys add exp(-FLT_MAX - max) = 0 unless all are masked.
        lse = max_score == -double(FLT_MAX) ? -INFINITY : max_score + std::log(sum);
        for (int64_t j = 0; j < s.m; j++) {
            w[size_t(j)] /= sum;
            if (r.dropout) {
                const bool kept = dropout::keep(o.seed, uint32_t(b), uint32_t(h), uint32_t(i + o.query_offset),
                                                uint32_t(j + o.key_offset), r.threshold);
                factor[size_t(j)] = kept ? r.keep_scale : 0.0;
            }
        }
    }
};

}  // namespace

std::vector<double> forward(const Shape &s, const float *q, const float *k, const float *v, const uint8_t *mask,
                            const Options &options, std::vector<double> *lse) {
    const Rules r(s, options);
    std::vector<double> out(size_t(s.b * s.h * s.n * s.dv), 0.0);
    if (lse) lse->assign(size_t(s.b * s.h * s.n), 0.0);
    Row row;
    for (int64_t b = 0; b < s.b; b++) {
        for (int64_t h = 0; h < s.h; h++) {
            const int64_t kvh = h / r.group;
            const float *kb = k + (b * r.kv_heads + kvh) * s.m * s.d;
            const float *vb = v + (b * r.kv_heads + kvh) * s.m * s.dv;
            for (int64_t i = 0; i < s.n; i++) {
                const int64_t at = (b * s.h + h) * s.n + i;
                row.compute(s, options, r, q + at * s.d, kb, mask, b, h, i);
                if (lse) (*lse)[size_t(at)] = row.lse;
                double *oi = &out[size_t(at * s.dv)];
                for (int64_t j = 0; j < s.m; j++) {
                    const double weight = row.w[size_t(j)] * row.factor[size_t(j)];
                    for (int64_t c = 0; c < s.dv; c++) oi[c] += weight * double(vb[j * s.dv + c]);
                }
            }
        }
    }
    return out;
}

Gradients backward(const Shape &s, const float *q, const float *k, const float *v, const uint8_t *mask,
                   const float *dout, const Options &options) {
    const Rules r(s, options);
    Gradients g;
    g.dq.assign(size_t(s.b * s.h * s.n * s.d), 0.0);
    g.dk.assign(size_t(s.b * r.kv_heads * s.m * s.d), 0.0);
    g.dv.assign(size_t(s.b * r.kv_heads * s.m * s.dv), 0.0);
    g.dq_terms = g.dq;
    g.dk_terms = g.dk;
    g.dv_terms = g.dv;
    Row row;
    std::vector<double> dp(size_t(s.m)), dp_terms(size_t(s.m));
    for (int64_t b = 0; b < s.b; b++) {
        for (int64_t h = 0; h < s.h; h++) {
            const int64_t kvh = h / r.group;
            const float *kb = k + (b * r.kv_heads + kvh) * s.m * s.d;
            const float *vb = v + (b * r.kv_heads + kvh) * s.m * s.dv;
            double *dkb = &g.dk[size_t((b * r.kv_heads + kvh) * s.m * s.d)];
            double *dvb = &g.dv[size_t((b * r.kv_heads + kvh) * s.m * s.dv)];
            double *dk_terms = &g.dk_terms[size_t((b * r.kv_heads + kvh) * s.m * s.d)];
            double *dv_terms = &g.dv_terms[size_t((b * r.kv_heads + kvh) * s.m * s.dv)];
            for (int64_t i = 0; i < s.n; i++) {
                const int64_t at = (b * s.h + h) * s.n + i;
                const float *qi = q + at * s.d, *doi = dout + at * s.dv;
                double *dqi = &g.dq[size_t(at * s.d)], *dq_terms = &g.dq_terms[size_t(at * s.d)];
                row.compute(s, options, r, qi, kb, mask, b, h, i);
                // With P~ = P Z/(1 - p): dv_j += P~_j dout_i; dP_j = Z_j/(1 - p) dout_i . v_j.
                double row_dot = 0.0, row_dot_terms = 0.0;  // sum_j P_j dP_j
                for (int64_t j = 0; j < s.m; j++) {
                    const double kept = row.w[size_t(j)] * row.factor[size_t(j)];
                    double do_v = 0.0, do_v_terms = 0.0;
                    for (int64_t c = 0; c < s.dv; c++) {
                        dvb[j * s.dv + c] += kept * double(doi[c]);
                        dv_terms[j * s.dv + c] += std::fabs(kept * double(doi[c]));
                        do_v += double(doi[c]) * double(vb[j * s.dv + c]);
                        do_v_terms += std::fabs(double(doi[c]) * double(vb[j * s.dv + c]));
                    }
                    dp[size_t(j)] = row.factor[size_t(j)] * do_v;
                    dp_terms[size_t(j)] = row.factor[size_t(j)] * do_v_terms;
                    row_dot += row.w[size_t(j)] * dp[size_t(j)];
                    row_dot_terms += row.w[size_t(j)] * dp_terms[size_t(j)];
                }
                // dS_j = P_j (dP_j - sum_l P_l dP_l) where the score is live; 0 where masked.
                for (int64_t j = 0; j < s.m; j++) {
                    if (row.masked[size_t(j)]) continue;
                    const double ds = row.w[size_t(j)] * (dp[size_t(j)] - row_dot) * r.scale;
                    const double ds_terms = row.w[size_t(j)] * (dp_terms[size_t(j)] + row_dot_terms) * std::fabs(r.scale);
                    for (int64_t c = 0; c < s.d; c++) {
                        dqi[c] += ds * double(kb[j * s.d + c]);
                        dkb[j * s.d + c] += ds * double(qi[c]);
                        dq_terms[c] += ds_terms * std::fabs(double(kb[j * s.d + c]));
                        dk_terms[j * s.d + c] += ds_terms * std::fabs(double(qi[c]));
                    }
                }
            }
        }
    }
    return g;
}

}  // namespace attend::reference

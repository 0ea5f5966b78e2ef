// The oracle's backward (attend::reference::backward, the ground truth for the
// backward kernels) against finite differences of the oracle's forward, which is
// the original module's math: masks, rows with every key masked, causal in both
// alignments and at global positions, dropout, grouped- and multi-query heads.
#include "support.hpp"

using namespace attend;
using namespace attend::test;

namespace {

// Values on a grid of 2^-12 within (-3, 3): x ± h, with h a power of two >= 2^-12,
// is then exact in float32, so a finite difference sees exactly the step it divides by.
std::vector<float> grid_values(size_t count, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    std::vector<float> x(count);
    for (auto &e : x) e = std::round(std::clamp(normal(rng), -2.9f, 2.9f) * 4096.0f) / 4096.0f;
    return x;
}

struct Case {
    const char *name;
    reference::Shape shape;
    Options options;
    bool mask;
};

// dL/dx[e] for L = sum(dout * forward(...)): Richardson extrapolation of central
// differences with steps h and h/2, whose error is O(h^4).
template <class Loss>
double derivative(std::vector<float> &x, size_t e, Loss &&loss) {
    auto central = [&](float step) {
        const float saved = x[e];
        x[e] = saved + step;
        const double up = loss();
        x[e] = saved - step;
        const double down = loss();
        x[e] = saved;
        return (up - down) / (2.0 * double(step));
    };
    const float h = 1.0f / 128.0f;
    return (4.0 * central(h / 2) - central(h)) / 3.0;
}

}  // namespace

TEST_CASE("the oracle's backward equals finite differences of its forward (masks, fully masked rows, causal, "
          "dropout, GQA, MQA, global positions)") {
    std::vector<Case> cases;
    {
        Case c{"grouped-query, bottom-right causal with n > m (2 rows see no key), a batch fully masked", {}, {}, true};
        c.shape = reference::Shape{2, 4, 2, 6, 4, 3, 4};
        c.options.causal = true;
        c.options.causal_align = CausalAlign::BottomRight;
        cases.push_back(c);
    }
    {
        Case c{"multi-query, top-left causal, dropout 0.3, scale 0.7, a mask", {}, {}, true};
        c.shape = reference::Shape{1, 3, 0, 4, 6, 3, 2};
        c.options.causal = true;
        c.options.training = true;
        c.options.dropout = 0.3f;
        c.options.seed = 42;
        c.options.scale = 0.7f;
        cases.push_back(c);
    }
    {
        Case c{"a shard at global positions (query_offset 3, key_offset 5), causal, dropout 0.5", {}, {}, false};
        c.shape = reference::Shape{1, 2, 2, 5, 7, 4, 3};
        c.options.causal = true;
        c.options.training = true;
        c.options.dropout = 0.5f;
        c.options.seed = 7;
        c.options.query_offset = 3;
        c.options.key_offset = 5;
        cases.push_back(c);
    }
    for (const Case &c : cases) {
        INFO(std::string(c.name));
        const auto &s = c.shape;
        const int64_t kv = s.kv_heads == 0 ? 1 : s.kv_heads;
        auto q = grid_values(size_t(s.b * s.h * s.n * s.d), 1), k = grid_values(size_t(s.b * kv * s.m * s.d), 2),
             v = grid_values(size_t(s.b * kv * s.m * s.dv), 3), dout = grid_values(size_t(s.b * s.h * s.n * s.dv), 4);
        std::vector<uint8_t> mask(size_t(s.b * s.m), 1);
        if (c.mask) {
            std::mt19937 rng(5);
            for (auto &bit : mask) bit = rng() % 3 != 0;
            for (int64_t j = 0; j < s.m; j++) mask[size_t((s.b - 1) * s.m + j)] = s.b > 1 ? 0 : mask[size_t(j)];
        }
        const uint8_t *mask_data = c.mask ? mask.data() : nullptr;
        auto loss = [&] {
            auto out = reference::forward(s, q.data(), k.data(), v.data(), mask_data, c.options);
            double sum = 0.0;
            for (size_t e = 0; e < out.size(); e++) sum += out[e] * double(dout[e]);
            return sum;
        };
        const auto g = reference::backward(s, q.data(), k.data(), v.data(), mask_data, dout.data(), c.options);
        // Richardson's error is O(h^4) = 2^-28 (4e-9) times fifth derivatives of
        // order 1 at these sizes, and the double rounding of the loss adds about
        // 1e-13 after the division by h: 1e-6 has room for both, and any missing or
        // wrong term (a weight, the dropout factor, a masked key's gradient) is
        // orders of magnitude larger.
        const double tolerance = 1e-6;
        auto check = [&](const char *what, std::vector<float> &x, const std::vector<double> &analytic) {
            REQUIRE(analytic.size() == x.size());
            double largest = 0.0;
            for (size_t e = 0; e < x.size(); e++) largest = std::max(largest, std::fabs(derivative(x, e, loss) - analytic[e]));
            INFO(std::string(what) << ": largest difference " << largest);
            CHECK(largest <= tolerance);
        };
        check("dq", q, g.dq);
        check("dk", k, g.dk);
        check("dv", v, g.dv);
        if (c.mask && s.b > 1) {
            // The fully masked batch: dq = 0 and dk = 0 exactly; dv_j = sum over its
            // rows of dout_i / m (no dropout in this case), the seed's uniform weights.
            const int64_t last = s.b - 1;
            for (int64_t e = last * s.h * s.n * s.d; e < s.b * s.h * s.n * s.d; e++) CHECK(g.dq[size_t(e)] == 0.0);
            for (int64_t e = last * kv * s.m * s.d; e < s.b * kv * s.m * s.d; e++) CHECK(g.dk[size_t(e)] == 0.0);
            const int64_t group = s.h / kv;
            double largest = 0.0;
            for (int64_t hk = 0; hk < kv; hk++)
                for (int64_t j = 0; j < s.m; j++)
                    for (int64_t c = 0; c < s.dv; c++) {
                        double expected = 0.0;
                        for (int64_t h = hk * group; h < (hk + 1) * group; h++)
                            for (int64_t i = 0; i < s.n; i++) expected += double(dout[size_t(((last * s.h + h) * s.n + i) * s.dv + c)]);
                        expected /= double(s.m);
                        largest = std::max(largest, std::fabs(g.dv[size_t(((last * kv + hk) * s.m + j) * s.dv + c)] - expected));
                    }
            CHECK(largest <= 1e-12);  // the same sums in double, in another order
        }
    }
}

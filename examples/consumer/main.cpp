// Multi-query attention on small tensors through an installed Attend, checked
// against the library's double-precision reference.
#include <cmath>
#include <cstdio>
#include <vector>

#include <attend/attend.hpp>
#include <attend/reference.hpp>

int main() {
    const int64_t b = 2, h = 4, n = 16, m = 24, d = 64;
    std::vector<float> q(b * h * n * d), k(b * m * d), v(b * m * d), out(b * h * n * d);
    for (size_t i = 0; i < q.size(); i++) q[i] = std::sin(0.1f * float(i));
    for (size_t i = 0; i < k.size(); i++) k[i] = std::cos(0.07f * float(i));
    for (size_t i = 0; i < v.size(); i++) v[i] = std::sin(0.03f * float(i) + 1.0f);

    // Halide buffers are in Halide's order: innermost dim first.
    Halide::Runtime::Buffer<float> qb(q.data(), d, n, h, b), kb(k.data(), d, m, b), vb(v.data(), d, m, b);
    Halide::Runtime::Buffer<float> ob(out.data(), d, n, h, b);
    attend::Options options;
    options.causal = true;
    attend::forward(qb, kb, vb, Halide::Runtime::Buffer<const void>(), ob, options);

    auto expected = attend::reference::forward({b, h, 0, n, m, d, d}, q.data(), k.data(), v.data(), nullptr, options);
    double max_error = 0;
    for (size_t i = 0; i < out.size(); i++) max_error = std::fmax(max_error, std::fabs(out[i] - expected[i]));
    std::printf("consumer: max |error| %.2e against the reference\n", max_error);
    return max_error < 1e-5 ? 0 : 1;
}

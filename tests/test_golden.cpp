// Golden files from the original PyTorch module (tests/golden/make_golden.py):
// every kernel and ISA reproduces its outputs.
#include <fstream>

#include <nlohmann/json.hpp>

#include "backward_support.hpp"
#include "npy.hpp"
#include "support.hpp"

using namespace attend;
using namespace attend::test;

namespace {

Tensor<float> tensor_from(const npy::Array &a) {
    auto t = make_tensor<float>(a.shape, float32_type());
    std::copy(a.f32(), a.f32() + a.numel(), t.storage.begin());
    return t;
}

// A golden case's q, k, v and mask as a Problem (its options: the case's causal).
Problem golden_problem(const nlohmann::json &c, const std::string &folder) {
    Problem p;
    p.q = tensor_from(npy::read(folder + "/q.npy"));
    p.k = tensor_from(npy::read(folder + "/k.npy"));
    p.v = tensor_from(npy::read(folder + "/v.npy"));
    const bool multi_query = p.k.shape.size() == 3;
    p.shape = reference::Shape{p.q.shape[0], p.q.shape[1], multi_query ? 0 : p.k.shape[1], p.q.shape[2],
                               p.k.shape[p.k.shape.size() - 2], p.q.shape[3], p.v.shape.back()};
    if (c["has_mask"].get<bool>()) {
        auto m = npy::read(folder + "/mask.npy");
        REQUIRE(m.dtype == npy::DType::Bool);
        p.mask = make_tensor<uint8_t>(m.shape, bool_type());
        std::copy(m.data.begin(), m.data.end(), p.mask->storage.begin());
    }
    p.options.causal = c["causal"].get<bool>();
    return p;
}

std::vector<double> doubles(const npy::Array &a) { return std::vector<double>(a.f32(), a.f32() + a.numel()); }

}  // namespace

TEST_CASE("outputs of the original module (golden files)") {
    const std::string dir = ATTEND_GOLDEN_DIR;
    std::ifstream file(dir + "/cases.json");
    REQUIRE(file.good());
    auto cases = nlohmann::json::parse(file)["cases"];
    REQUIRE(cases.size() >= 12);
    for (const auto &c : cases) {
        const std::string name = c["name"], folder = dir + "/" + name;
        INFO("golden case " << name << ": " << c["description"].get<std::string>());
        Problem p = golden_problem(c, folder);
        auto golden = npy::read(folder + "/out.npy");
        // Both the module and the kernel are fp32 computations within the bound of the exact result.
        const double tolerance = 2 * fp32_tolerance(p);
        for (const auto &k : available_kernels()) {
            if (k.operation != Operation::Forward || k.device != Device::CPU || k.dtype != DType::Float32) continue;  // GPU: tests/test_gpu.cpp
            if (k.head_dim != 0 && !(k.head_dim == p.shape.d && k.head_dim == p.shape.dv)) continue;
            for (CpuIsa isa : supported_cpu_isas()) {
                INFO(k.name << "/" << std::string(to_string(isa)));
                p.out = nan_tensor(golden.shape);
                p.options.kernel = k.name;
                p.options.cpu_isa = isa;
                p.run();
                std::vector<double> expected(golden.f32(), golden.f32() + golden.numel());
                auto result = compare(p.out.dense(), expected);
                CHECK(result.not_finite == 0);
                CHECK(result.max_error <= tolerance);
            }
        }
    }
}

TEST_CASE("gradients of the original module (golden files: its autograd for a dout)") {
    const std::string dir = ATTEND_GOLDEN_DIR;
    std::ifstream file(dir + "/cases.json");
    REQUIRE(file.good());
    const auto cases = nlohmann::json::parse(file)["cases"];  // (a range-for over parse(...)[...] outlives the parse)
    for (const auto &c : cases) {
        const std::string name = c["name"], folder = dir + "/" + name;
        INFO("golden case " << name << ": " << c["description"].get<std::string>());
        Problem p = golden_problem(c, folder);
        const Options options = p.options;
        Backward b(p, tensor_from(npy::read(folder + "/dout.npy")), options);
        const auto golden_dq = doubles(npy::read(folder + "/dq.npy")), golden_dk = doubles(npy::read(folder + "/dk.npy")),
                   golden_dv = doubles(npy::read(folder + "/dv.npy"));
        const auto &s = b.forward.shape;
        const int64_t group_rows = s.n * (s.h / std::max<int64_t>(s.kv_heads, 1));
        for (const auto &k : available_kernels()) {
            if (k.operation != Operation::Backward || k.device != Device::CPU || k.dtype != DType::Float32) continue;
            if (k.head_dim != 0 && !(k.head_dim == s.d && k.head_dim == s.dv)) continue;
            for (CpuIsa isa : supported_cpu_isas()) {
                INFO(k.name << "/" << std::string(to_string(isa)));
                Options run = options;
                run.kernel = k.name;
                run.cpu_isa = isa;
                b.run(run);
                // The module's float32 gradients and the kernel's are each within the bound of the exact ones.
                check_gradients(b,
                                {{"dq", b.dq.dense(), golden_dq, b.expected.dq_terms, s.m},
                                 {"dk", b.dk.dense(), golden_dk, b.expected.dk_terms, group_rows},
                                 {"dv", b.dv.dense(), golden_dv, b.expected.dv_terms, group_rows}},
                                0, 0, 2);
            }
        }
    }
}

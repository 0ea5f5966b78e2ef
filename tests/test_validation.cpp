// Bad input: a std::invalid_argument naming the argument and the expectation,
// out and lse untouched, and the next good call still works.
#include <cmath>
#include <functional>

#include "support.hpp"

using namespace attend;
using namespace attend::test;

namespace {

constexpr float kSentinel = 12345.0f;

// The tensors of one call, as DLTensors that a case may bend.
struct Call {
    Problem p;
    DLTensor q, k, v, out, mask, lse;
    bool with_mask = true;
    Options options;
    std::vector<int64_t> shape_a, shape_b;  // storage for bent shapes

    Call() {
        ProblemSpec spec;
        spec.b = 2;
        spec.h = 4;
        spec.kv_heads = 2;
        spec.n = 5;
        spec.m = 7;
        spec.d = spec.dv = 8;
        spec.mask = true;
        p = make_problem(spec);
        std::fill(p.out.storage.begin(), p.out.storage.end(), kSentinel);
        std::fill(p.lse->storage.begin(), p.lse->storage.end(), kSentinel);
        q = p.q.dl();
        k = p.k.dl();
        v = p.v.dl();
        out = p.out.dl();
        mask = p.mask->dl();
        lse = p.lse->dl();
    }
    void run() { forward(q, k, v, with_mask ? &mask : nullptr, out, &lse, options); }
    bool out_untouched() const {
        auto sentinel = [](float x) { return x == kSentinel; };
        return std::all_of(p.out.storage.begin(), p.out.storage.end(), sentinel) &&
               std::all_of(p.lse->storage.begin(), p.lse->storage.end(), sentinel);
    }
};

struct BadCase {
    const char *what;
    std::function<void(Call &)> bend;
    std::vector<const char *> message_parts;  // all must appear in the message
};

int64_t reshaped[4];

std::vector<BadCase> bad_cases() {
    return {
        {"q has 3 dims", [](Call &c) { c.q.ndim = 3; }, {"q:", "4 dims [b, h, n, d]", "got 3 dims"}},
        {"q has 5 dims", [](Call &c) { c.q.ndim = 5; }, {"q:", "4 dims", "got 5"}},
        {"k has 2 dims", [](Call &c) { c.k.ndim = 2; }, {"k:", "3 dims [b, m, d] or 4 dims"}},
        {"out has 3 dims", [](Call &c) { c.out.ndim = 3; }, {"out:", "4 dims [b, h, n, dv]"}},
        {"mask has 1 dim", [](Call &c) { c.mask.ndim = 1; }, {"mask:", "2 dims [b, m]"}},
        {"k batch differs", [](Call &c) { c.k.shape[0] = 1; }, {"k:", "batch size is 1", "q's is 2"}},
        {"v batch differs", [](Call &c) { c.v.shape[0] = 3; }, {"v:", "batch size is 3"}},
        {"kv heads do not divide heads", [](Call &c) { c.k.shape[1] = 3; }, {"k:", "3 kv heads must divide", "4 heads"}},
        {"v kv heads differ from k", [](Call &c) { c.v.shape[1] = 1; }, {"v:", "number of kv heads is 1", "k's is 2"}},
        {"k head dim differs", [](Call &c) { c.k.shape[3] = 4; }, {"k:", "head dim is 4", "q's is 8"}},
        {"v key count differs", [](Call &c) { c.v.shape[2] = 6; }, {"v:", "number of keys is 6", "k's is 7"}},
        {"v 3-D with k 4-D", [](Call &c) { c.v.ndim = 3; }, {"v:", "has 3 dims but k has 4"}},
        {"out shape wrong", [](Call &c) { c.out.shape[2] = 4; }, {"out:", "expected shape [2, 4, 5, 8]", "got [2, 4, 4, 8]"}},
        {"mask batch wrong", [](Call &c) { c.mask.shape[0] = 1; }, {"mask:", "expected shape [2, 7]", "got [1, 7]"}},
        {"mask keys wrong", [](Call &c) { c.mask.shape[1] = 8; }, {"mask:", "[b, m]", "got [2, 8]"}},
        {"zero keys", [](Call &c) { c.k.shape[2] = 0; c.v.shape[2] = 0; c.mask.shape[1] = 0; }, {"k:", "0 keys", "at least one key"}},
        {"zero head dim", [](Call &c) { c.q.shape[3] = 0; c.k.shape[3] = 0; }, {"q:", "head dim is 0"}},
        {"negative dim", [](Call &c) { c.q.shape[2] = -5; }, {"q:", "negative size -5"}},
        {"negative stride", [](Call &c) { c.q.strides[2] = -8; }, {"q:", "stride of dim 2 is -8", "negative strides"}},
        {"q float64", [](Call &c) { c.q.dtype = DLDataType{kDLFloat, 64, 1}; }, {"q:", "expected dtype float32", "got float64"}},
        {"k float16", [](Call &c) { c.k.dtype = DLDataType{kDLFloat, 16, 1}; }, {"k:", "dtype float16 differs from q's float32", "one dtype"}},
        {"v int32", [](Call &c) { c.v.dtype = DLDataType{kDLInt, 32, 1}; }, {"v:", "dtype int32 differs from q's float32"}},
        {"out bfloat16", [](Call &c) { c.out.dtype = DLDataType{kDLBfloat, 16, 1}; }, {"out:", "dtype bfloat16 differs from q's float32"}},
        {"q vector lanes", [](Call &c) { c.q.dtype = DLDataType{kDLFloat, 32, 4}; }, {"q:", "got float32x4"}},
        {"mask float", [](Call &c) { c.mask.dtype = float32_type(); }, {"mask:", "bool", "got float32"}},
        {"null q data", [](Call &c) { c.q.data = nullptr; }, {"q:", "data is null"}},
        {"null out data", [](Call &c) { c.out.data = nullptr; }, {"out:", "data is null"}},
        {"null mask data", [](Call &c) { c.mask.data = nullptr; }, {"mask:", "data is null"}},
        {"null shape pointer", [](Call &c) { c.k.shape = nullptr; }, {"k:", "expected"}},
        {"k on cuda", [](Call &c) { c.k.device = {kDLCUDA, 0}; }, {"k:", "cuda:0", "one device"}},
        {"k on another gpu", [](Call &c) { c.q.device = c.v.device = c.out.device = c.mask.device = c.lse.device = {kDLCUDA, 0}; c.k.device = {kDLCUDA, 1}; }, {"k:", "cuda:1", "one device"}},
        {"all on opencl", [](Call &c) { c.q.device = c.k.device = c.v.device = c.out.device = c.mask.device = c.lse.device = {kDLOpenCL, 1}; }, {"q:", "opencl:1", "not supported"}},
        {"all on vulkan", [](Call &c) { c.q.device = c.k.device = c.v.device = c.out.device = c.mask.device = c.lse.device = {kDLVulkan, 0}; }, {"q:", "device type 7", "host memory"}},
        {"cuda tensors, cpu asked", [](Call &c) { c.q.device = c.k.device = c.v.device = c.out.device = c.mask.device = c.lse.device = {kDLCUDA, 0}; c.options.device = Device::CPU; }, {"options.device", "cpu", "cuda:0"}},
        {"key_splits negative", [](Call &c) { c.options.key_splits = -1; }, {"options.key_splits", "-1"}},
        {"key_splits too many", [](Call &c) { c.options.key_splits = 65; }, {"options.key_splits", "64", "65"}},
        {"query_splits negative", [](Call &c) { c.options.query_splits = -2; }, {"options.query_splits", "-2"}},
        {"query_splits too many", [](Call &c) { c.options.query_splits = 65537; },
         {"options.query_splits", "65536", "65537"}},
        {"query_offset negative", [](Call &c) { c.options.query_offset = -3; }, {"options.query_offset", ">= 0", "-3"}},
        {"key_offset negative", [](Call &c) { c.options.key_offset = -1; }, {"options.key_offset", ">= 0", "-1"}},
        {"query_offset past 32 bits", [](Call &c) { c.options.query_offset = 2147483647; }, {"options.query_offset", "2147483647", "32-bit"}},
        {"key_offset past 32 bits", [](Call &c) { c.options.key_offset = int64_t(1) << 40; }, {"options.key_offset", "32-bit"}},
        {"unknown device option", [](Call &c) { c.options.device = Device(9); }, {"options.device", "unknown device 9"}},
        {"cpu kernel, cuda asked", [](Call &c) { c.options.device = Device::CUDA; c.options.kernel = "attend_cpu_generic"; }, {"options.kernel", "runs on cpu", "runs on cuda"}},
        {"mixed host devices", [](Call &c) { c.k.device = {kDLCUDAHost, 0}; }, {"k:", "all tensors must be on one device"}},
        {"out overlaps itself", [](Call &c) { c.out.strides[3] = 0; }, {"out:", "overlap", "distinct memory"}},
        {"out aliases q", [](Call &c) { c.out.data = c.q.data; }, {"out:", "overlaps the memory of q"}},
        {"out overlaps v", [](Call &c) { c.out.data = c.v.data; c.out.byte_offset = 4; }, {"out:", "overlaps the memory of"}},
        {"dropout above 1", [](Call &c) { c.options.dropout = 1.5f; }, {"options.dropout", "[0, 1]", "1.5"}},
        {"dropout negative", [](Call &c) { c.options.dropout = -0.1f; }, {"options.dropout", "[0, 1]"}},
        {"dropout NaN", [](Call &c) { c.options.dropout = NAN; }, {"options.dropout", "nan"}},
        {"scale infinite", [](Call &c) { c.options.scale = INFINITY; }, {"options.scale", "finite", "inf"}},
        {"scale NaN", [](Call &c) { c.options.scale = NAN; }, {"options.scale", "finite"}},
        {"unknown kernel", [](Call &c) { c.options.kernel = "attend_cpu_d7"; }, {"options.kernel", "attend_cpu_d7"}},
        {"kernel of another head dim", [](Call &c) { c.options.kernel = "attend_cpu_d64"; }, {"options.kernel", "d == dv == 64", "d=8"}},
        {"extent past 32 bits", [](Call &c) { reshaped[0] = 2; reshaped[1] = 4; reshaped[2] = 5; reshaped[3] = int64_t(1) << 31; c.q.shape = reshaped; }, {"q:", "32-bit indexing"}},
        {"lse has 4 dims", [](Call &c) { c.lse.ndim = 4; c.lse.shape = c.out.shape; c.lse.strides = c.out.strides; }, {"lse:", "3 dims [b, h, n]", "got 4 dims"}},
        {"lse shape wrong", [](Call &c) { c.lse.shape[2] = 6; }, {"lse:", "expected shape [2, 4, 5]", "got [2, 4, 6]"}},
        {"lse float64", [](Call &c) { c.lse.dtype = DLDataType{kDLFloat, 64, 1}; }, {"lse:", "float32", "got float64"}},
        {"null lse data", [](Call &c) { c.lse.data = nullptr; }, {"lse:", "data is null"}},
        {"lse on cuda", [](Call &c) { c.lse.device = {kDLCUDA, 0}; }, {"lse:", "cuda:0", "one device"}},
        {"lse overlaps itself", [](Call &c) { c.lse.strides[1] = 0; }, {"lse:", "overlap", "distinct memory"}},
        {"lse aliases out", [](Call &c) { c.lse.data = c.out.data; }, {"lse:", "overlaps the memory of out"}},
        {"lse aliases k", [](Call &c) { c.lse.data = c.k.data; }, {"lse:", "overlaps the memory of k"}},
        {"span past any memory", [](Call &c) { c.k.strides[0] = int64_t(1) << 50; }, {"k:", "2^47 bytes"}},
    };
}

bool contains(const std::string &text, const char *part) {
    auto lower = [](std::string s) {
        for (auto &ch : s) ch = char(std::tolower(static_cast<unsigned char>(ch)));
        return s;
    };
    return lower(text).find(lower(part)) != std::string::npos;
}

}  // namespace

TEST_CASE("every bad input: invalid_argument naming the argument, out untouched, next call fine") {
    auto cases = bad_cases();
    CHECK(cases.size() >= 30);
    for (const auto &bad : cases) {
        INFO("case: " << std::string(bad.what));
        Call call;
        bad.bend(call);
        const std::string message = rejection_of([&] { call.run(); });
        INFO("message: " << message);
        REQUIRE(!message.empty());
        for (const char *part : bad.message_parts) CHECK(contains(message, part));
        CHECK(call.out_untouched());

        Call good;
        good.run();
        auto c = compare(good.p.out.dense(), good.p.expected());
        CHECK(c.not_finite == 0);
        CHECK(c.max_error <= fp32_tolerance(good.p));
    }
}

TEST_CASE("an unsupported cpu_isa is an error, a supported one runs") {
    for (CpuIsa isa : {CpuIsa::AVX512, CpuIsa::AVX2, CpuIsa::Baseline}) {
        auto supported = supported_cpu_isas();
        Call call;
        call.options.cpu_isa = isa;
        if (std::find(supported.begin(), supported.end(), isa) == supported.end()) {
            CHECK_THROWS_WITH_AS(call.run(), doctest::Contains("options.cpu_isa"), std::invalid_argument);
            CHECK(call.out_untouched());
        } else {
            CHECK_NOTHROW(call.run());
        }
    }
}

TEST_CASE("Halide buffers: the same call in Halide's order") {
    ProblemSpec spec;
    spec.b = 2;
    spec.h = 2;
    spec.kv_heads = 2;
    spec.n = 40;
    spec.m = 50;
    spec.d = spec.dv = 64;
    spec.mask = true;
    auto p = make_problem(spec);
    auto expected = p.expected();
    using Halide::Runtime::Buffer;
    Buffer<float> q(p.q.storage.data(), {int(spec.d), int(spec.n), int(spec.h), int(spec.b)});
    Buffer<float> k(p.k.storage.data(), {int(spec.d), int(spec.m), int(spec.h), int(spec.b)});
    Buffer<float> v(p.v.storage.data(), {int(spec.dv), int(spec.m), int(spec.h), int(spec.b)});
    Buffer<bool> mask(reinterpret_cast<bool *>(p.mask->storage.data()), {int(spec.m), int(spec.b)});
    Buffer<float> out(p.out.storage.data(), {int(spec.dv), int(spec.n), int(spec.h), int(spec.b)});
    forward(q, k, v, mask, out);
    auto c = compare(p.out.dense(), expected);
    CHECK(c.not_finite == 0);
    CHECK(c.max_error <= fp32_tolerance(p));

    SUBCASE("no mask: an undefined buffer") {
        p.mask.reset();
        auto unmasked = p.expected();
        forward(q, k, v, Buffer<const void>(), out);
        auto c2 = compare(p.out.dense(), unmasked);
        CHECK(c2.max_error <= fp32_tolerance(p));
    }
    SUBCASE("bad Halide buffers are rejected by name") {
        Buffer<double> q64(spec.d, spec.n, spec.h, spec.b);
        CHECK_THROWS_WITH_AS(forward(q64, k, v, mask, out), doctest::Contains("q: expected dtype float32, float16 or bfloat16, got float64"),
                             std::invalid_argument);
        Buffer<float> wrong_out(spec.dv, spec.n + 1, spec.h, spec.b);
        CHECK_THROWS_WITH_AS(forward(q, k, v, mask, wrong_out), doctest::Contains("out: expected shape"),
                             std::invalid_argument);
    }
}

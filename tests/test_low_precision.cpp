// float16 and bfloat16 kernels: against the double reference computed from the
// same rounded inputs, and against the float32 kernel, on every CPU kernel and
// instruction set (tests/test_gpu.cpp runs the GPU ones).
#include "attend/half.hpp"
#include "low_precision.hpp"

using namespace attend;
using namespace attend::test;

namespace {

void check_cpu_kernels(DType dtype, const ProblemSpec &spec, Options options = {}) {
    auto p = make_problem(spec, options);
    round_inputs(p, dtype);
    auto expected = p.expected();
    p.run();  // the float32 kernel on the same (rounded) inputs
    const auto fp32_out = p.out.dense();
    int checked = 0;
    for (const auto &kernel : available_kernels()) {
        if (kernel.operation != Operation::Forward || kernel.device != Device::CPU || kernel.dtype != dtype) continue;
        if (kernel.head_dim != 0 && !(kernel.head_dim == spec.d && kernel.head_dim == spec.dv)) continue;
        for (CpuIsa isa : supported_cpu_isas()) {
            INFO(kernel.name << "/" << std::string(to_string(isa)) << " n=" << spec.n << " m=" << spec.m << " d=" << spec.d
                             << " mask=" << spec.mask << " causal=" << options.causal);
            LowPrecisionRun run(p, dtype);
            run.options.kernel = kernel.name;
            run.options.cpu_isa = isa;
            run.run();
            check_low_precision(p, run, expected, fp32_out);
            checked++;
        }
    }
    CHECK(checked >= 2);  // the specialised or generic kernel, on at least the baseline and auto
}

}  // namespace

TEST_CASE("half.hpp rounds to nearest even and converts back exactly") {
    CHECK(float_to_float16_bits(1.0f) == 0x3c00);
    CHECK(float_to_float16_bits(-2.0f) == 0xc000);
    CHECK(float_to_float16_bits(65504.0f) == 0x7bff);
    CHECK(float_to_float16_bits(65520.0f) == 0x7c00);                 // rounds up to inf
    CHECK(float_to_float16_bits(1.0f + 1.0f / 2048) == 0x3c00);       // a tie: to even (down)
    CHECK(float_to_float16_bits(1.0f + 3.0f / 2048) == 0x3c02);       // a tie: to even (up)
    CHECK(float_to_float16_bits(std::ldexp(1.0f, -24)) == 0x0001);    // smallest subnormal
    CHECK(float_to_float16_bits(std::ldexp(1.0f, -26)) == 0x0000);    // below half of it: 0
    CHECK(std::isnan(float16_bits_to_float(float_to_float16_bits(NAN))));
    CHECK(float_to_bfloat16_bits(1.0f) == 0x3f80);
    CHECK(float_to_bfloat16_bits(1.0f + 1.0f / 256) == 0x3f80);       // a tie: to even (down)
    CHECK(float_to_bfloat16_bits(1.0f + 3.0f / 256) == 0x3f82);       // a tie: to even (up)
    CHECK(std::isnan(bfloat16_bits_to_float(float_to_bfloat16_bits(NAN))));
    // Every half converts to a float and back to itself (NaNs aside).
    for (uint32_t bits = 0; bits < 0x10000; bits++) {
        float value = float16_bits_to_float(uint16_t(bits));
        if (!std::isnan(value)) REQUIRE(float_to_float16_bits(value) == bits);
        float wide = bfloat16_bits_to_float(uint16_t(bits));
        if (!std::isnan(wide)) REQUIRE(float_to_bfloat16_bits(wide) == bits);
    }
}

TEST_CASE("float16 and bfloat16 CPU kernels match the reference and the float32 kernel") {
    if (built_16bit_dtypes().empty()) {
        MESSAGE(std::string("this build has no 16-bit kernels (ATTEND_DTYPES)"));
        return;
    }
    for (DType dtype : built_16bit_dtypes()) {
        INFO(std::string(to_string(dtype)));
        for (int64_t d : {64, 80, 24}) {  // 24: the generic kernel
            check_cpu_kernels(dtype, spec_of(2, 2, 65, 130, d));
        }
        ProblemSpec masked = spec_of(1, 4, 70, 70, 32);
        masked.mask = true;
        masked.kv_heads = 2;
        Options causal;
        causal.causal = true;
        check_cpu_kernels(dtype, masked, causal);
        ProblemSpec other_dv = spec_of(2, 1, 33, 50, 32);
        other_dv.dv = 16;
        check_cpu_kernels(dtype, other_dv);
    }
}

TEST_CASE("low-precision dtypes: one dtype for q, k, v and out, named in the error") {
    auto p = make_problem(spec_of(1, 1, 4, 4, 8));
    LowPrecisionRun half(p, DType::Float16);
    DLTensor q = half.q.dl(), k = p.k.dl(), v = half.v.dl(), out = half.out.dl();
    CHECK_THROWS_WITH_AS(forward(q, k, v, nullptr, out), doctest::Contains("k: dtype float32 differs from q's float16"),
                         std::invalid_argument);
    DLTensor out32 = p.out.dl();
    k = half.k.dl();
    CHECK_THROWS_WITH_AS(forward(q, k, v, nullptr, out32), doctest::Contains("out: dtype float32 differs"),
                         std::invalid_argument);
    Options options;
    options.kernel = "attend_cpu_generic";  // a float32 kernel
    CHECK_THROWS_WITH_AS(forward(q, k, v, nullptr, out, options), doctest::Contains("takes float32 but the tensors are float16"),
                         std::invalid_argument);
    for (DType dtype : built_16bit_dtypes()) CHECK(select_kernel(Device::CPU, dtype, 64, 64, {})->dtype == dtype);
}

TEST_CASE("float16 through Halide buffers (Halide's order, its float16 type)") {
    const auto dtypes = built_dtypes();
    if (std::find(dtypes.begin(), dtypes.end(), DType::Float16) == dtypes.end()) {
        MESSAGE(std::string("this build has no float16 kernels (ATTEND_DTYPES)"));
        return;
    }
    auto p = make_problem(spec_of(1, 2, 20, 30, 64));
    round_inputs(p, DType::Float16);
    auto expected = p.expected();
    p.run();
    const auto fp32_out = p.out.dense();
    LowPrecisionRun run(p, DType::Float16);
    const halide_type_t f16(halide_type_float, 16);
    auto buffer = [&](Tensor<uint16_t> &t) {
        return Halide::Runtime::Buffer<void>(f16, t.storage.data(), 64, int(t.shape[2]), 2, 1);  // (d, n|m, h, b)
    };
    Halide::Runtime::Buffer<void> q = buffer(run.q), k = buffer(run.k), v = buffer(run.v), out = buffer(run.out);
    Halide::Runtime::Buffer<float> lse(run.lse.storage.data(), 20, 2, 1);
    forward(q, k, v, Halide::Runtime::Buffer<const void>(), out, lse);
    check_low_precision(p, run, expected, fp32_out);
}

// attend::add_kernel: a kernel generated outside the build (how `attend tune`
// runs its candidates) goes through the same validation and marshalling.
#include "attend/kernel_abi.hpp"
#include "backward_support.hpp"
#include "support.hpp"

using namespace attend;
using namespace attend::test;

namespace {

// Three kernels of this build (baseline target), linked into this program as a
// library generated outside the build would be: their own code, calling
// libattend's Halide runtime (tests/CMakeLists.txt links their archives, not
// their runtime). libattend itself does not export its kernels.
extern "C" int ATTEND_TEST_ABI_SPECIALISED ATTEND_FORWARD_KERNEL_PARAMS;
extern "C" int ATTEND_TEST_ABI_GENERIC ATTEND_FORWARD_KERNEL_PARAMS;
extern "C" int ATTEND_TEST_ABI_BACKWARD ATTEND_BACKWARD_KERNEL_PARAMS;
const int kDim = ATTEND_TEST_ABI_DIM;
ForwardKernel specialised() { return ATTEND_TEST_ABI_SPECIALISED; }
const std::string kAdded = "added_d" + std::to_string(kDim);

// A float32 kernel's description for add_kernel.
KernelInfo info(std::string name, int head_dim, Device device = Device::CPU, Operation operation = Operation::Forward) {
    KernelInfo i;
    i.name = std::move(name);
    i.head_dim = head_dim;
    i.device = device;
    i.operation = operation;
    return i;
}

// A kernel that returns success without writing anything.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-parameter"
int writes_nothing ATTEND_FORWARD_KERNEL_PARAMS { return 0; }
#pragma GCC diagnostic pop

void register_once() {
    static bool done = [] {
        add_kernel(info(kAdded, kDim, Device::CPU), specialised());
        add_kernel(info("added_generic", 0, Device::CPU),
                   ATTEND_TEST_ABI_GENERIC);
        add_kernel(info("writes_nothing", kDim, Device::CPU), writes_nothing);
        add_kernel(info("added_backward", kDim, Device::CPU, Operation::Backward), ATTEND_TEST_ABI_BACKWARD);
        return true;
    }();
    (void)done;
}

}  // namespace

TEST_CASE("an added kernel runs when Options::kernel names it, and matches the reference") {
    register_once();
    for (const std::string &name : {kAdded, std::string("added_generic")}) {
        ProblemSpec spec = spec_of(2, 4, 70, 131, kDim);
        spec.kv_heads = 2;
        spec.mask = true;
        Options options;
        options.causal = true;
        auto p = make_problem(spec, options);
        auto expected = p.expected();
        p.options.kernel = name;
        INFO(name);
        check_against_reference(p, expected);
    }
}

TEST_CASE("an added backward kernel runs when Options::kernel names it in backward(), and matches the oracle") {
    register_once();
    ProblemSpec spec = spec_of(2, 4, 70, 131, kDim);
    spec.kv_heads = 2;
    spec.mask = true;
    Options options;
    options.causal = true;
    options.kernel = "added_backward";
    Backward b(spec, options);
    b.run(options);
    check_float32(b);
    // Each operation's calls take only kernels of that operation.
    auto p = make_problem(spec_of(1, 1, 5, 5, kDim));
    p.options.kernel = "added_backward";
    CHECK_THROWS_WITH_AS(p.run(), doctest::Contains("computes another operation"), std::invalid_argument);
    Options forward_kernel;
    forward_kernel.kernel = kAdded;
    Backward wrong(spec_of(1, 1, 5, 5, kDim), forward_kernel);
    CHECK_THROWS_WITH_AS(wrong.run(forward_kernel), doctest::Contains("computes another operation"),
                         std::invalid_argument);
}

TEST_CASE("add_kernel: select_kernel never picks an added kernel, and the listing stays the build's") {
    register_once();
    auto chosen = select_kernel(Device::CPU, DType::Float32, kDim, kDim, {});
    REQUIRE(chosen);
    CHECK(chosen->name == "attend_cpu_d" + std::to_string(kDim));
    for (const auto &k : available_kernels()) CHECK(k.name.rfind("added_", 0) != 0);
}

TEST_CASE("add_kernel: the runtime really calls the added function") {
    register_once();
    auto p = make_problem(spec_of(1, 1, 5, 5, kDim));
    p.options.kernel = "writes_nothing";
    p.run();
    for (float x : p.out.dense()) CHECK(std::isnan(x));  // out is made of NaN sentinels
}

TEST_CASE("add_kernel and Options::kernel reject bad registrations and calls, naming the argument") {
    register_once();
    auto rejects = [](const KernelInfo &kernel_info, ForwardKernel f, const std::string &what) {
        INFO(what);
        try {
            add_kernel(kernel_info, f);
            FAIL("accepted");
        } catch (const std::invalid_argument &e) {
            CHECK(std::string(e.what()).find(what) != std::string::npos);
        }
    };
    const ForwardKernel f = specialised();
    const std::string built = "attend_cpu_d" + std::to_string(kDim);
    rejects(info("", kDim, Device::CPU), f, "info.name: must not be empty");
    rejects(info(kAdded, kDim, Device::CPU), f, "'" + kAdded + "' exists");
    rejects(info(built, kDim, Device::CPU), f, "'" + built + "' exists");
    rejects(info("on_gpu", kDim, Device::CUDA), f, "info.device: only CPU");
    rejects(info("negative", -1, Device::CPU), f, "info.head_dim");
    rejects(info("unknown_op", kDim, Device::CPU, Operation(7)), f, "info.operation");
    rejects(info("null", kDim, Device::CPU), nullptr, "function: must not be null");
    rejects(info("backward_as_forward", kDim, Device::CPU, Operation::Backward), f,
            "info.operation: this overload adds forward kernels");
    try {
        add_kernel(info("forward_as_backward", kDim, Device::CPU), ATTEND_TEST_ABI_BACKWARD);
        FAIL("accepted");
    } catch (const std::invalid_argument &e) {
        CHECK(std::string(e.what()).find("info.operation: this overload adds backward kernels") != std::string::npos);
    }
    try {
        add_kernel(info("null_backward", kDim, Device::CPU, Operation::Backward), BackwardKernel(nullptr));
        FAIL("accepted");
    } catch (const std::invalid_argument &e) {
        CHECK(std::string(e.what()).find("function: must not be null") != std::string::npos);
    }

    auto p = make_problem(spec_of(1, 1, 5, 5, kDim * 2));
    p.options.kernel = kAdded;
    CHECK_THROWS_WITH_AS(p.run(), doctest::Contains(("needs d == dv == " + std::to_string(kDim)).c_str()), std::invalid_argument);
    auto q = make_problem(spec_of(1, 1, 5, 5, kDim));
    q.options.kernel = kAdded;
    q.options.cpu_isa = CpuIsa::Baseline;
    CHECK_THROWS_WITH_AS(q.run(), doctest::Contains("added at run time with one target"), std::invalid_argument);
}

namespace {
// What a kernel received, by the names of the generated signature
// (ATTEND_FORWARD_KERNEL_PARAMS), written into the argument struct by field name.
ForwardKernelArgs received;
const void *received_context = nullptr;
int records_its_arguments ATTEND_FORWARD_KERNEL_PARAMS {
    received_context = user_context;
    received.q = q, received.k = k, received.v = v, received.mask = mask;
    received.scale = scale, received.causal = causal, received.has_mask = has_mask;
    received.drop_threshold = drop_threshold, received.keep_scale = keep_scale;
    received.seed_lo = seed_lo, received.seed_hi = seed_hi;
    received.causal_offset = causal_offset, received.all_keys_rows = all_keys_rows, received.key_splits = key_splits;
    received.query_splits = query_splits;
    received.query_offset = query_offset, received.key_offset = key_offset;
    received.batch_offset = batch_offset, received.head_offset = head_offset;
    received.out = out, received.lse = lse;
    return 0;
}
halide_buffer_t *fake_buffer(uintptr_t id) { return reinterpret_cast<halide_buffer_t *>(id); }
}  // namespace

TEST_CASE("call_kernel passes each field of ForwardKernelArgs as the parameter of the same name") {
    ForwardKernelArgs sent;  // a distinct value in every field
    sent.q = fake_buffer(16), sent.k = fake_buffer(32), sent.v = fake_buffer(48), sent.mask = fake_buffer(64);
    sent.scale = 0.5f, sent.causal = true, sent.has_mask = false, sent.drop_threshold = 7, sent.keep_scale = 1.25f;
    sent.seed_lo = 11, sent.seed_hi = 13, sent.causal_offset = 17, sent.all_keys_rows = 19, sent.key_splits = 23;
    sent.query_splits = 43;
    sent.query_offset = 29, sent.key_offset = 31, sent.batch_offset = 37, sent.head_offset = 41;
    sent.out = fake_buffer(80), sent.lse = fake_buffer(96);
    const int context = 0;
    CHECK(call_kernel(records_its_arguments, &context, sent) == 0);
    CHECK(received_context == &context);
    CHECK(received.q == sent.q);
    CHECK(received.k == sent.k);
    CHECK(received.v == sent.v);
    CHECK(received.mask == sent.mask);
    CHECK(received.scale == sent.scale);
    CHECK(received.causal == sent.causal);
    CHECK(received.has_mask == sent.has_mask);
    CHECK(received.drop_threshold == sent.drop_threshold);
    CHECK(received.keep_scale == sent.keep_scale);
    CHECK(received.seed_lo == sent.seed_lo);
    CHECK(received.seed_hi == sent.seed_hi);
    CHECK(received.causal_offset == sent.causal_offset);
    CHECK(received.query_offset == sent.query_offset);
    CHECK(received.key_offset == sent.key_offset);
    CHECK(received.batch_offset == sent.batch_offset);
    CHECK(received.head_offset == sent.head_offset);
    CHECK(received.all_keys_rows == sent.all_keys_rows);
    CHECK(received.key_splits == sent.key_splits);
    CHECK(received.query_splits == sent.query_splits);
    CHECK(received.out == sent.out);
    CHECK(received.lse == sent.lse);
}

namespace {
// The same for the backward (ATTEND_BACKWARD_KERNEL_PARAMS).
BackwardKernelArgs received_backward;
int records_its_backward_arguments ATTEND_BACKWARD_KERNEL_PARAMS {
    (void)user_context;
    BackwardKernelArgs &r = received_backward;
    r.q = q, r.k = k, r.v = v, r.mask = mask, r.out = out, r.lse = lse, r.dout = dout;
    r.scale = scale, r.causal = causal, r.has_mask = has_mask;
    r.drop_threshold = drop_threshold, r.keep_scale = keep_scale, r.seed_lo = seed_lo, r.seed_hi = seed_hi;
    r.causal_offset = causal_offset, r.query_offset = query_offset, r.key_offset = key_offset;
    r.batch_offset = batch_offset, r.head_offset = head_offset, r.all_keys_rows = all_keys_rows;
    r.key_splits = key_splits;
    r.dq = dq, r.dk = dk, r.dv = dv;
    return 0;
}
}  // namespace

TEST_CASE("call_kernel passes each field of BackwardKernelArgs as the parameter of the same name") {
    BackwardKernelArgs sent;  // a distinct value in every field
    sent.q = fake_buffer(16), sent.k = fake_buffer(32), sent.v = fake_buffer(48), sent.mask = fake_buffer(64);
    sent.out = fake_buffer(80), sent.lse = fake_buffer(96), sent.dout = fake_buffer(112);
    sent.scale = 0.5f, sent.causal = true, sent.has_mask = false, sent.drop_threshold = 7, sent.keep_scale = 1.25f;
    sent.seed_lo = 11, sent.seed_hi = 13, sent.causal_offset = 17, sent.query_offset = 29, sent.key_offset = 31;
    sent.batch_offset = 37, sent.head_offset = 41, sent.all_keys_rows = 19, sent.key_splits = 23;
    sent.dq = fake_buffer(128), sent.dk = fake_buffer(144), sent.dv = fake_buffer(160);
    CHECK(call_kernel(records_its_backward_arguments, nullptr, sent) == 0);
    const BackwardKernelArgs &r = received_backward;
    CHECK(r.q == sent.q);
    CHECK(r.k == sent.k);
    CHECK(r.v == sent.v);
    CHECK(r.mask == sent.mask);
    CHECK(r.out == sent.out);
    CHECK(r.lse == sent.lse);
    CHECK(r.dout == sent.dout);
    CHECK(r.scale == sent.scale);
    CHECK(r.causal == sent.causal);
    CHECK(r.has_mask == sent.has_mask);
    CHECK(r.drop_threshold == sent.drop_threshold);
    CHECK(r.keep_scale == sent.keep_scale);
    CHECK(r.seed_lo == sent.seed_lo);
    CHECK(r.seed_hi == sent.seed_hi);
    CHECK(r.causal_offset == sent.causal_offset);
    CHECK(r.query_offset == sent.query_offset);
    CHECK(r.key_offset == sent.key_offset);
    CHECK(r.batch_offset == sent.batch_offset);
    CHECK(r.head_offset == sent.head_offset);
    CHECK(r.all_keys_rows == sent.all_keys_rows);
    CHECK(r.key_splits == sent.key_splits);
    CHECK(r.dq == sent.dq);
    CHECK(r.dk == sent.dk);
    CHECK(r.dv == sent.dv);
}

TEST_CASE("select_kernel(KernelRequest): the kernel, the CPU target and padding forward() would use") {
    const int d = int(built_head_dims().front());
    KernelRequest request;
    request.head_dim = request.value_dim = d;
    auto choice = select_kernel(request);
    REQUIRE(choice);
    CHECK(choice->kernel.name == "attend_cpu_d" + std::to_string(d));
    CHECK(choice->kernel.operation == Operation::Forward);
    CHECK(choice->cpu_isa == supported_cpu_isas().at(1));  // the best this CPU runs
    CHECK_FALSE(choice->padded);
    REQUIRE_FALSE(choice->kernel.cpu_isas.empty());
    CHECK(choice->kernel.cpu_isas.back() == CpuIsa::Baseline);

    request.cpu_isa = CpuIsa::Baseline;
    CHECK(select_kernel(request)->cpu_isa == CpuIsa::Baseline);
    // An instruction set this CPU lacks, or no such value: refused, as forward() refuses it.
    std::string why;
    for (CpuIsa isa : {CpuIsa::AVX512, CpuIsa::AVX2, CpuIsa(9)}) {
        const auto isas = supported_cpu_isas();
        if (std::find(isas.begin(), isas.end(), isa) != isas.end()) continue;
        request.cpu_isa = isa;
        CHECK_FALSE(select_kernel(request, &why));
        CHECK(why.find("options.cpu_isa") != std::string::npos);
    }
    // A forced kernel of another head dim: refused, naming the option.
    request.cpu_isa = CpuIsa::Auto;
    request.kernel = "attend_cpu_generic";
    CHECK(select_kernel(request)->kernel.head_dim == 0);
    request.head_dim = request.value_dim = 1000;
    request.kernel = "attend_cpu_d" + std::to_string(d);
    CHECK_FALSE(select_kernel(request, &why));
    CHECK(why.find("options.kernel") != std::string::npos);
}

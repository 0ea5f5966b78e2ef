// attend::backward against the oracle's backward (reference::backward): every
// backward kernel of the build and every CPU target, with masks, rows with
// every key masked, causal in both alignments, dropout, grouped- and
// multi-query heads, global positions, strided tensors and 16-bit dtypes; the
// gradients bitwise the same for any thread count; bad calls rejected with
// nothing written.
#include <cstring>
#include <functional>

#include <HalideRuntime.h>

#include "backward_support.hpp"

using namespace attend;
using namespace attend::test;

TEST_CASE("backward: every float32 kernel and CPU target equals the oracle's gradients (masks, fully masked rows, "
          "causal, dropout, GQA, MQA, global positions)") {
    for (const KernelInfo &kernel : available_kernels()) {
        if (kernel.operation != Operation::Backward || kernel.dtype != DType::Float32 || kernel.device != Device::CPU) {
            continue;
        }
        const int64_t d = kernel.head_dim == 0 ? 24 : kernel.head_dim;
        for (CpuIsa isa : kernel.cpu_isas) {
            auto isas = supported_cpu_isas();
            if (std::find(isas.begin(), isas.end(), isa) == isas.end()) continue;
            for (const BackwardCase &c : backward_cases(d)) {
                INFO(kernel.name << " " << std::string(to_string(isa)) << ": " << c.name);
                Options options = c.options;
                options.kernel = kernel.name;
                options.cpu_isa = isa;
                Backward b(c.spec, options);
                b.run(options);
                check_float32(b);
            }
        }
    }
}

TEST_CASE("backward: the generic kernel takes d != dv") {
    ProblemSpec s = spec_of(1, 2, 33, 45, 20);
    s.dv = 12;
    s.mask = true;
    Options o;
    o.causal = true;
    Backward b(s, o);
    b.run(o);
    check_float32(b);
}

TEST_CASE("backward: strided inputs and gradients (heads outermost in memory) equal dense ones") {
    ProblemSpec s = spec_of(2, 2, 37, 41, built_head_dims().at(0));
    s.q_order = {1, 0, 2, 3};
    s.kv_order = {1, 2, 0, 3};
    s.mask = true;
    Backward b(s, {}, {1, 0, 2, 3});
    b.run({});
    check_float32(b);
    // Gradients with a non-dense head dim (every other element): staged and copied.
    Backward strided(s, {});
    for (Tensor<float> *t : {&strided.dq, &strided.dk, &strided.dv}) {
        Tensor<float> wide = nan_tensor({t->shape[0], t->shape[1], t->shape[2], t->shape[3] * 2});
        wide.shape = t->shape;
        wide.strides[3] = 2;
        *t = wide;
    }
    strided.run({});
    check_float32(strided);
}

TEST_CASE("backward: the gradients are bitwise the same run after run and with 1, the default and 8 threads") {
    ProblemSpec s = spec_of(2, 4, 150, 170, built_head_dims().at(0));
    s.kv_heads = 2;
    s.mask = true;
    Options o;
    o.causal = true;
    o.training = true;
    o.dropout = 0.2f;
    Backward first(s, o), again(s, o), one_thread(s, o), eight_threads(s, o);
    first.run(o);
    again.run(o);
    halide_set_num_threads(1);
    one_thread.run(o);
    halide_set_num_threads(8);
    eight_threads.run(o);
    halide_set_num_threads(0);  // back to the default (the number of cores)
    for (Backward *other : {&again, &one_thread, &eight_threads}) {
        CHECK(std::memcmp(first.dq.storage.data(), other->dq.storage.data(), first.dq.storage.size() * 4) == 0);
        CHECK(std::memcmp(first.dk.storage.data(), other->dk.storage.data(), first.dk.storage.size() * 4) == 0);
        CHECK(std::memcmp(first.dv.storage.data(), other->dv.storage.data(), first.dv.storage.size() * 4) == 0);
    }
}

TEST_CASE("backward: dropout p = 0, 0.1, 0.5 and 1 (training) equal the oracle") {
    // p = 1 drops every weight: out = 0 and every gradient 0 (keep scale 0, not 1/0).
    ProblemSpec s = spec_of(2, 2, 70, 90, built_head_dims().at(0));
    s.mask = true;
    s.mask_keep = 0.7;
    for (float p : {0.0f, 0.1f, 0.5f, 1.0f}) {
        for (bool causal : {false, true}) {
            INFO("p = " << p << (causal ? ", causal" : ""));
            Options o;
            o.training = true;
            o.dropout = p;
            o.seed = 5;
            o.causal = causal;
            Backward b(s, o);
            b.run(o);
            check_float32(b);
            if (p == 1.0f) {
                for (const Tensor<float> *g : {&b.dq, &b.dk, &b.dv}) {
                    const auto values = g->dense();
                    CHECK(std::all_of(values.begin(), values.end(), [](float x) { return x == 0.0f; }));
                }
            }
        }
    }
}

TEST_CASE("backward: calls whose dk/dv sums pass 32 MiB run in slices at the call's positions") {
    // runtime/pieces.cpp keeps a CPU kernel's float32 sums (dk and dv: 8·b·hk·m·d
    // bytes; dq's shares, small here) under 32 MiB by slicing: here 40 MiB, as slices of whole batches
    // (3 batches of 2 kv heads: 2 + 1) and of kv heads in a batch (5: 4 + 1).
    // Dropout hashes the global batch and head, so a slice seen from index 0
    // would drop other weights.
    const int64_t d = built_head_dims().at(0), budget = int64_t(32) << 20;
    struct Case {
        int64_t b, h, kv_heads;
    };
    for (Case c : {Case{3, 4, 2}, Case{1, 5, 5}}) {
        const int64_t m = budget * 5 / 4 / (8 * d * c.b * c.kv_heads) + 1;
        INFO("b=" << c.b << " h=" << c.h << " kv_heads=" << c.kv_heads << " m=" << m);
        ProblemSpec s = spec_of(c.b, c.h, 6, m, d);
        s.kv_heads = c.kv_heads;
        s.mask = true;
        s.mask_keep = 0.9;
        Options o;
        o.causal = true;
        o.causal_align = CausalAlign::BottomRight;
        o.training = true;
        o.dropout = 0.3f;
        o.seed = 21;
        Backward b(s, o);
        b.run(o);
        check_float32(b);
    }
}

TEST_CASE("backward: float16 and bfloat16 kernels equal the oracle on inputs the dtype holds") {
    for (DType dtype : built_16bit_dtypes()) {
        for (const BackwardCase &c : backward_cases(built_head_dims().at(0))) {
            INFO(std::string(to_string(dtype)) << ": " << c.name);
            Backward b(c.spec, c.options, {}, dtype);
            check_16bit(b, dtype, c.options);
        }
    }
}

namespace {

constexpr float kUnwritten = 12345.0f;

// A small backward call whose DLTensors a case may bend; the gradients hold a
// sentinel, so "nothing written" can be checked.
struct BackwardCall {
    Backward b{[] {
        ProblemSpec s = spec_of(2, 4, 5, 7, 8);
        s.kv_heads = 2;
        s.mask = true;
        return s;
    }(), Options{}};
    DLTensor q, k, v, mask, out, lse, dout, dq, dk, dv;
    Options options;
    bool with_mask = true;
    std::vector<int64_t> bent_shape;

    BackwardCall() {
        for (Tensor<float> *t : {&b.dq, &b.dk, &b.dv}) std::fill(t->storage.begin(), t->storage.end(), kUnwritten);
        q = b.forward.q.dl();
        k = b.forward.k.dl();
        v = b.forward.v.dl();
        mask = b.forward.mask->dl();
        out = b.forward.out.dl();
        lse = b.forward.lse->dl();
        dout = b.dout.dl();
        dq = b.dq.dl();
        dk = b.dk.dl();
        dv = b.dv.dl();
    }
    void run() { backward(q, k, v, with_mask ? &mask : nullptr, out, lse, dout, dq, dk, dv, options); }
    // t's size (or stride) of dim `dim` set to `value`, in bent_shape.
    void bend_shape(DLTensor &t, int dim, int64_t value) {
        bent_shape.assign(t.shape, t.shape + t.ndim);
        bent_shape[size_t(dim)] = value;
        t.shape = bent_shape.data();
    }
    void bend_stride(DLTensor &t, int dim, int64_t value) {
        bent_shape.assign(t.strides, t.strides + t.ndim);
        bent_shape[size_t(dim)] = value;
        t.strides = bent_shape.data();
    }
    bool untouched() const {
        auto sentinel = [](float x) { return x == kUnwritten; };
        for (const Tensor<float> *t : {&b.dq, &b.dk, &b.dv}) {
            if (!std::all_of(t->storage.begin(), t->storage.end(), sentinel)) return false;
        }
        return true;
    }
};

}  // namespace

TEST_CASE("backward: every bad input is an invalid_argument naming the argument, with nothing written") {
    struct Bad {
        const char *what;
        std::function<void(BackwardCall &)> bend;
        std::vector<std::string> message_parts;
    };
    static float lone = 0;
    const std::vector<Bad> cases = {
        {"dout has out's shape but 3 dims", [](BackwardCall &c) { c.dout.ndim = 3; }, {"dout:", "4 dims"}},
        {"dq's n differs from q's", [](BackwardCall &c) { c.bend_shape(c.dq, 2, 4); },
         {"dq: expected q's shape [2, 4, 5, 8], got [2, 4, 4, 8]"}},
        {"dk has q's heads instead of k's", [](BackwardCall &c) { c.bend_shape(c.dk, 1, 4); },
         {"dk: expected k's shape"}},
        {"dv of another dtype", [](BackwardCall &c) { c.dv.dtype = DLDataType{kDLFloat, 16, 1}; },
         {"dv: dtype float16 differs from q's float32"}},
        {"dout of another dtype", [](BackwardCall &c) { c.dout.dtype = DLDataType{kDLBfloat, 16, 1}; },
         {"dout: dtype bfloat16 differs"}},
        {"dk is dv's memory", [](BackwardCall &c) { c.dk.data = c.dv.data; }, {"dk: overlaps the memory of dv"}},
        {"dq aliases dout", [](BackwardCall &c) { c.dq.data = c.dout.data; }, {"dq: overlaps the memory of dout"}},
        {"dk aliases k", [](BackwardCall &c) { c.dk.data = c.k.data; }, {"dk: overlaps the memory of k"}},
        {"dv broadcast over heads (stride 0)", [](BackwardCall &c) { c.bend_stride(c.dv, 1, 0); },
         {"dv: strides make elements overlap"}},
        {"lse missing", [](BackwardCall &c) { c.lse.data = &lone, c.lse.ndim = 2; }, {"lse: expected 3 dims"}},
        {"dq on a device type attend does not run on", [](BackwardCall &c) { c.dq.device = DLDevice{kDLVulkan, 0}; },
         {"dq: tensor is on"}},
        {"dropout out of range",
         [](BackwardCall &c) {
             c.options.training = true;
             c.options.dropout = 1.5f;
         },
         {"options.dropout"}},
        {"dout's last dim differs from out's", [](BackwardCall &c) { c.bend_shape(c.dout, 3, 7); },
         {"dout: expected out's shape [2, 4, 5, 8], got [2, 4, 5, 7]"}},
        {"dk with 3 dims where k has 4",
         [](BackwardCall &c) {
             c.bent_shape = {2, 7, 8};
             c.dk.ndim = 3;
             c.dk.shape = c.bent_shape.data();
             c.dk.strides = nullptr;
         },
         {"dk: expected k's shape [2, 2, 7, 8], got [2, 7, 8]"}},
        {"lse of dtype float16", [](BackwardCall &c) { c.lse.dtype = DLDataType{kDLFloat, 16, 1}; },
         {"lse: expected dtype float32, got float16"}},
        {"dq's data null", [](BackwardCall &c) { c.dq.data = nullptr; }, {"dq: data is null"}},
        {"dv starts inside dq",
         [](BackwardCall &c) { c.dv.data = static_cast<float *>(c.dq.data) + 3; },
         {"dq: overlaps the memory of dk or dv"}},
        {"dq with a negative stride", [](BackwardCall &c) { c.bend_stride(c.dq, 2, -8); },
         {"dq: stride of dim 2 is -8"}},
        {"a forward kernel forced",
         [](BackwardCall &c) { c.options.kernel = "attend_cpu_generic"; },
         {"options.kernel: attend_cpu_generic computes another operation"}},
    };
    for (const Bad &bad : cases) {
        INFO(std::string(bad.what));
        BackwardCall call;
        bad.bend(call);
        const std::string message = rejection_of([&] { call.run(); });
        INFO("message: " << message);
        for (const std::string &part : bad.message_parts) CHECK(message.find(part) != std::string::npos);
        CHECK(call.untouched());
    }
    BackwardCall good;
    good.run();
    CHECK_FALSE(good.untouched());
}

TEST_CASE("backward: select_kernel picks a backward kernel on every device of the build") {
    for (Device device : {Device::CPU, Device::CUDA, Device::OpenCL}) {
        bool any = false;
        for (const KernelInfo &k : available_kernels()) any |= k.device == device;
        if (!any) continue;
        INFO(std::string(to_string(device)));
        KernelRequest request;
        request.operation = Operation::Backward;
        request.device = device;
        request.head_dim = request.value_dim = built_head_dims().at(0);
        std::string why_not;
        auto choice = select_kernel(request, &why_not);
        INFO(why_not);
        REQUIRE(choice);
        CHECK(choice->kernel.operation == Operation::Backward);
        CHECK(choice->kernel.device == device);
        CHECK(choice->kernel.name.find("backward") != std::string::npos);
    }
}

TEST_CASE("backward: no queries give dk = dv = 0") {
    ProblemSpec s = spec_of(1, 2, 0, 9, 8);
    Backward b(s, {});
    b.run({});
    auto zero = [](const std::vector<float> &x) { return std::all_of(x.begin(), x.end(), [](float e) { return e == 0; }); };
    CHECK(b.dk.numel() == 2 * 9 * 8);
    CHECK(zero(b.dk.dense()));
    CHECK(zero(b.dv.dense()));
}

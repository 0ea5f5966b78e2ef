// libFuzzer harness for attend::forward and attend::backward: the bytes choose
// shapes, ranks, strides, byte offsets, dtypes, devices, null pointers, options
// and the data, and the call goes through the DLPack or the Halide-buffer entry
// point. A call may fail only with std::invalid_argument or attend::Error, and a
// rejected call (or a failed one on a GPU) must leave what it writes untouched
// (out and lse; dq, dk and dv); anything else (a crash, a sanitizer report,
// another exception, a changed output) is a finding. Where the
// CUDA kernels are built, CUDA calls run against the fake driver of
// tests/fake_cuda, sometimes with too little device memory.
//
// The tensors' storage always covers what their shapes and strides claim: a
// caller lying about its own memory is outside what attend can check.
#include <fuzzer/FuzzedDataProvider.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "attend/attend.hpp"
#include "attend/dlpack_types.hpp"
#if ATTEND_FUZZ_FAKE_CUDA
#include "../fake_cuda/fake_cuda.h"
#endif

namespace {

constexpr int64_t kMaxElements = 1 << 16;  // per tensor, so each input runs in milliseconds

struct FuzzTensor {
    std::vector<int64_t> shape, strides;
    std::vector<unsigned char> storage;
    DLDataType dtype{kDLFloat, 32, 1};
    DLDevice device{kDLCPU, 0};
    uint64_t byte_offset = 0;
    bool null_data = false;
    std::vector<halide_dimension_t> halide_dims;

    int64_t element_bytes() const { return std::max<int64_t>(1, (dtype.bits * dtype.lanes + 7) / 8); }

    // Storage for the span the shape and strides claim; false if too large or nonsensical.
    bool allocate(FuzzedDataProvider &in) {
        int64_t last = 0;
        for (size_t i = 0; i < shape.size(); i++) {
            if (shape[i] < 0 || shape[i] > kMaxElements) return shape[i] < 0;  // negative: validation's case
            if (shape[i] == 0) continue;
            if (strides[i] < 0) return true;  // rejected before any access
            if (strides[i] > kMaxElements) return false;
            last += (shape[i] - 1) * strides[i];
        }
        if (last >= kMaxElements) return false;
        storage.resize(size_t((last + 1) * element_bytes()) + byte_offset);
        // Mostly finite floats; sometimes raw bytes (NaN, infinities, denormals).
        bool raw = in.ConsumeBool();
        for (size_t at = 0; at < storage.size(); at++) {
            storage[at] = raw ? in.ConsumeIntegral<unsigned char>() : 0;
        }
        if (!raw && dtype.code == kDLFloat && dtype.bits == 32) {
            for (size_t at = byte_offset; at + 4 <= storage.size(); at += 4) {
                float x = float(int(at * 2654435761u % 2001) - 1000) / 500.0f;
                std::memcpy(&storage[at], &x, 4);
            }
        }
        return true;
    }

    DLTensor dl() {
        DLTensor t{};
        t.data = null_data ? nullptr : storage.data();
        t.byte_offset = null_data ? 0 : byte_offset;
        t.device = device;
        t.ndim = int(shape.size());
        t.dtype = dtype;
        t.shape = shape.data();
        t.strides = strides.data();
        return t;
    }

    halide_buffer_t halide() {
        halide_dims.clear();
        for (size_t i = shape.size(); i-- > 0;) {
            halide_dims.push_back(halide_dimension_t(0, int32_t(shape[i]), int32_t(strides[i])));
        }
        halide_buffer_t b{};
        b.host = null_data || storage.empty() ? nullptr : storage.data() + byte_offset;
        b.type = attend::dlpack::to_halide(dtype);
        b.dimensions = int32_t(shape.size());
        b.dim = halide_dims.data();
        return b;
    }
};

// A tensor of the given shape, dense, sometimes bent: another rank, a permuted or
// random stride, a byte offset, another dtype or device, no data.
FuzzTensor make(FuzzedDataProvider &in, std::vector<int64_t> shape, DLDataType dtype) {
    FuzzTensor t;
    t.dtype = dtype;
    if (in.ConsumeIntegralInRange(0, 15) == 0) shape.resize(in.ConsumeIntegralInRange(0, 5), 2);
    if (in.ConsumeIntegralInRange(0, 15) == 0 && !shape.empty()) {
        shape[in.ConsumeIntegralInRange<size_t>(0, shape.size() - 1)] = in.ConsumeIntegralInRange<int64_t>(-2, 9);
    }
    t.shape = shape;
    t.strides.assign(shape.size(), 0);
    int64_t stride = 1;
    std::vector<size_t> order(shape.size());
    for (size_t i = 0; i < order.size(); i++) order[i] = order.size() - 1 - i;  // innermost first
    if (order.size() >= 2 && in.ConsumeIntegralInRange(0, 3) == 0) std::swap(order[0], order[1]);
    for (size_t i : order) {
        t.strides[i] = stride;
        stride *= std::max<int64_t>(shape[i], 1);
    }
    switch (in.ConsumeIntegralInRange(0, 19)) {
    case 0: if (!shape.empty()) t.strides[in.ConsumeIntegralInRange<size_t>(0, shape.size() - 1)] = in.ConsumeIntegralInRange<int64_t>(-3, 300); break;
    case 1: t.byte_offset = in.ConsumeIntegralInRange<uint64_t>(0, 7) * 4; break;
    case 2: t.dtype = DLDataType{in.ConsumeIntegralInRange<uint8_t>(0, 7), in.ConsumeIntegralInRange<uint8_t>(1, 64), in.ConsumeIntegralInRange<uint16_t>(1, 2)}; break;
    case 3: t.device = DLDevice{DLDeviceType(in.ConsumeIntegralInRange(1, 14)), in.ConsumeIntegralInRange(0, 2)}; break;
    case 4: t.null_data = true; break;
    default: break;
    }
    return t;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    FuzzedDataProvider in(data, size);
    const int64_t b = in.ConsumeIntegralInRange(0, 3), h = in.ConsumeIntegralInRange(0, 4);
    const int64_t n = in.ConsumeIntegralInRange(0, 70), m = in.ConsumeIntegralInRange(0, 70);
    const int head_dims[] = {1, 8, 16, 24, 32, 40, 64, 80, 128, 130};
    const int64_t d = head_dims[in.ConsumeIntegralInRange(0, 9)];
    const int64_t dv = in.ConsumeBool() ? d : head_dims[in.ConsumeIntegralInRange(0, 9)];
    const int kv_mode = in.ConsumeIntegralInRange(0, 3);  // per head, grouped, multi-query, arbitrary
    const int64_t hk = kv_mode == 0 ? h : kv_mode == 1 ? std::max<int64_t>(1, h / 2) : in.ConsumeIntegralInRange(0, 5);
    const DLDataType f32{kDLFloat, 32, 1}, boolean = attend::dlpack::kBool;

    std::vector<int64_t> kv_shape = kv_mode == 2 ? std::vector<int64_t>{b, m, d} : std::vector<int64_t>{b, hk, m, d};
    std::vector<int64_t> v_shape = kv_shape;
    v_shape.back() = dv;
    FuzzTensor q = make(in, {b, h, n, d}, f32), k = make(in, kv_shape, f32), v = make(in, v_shape, f32);
    FuzzTensor out = make(in, {b, h, n, dv}, f32);
    const bool with_mask = in.ConsumeBool();
    FuzzTensor mask = make(in, {b, m}, in.ConsumeBool() ? boolean : DLDataType{kDLUInt, 8, 1});

    attend::Options options;
    options.causal = in.ConsumeBool();
    options.causal_align = attend::CausalAlign(in.ConsumeIntegralInRange(0, 2));
    options.training = in.ConsumeBool();
    options.dropout = in.ConsumeBool() ? in.ConsumeFloatingPointInRange(0.0f, 1.0f) : in.ConsumeFloatingPoint<float>();
    if (in.ConsumeBool()) options.scale = in.ConsumeBool() ? 0.125f : in.ConsumeFloatingPoint<float>();
    options.seed = in.ConsumeIntegral<uint64_t>();
    options.device = attend::Device(in.ConsumeIntegralInRange(0, 4));
    options.cpu_isa = attend::CpuIsa(in.ConsumeIntegralInRange(0, 4));
    options.key_splits = in.ConsumeIntegralInRange(-1, 70);
    options.query_splits = in.ConsumeIntegralInRange(-1, 70);
    if (in.ConsumeIntegralInRange(0, 7) == 0) {
        auto kernels = attend::available_kernels();
        options.kernel = in.ConsumeBool() && !kernels.empty()
                             ? kernels[in.ConsumeIntegralInRange<size_t>(0, kernels.size() - 1)].name
                             : in.ConsumeRandomLengthString(12);
    }
    const bool halide_entry = in.ConsumeBool();
    // Decided last, so that inputs saved before lse existed decode as they did.
    const bool with_lse = in.ConsumeBool();
    FuzzTensor lse = make(in, {b, h, n}, f32);
    // Sometimes float16 or bfloat16 for every float32 one of q, k, v and out.
    const int low_precision = in.ConsumeIntegralInRange(0, 5);
    if (low_precision >= 4) {
        const DLDataType half = low_precision == 4 ? DLDataType{kDLFloat, 16, 1} : DLDataType{kDLBfloat, 16, 1};
        for (FuzzTensor *t : {&q, &k, &v, &out}) {
            if (t->dtype.code == f32.code && t->dtype.bits == 32 && t->dtype.lanes == 1) t->dtype = half;
        }
    }

    for (FuzzTensor *t : {&q, &k, &v, &out, &mask, &lse}) {
        if (!t->allocate(in)) return 0;  // larger than this harness allocates
    }
    // The flop count stays small so that one input takes milliseconds.
    if (double(b) * double(h) * double(n) * double(m) * double(d + dv) > 4e7) return 0;
#if ATTEND_FUZZ_FAKE_CUDA
    // Sometimes a device too small for the call. (Never a kernel fault: it would
    // leave the context unusable for every input after it.)
    const uint64_t device_memory = in.ConsumeIntegralInRange(0, 3) == 3 ? in.ConsumeIntegralInRange<uint64_t>(1, 1 << 22)
                                                                        : uint64_t(1) << 30;
    attend_fake_cuda_configure(("memory=" + std::to_string(device_memory)).c_str());
#endif
    // The backward, decided after everything the forward decodes (so inputs saved
    // before it decode as they did): out and lse become its inputs, with dout, and
    // it writes dq, dk and dv.
    const bool backward_call = in.ConsumeBool();
    FuzzTensor grad_out, grad_q, grad_k, grad_v;
    if (backward_call) {
        grad_out = make(in, {b, h, n, dv}, q.dtype);
        grad_q = make(in, {b, h, n, d}, q.dtype);
        grad_k = make(in, kv_shape, k.dtype);
        grad_v = make(in, v_shape, v.dtype);
        for (FuzzTensor *t : {&grad_out, &grad_q, &grad_k, &grad_v}) {
            if (!t->allocate(in)) return 0;
        }
    }
    // Calls that run on a GPU copy their results to host tensors only when all went well.
    bool on_gpu = options.device == attend::Device::CUDA || options.device == attend::Device::OpenCL;
    for (FuzzTensor *t : {&q, &k, &v, &out, &grad_out, &grad_q, &grad_k, &grad_v}) on_gpu = on_gpu || t->device.device_type == kDLCUDA;

    // What the call writes: out and lse (forward) or dq, dk and dv (backward).
    const std::vector<FuzzTensor *> written = backward_call ? std::vector<FuzzTensor *>{&grad_q, &grad_k, &grad_v}
                                                            : std::vector<FuzzTensor *>{&out, &lse};
    std::vector<std::vector<unsigned char>> before;
    for (const FuzzTensor *t : written) before.push_back(t->storage);
    auto unchanged = [&] {
        for (size_t i = 0; i < written.size(); i++) {
            if (written[i]->storage != before[i]) return false;
        }
        return true;
    };
    try {
        if (backward_call && halide_entry) {
            halide_buffer_t hq = q.halide(), hk_ = k.halide(), hv = v.halide(), hout = out.halide(), hmask = mask.halide(),
                            hlse = lse.halide(), hdout = grad_out.halide(), hdq = grad_q.halide(),
                            hdk = grad_k.halide(), hdv = grad_v.halide();
            Halide::Runtime::Buffer<const void> bq(hq), bk(hk_), bv(hv), bout(hout), bdout(hdout), bmask, blse;
            if (with_mask) bmask = Halide::Runtime::Buffer<const void>(hmask);
            if (with_lse) blse = Halide::Runtime::Buffer<const void>(hlse);
            Halide::Runtime::Buffer<void> bdq(hdq), bdk(hdk), bdv(hdv);
            attend::backward(bq, bk, bv, bmask, bout, blse, bdout, bdq, bdk, bdv, options);
        } else if (backward_call) {
            DLTensor tq = q.dl(), tk = k.dl(), tv = v.dl(), tout = out.dl(), tmask = mask.dl(), tlse = lse.dl(),
                     tdout = grad_out.dl(), tdq = grad_q.dl(), tdk = grad_k.dl(), tdv = grad_v.dl();
            attend::backward(tq, tk, tv, with_mask ? &tmask : nullptr, tout, tlse, tdout, tdq, tdk, tdv, options);
        } else if (halide_entry) {
            halide_buffer_t hq = q.halide(), hk_ = k.halide(), hv = v.halide(), hout = out.halide(), hmask = mask.halide(),
                            hlse = lse.halide();
            Halide::Runtime::Buffer<const void> bq(hq), bk(hk_), bv(hv), bmask;
            if (with_mask) bmask = Halide::Runtime::Buffer<const void>(hmask);
            Halide::Runtime::Buffer<void> bout(hout), blse;
            if (with_lse) blse = Halide::Runtime::Buffer<void>(hlse);
            attend::forward(bq, bk, bv, bmask, bout, blse, options);
        } else {
            DLTensor dq = q.dl(), dk = k.dl(), dv_ = v.dl(), dout = out.dl(), dmask = mask.dl(), dlse = lse.dl();
            attend::forward(dq, dk, dv_, with_mask ? &dmask : nullptr, dout, with_lse ? &dlse : nullptr, options);
        }
    } catch (const std::invalid_argument &) {
        if (!unchanged()) {
            std::fprintf(stderr, "a rejected call changed what it writes\n");
            std::abort();
        }
    } catch (const attend::Error &) {
        // A failure while running (e.g. a device that is not there): reported, not a crash.
        if (on_gpu && !unchanged()) {
            std::fprintf(stderr, "a failed GPU call changed what it writes\n");
            std::abort();
        }
    }
    return 0;
}

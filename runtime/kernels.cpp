// The kernels of this build, the one function that chooses among them, and the
// hook that turns Halide's runtime errors into exceptions.
#include <algorithm>
#include <mutex>
#include <vector>

#include <HalideRuntime.h>

// Every generated kernel has this signature (the generator's inputs in order).
#define ATTEND_KERNEL_PARAMS                                                                                    \
    (const void *user_context, halide_buffer_t *q, halide_buffer_t *k, halide_buffer_t *v, halide_buffer_t *mask, \
     float scale, bool causal, bool has_mask, uint32_t drop_threshold, float keep_scale, uint32_t seed_lo,      \
     uint32_t seed_hi, int32_t causal_offset, int32_t all_keys_rows, halide_buffer_t *out)
#include "attend_kernels.inc"  // generated: kernel headers, per-target functions, ATTEND_KERNEL_TABLE
#include "internal.hpp"

namespace attend {
namespace {

using KernelFn = int(*) ATTEND_KERNEL_PARAMS;

struct KernelEntry {
    const char *name;
    Device device;
    int head_dim;       // 0: generic
    KernelFn dispatch;  // Halide's multi-target wrapper: the best target of this CPU
    KernelFn by_isa[4];  // one function per CPU target, indexed by CpuIsa; null where not built
};

// ATTEND_KERNEL(name, device, head dim, ATTEND_ISA(isa, function)...) from the table.
struct IsaFunctions {
    KernelFn by_isa[4] = {};
    IsaFunctions &add(CpuIsa isa, KernelFn function) {
        by_isa[int(isa)] = function;
        return *this;
    }
};
KernelEntry make_entry(const char *name, Device device, int head_dim, KernelFn dispatch, const IsaFunctions &isas) {
    KernelEntry e{name, device, head_dim, dispatch, {}};
    std::copy(std::begin(isas.by_isa), std::end(isas.by_isa), e.by_isa);
    return e;
}
#define ATTEND_ISA(isa, function) .add(CpuIsa::isa, function)
#define ATTEND_KERNEL(function, device, head_dim, ...) \
    make_entry(#function, Device::device, head_dim, function, IsaFunctions() __VA_ARGS__),
const KernelEntry kKernels[] = {ATTEND_KERNEL_TABLE};
#undef ATTEND_KERNEL
#undef ATTEND_ISA

const KernelEntry *find_kernel(const std::string &name) {
    for (const KernelEntry &e : kKernels) {
        if (name == e.name) return &e;
    }
    return nullptr;
}

bool fits(const KernelEntry &e, int64_t head_dim, int64_t value_dim) {
    return e.head_dim == 0 || (e.head_dim == head_dim && e.head_dim == value_dim);
}

KernelInfo info_of(const KernelEntry &e) { return KernelInfo{e.name, e.device, e.head_dim}; }

// The function for a capped instruction set: the best target at or below the cap.
// (Halide's multi-target wrapper picks a target on its first call and keeps it,
// so a cap per call needs the per-target functions.)
KernelFn function_for(const KernelEntry &e, CpuIsa cap) {
    if (cap == CpuIsa::Auto) return e.dispatch;
    for (int isa = int(cap); isa <= int(CpuIsa::Baseline); isa++) {
        if (e.by_isa[isa]) return e.by_isa[isa];
    }
    return nullptr;
}

// ---- Halide runtime hooks ---------------------------------------------------

// Each kernel call passes one of these as Halide's user_context, so an error
// raised on any thread of the call lands here instead of in abort().
struct CallContext {
    std::mutex lock;
    std::string errors;
};

void on_halide_error(void *user_context, const char *message) {
    if (auto *call = static_cast<CallContext *>(user_context)) {
        std::lock_guard<std::mutex> guard(call->lock);
        if (call->errors.size() < 4096) call->errors += message;
    }
}

void install_halide_hooks() {
    static std::once_flag once;
    std::call_once(once, [] {
        halide_set_error_handler(on_halide_error);
    });
}

// ---- Buffers handed to the kernels ------------------------------------------

// A halide_buffer_t over a TensorView, dims reversed (Halide's dim 0 is innermost).
struct KernelBuffer {
    halide_dimension_t dims[4];
    halide_buffer_t buffer{};

    KernelBuffer(const detail::TensorView &t, halide_type_t type) {
        for (int i = 0; i < t.ndim; i++) {
            int from = t.ndim - 1 - i;
            dims[i] = halide_dimension_t(0, int32_t(t.shape[from]), int32_t(t.strides[from]));
        }
        buffer.host = static_cast<uint8_t *>(t.data);
        buffer.type = type;
        buffer.dimensions = t.ndim;
        buffer.dim = dims;
    }
};

// k and v are read in the kernels' hot loops, which need their head dim dense:
// a strided one is copied to dense memory (C order), once per call.
detail::TensorView dense_head_dim(const detail::TensorView &t, std::vector<float> &storage) {
    if (t.strides[3] == 1 || t.shape[3] <= 1) return t;
    detail::TensorView dense = t;
    storage.resize(size_t(t.shape[0] * t.shape[1] * t.shape[2] * t.shape[3]));
    dense.data = storage.data();
    int64_t stride = 1;
    for (int i = 3; i >= 0; i--) {
        dense.strides[i] = stride;
        stride *= t.shape[i];
    }
    const float *src = static_cast<const float *>(t.data);
    size_t at = 0;
    for (int64_t a = 0; a < t.shape[0]; a++)
        for (int64_t b = 0; b < t.shape[1]; b++)
            for (int64_t c = 0; c < t.shape[2]; c++)
                for (int64_t e = 0; e < t.shape[3]; e++)
                    storage[at++] = src[a * t.strides[0] + b * t.strides[1] + c * t.strides[2] + e * t.strides[3]];
    return dense;
}

}  // namespace

std::optional<KernelInfo> select_kernel(Device device, DType dtype, int64_t head_dim, int64_t value_dim,
                                        Features /*features: every kernel has them all*/, std::string *why_not) {
    auto refuse = [&](std::string reason) -> std::optional<KernelInfo> {
        if (why_not) *why_not = std::move(reason);
        return std::nullopt;
    };
    if (dtype != DType::Float32) return refuse("only float32 kernels are built");
    if (head_dim < 1 || value_dim < 0) return refuse("head dims must be positive");
    switch (device) {
    case Device::Auto:
    case Device::CPU: {
        const KernelEntry *generic = nullptr;
        for (const KernelEntry &e : kKernels) {
            if (e.device != Device::CPU) continue;
            if (e.head_dim != 0 && fits(e, head_dim, value_dim)) return info_of(e);  // specialised first
            if (e.head_dim == 0) generic = &e;
        }
        if (generic) return info_of(*generic);
        return refuse("no cpu kernel for d=" + std::to_string(head_dim) + ", dv=" + std::to_string(value_dim) +
                      " in this build (it has no generic kernel)");
    }
    default:
        return refuse(std::string("no kernels for device ") + to_string(device) + " in this build");
    }
}

std::vector<KernelInfo> available_kernels() {
    std::vector<KernelInfo> all;
    for (const KernelEntry &e : kKernels) all.push_back(info_of(e));
    return all;
}

std::vector<CpuIsa> supported_cpu_isas() {
    __builtin_cpu_init();
    std::vector<CpuIsa> isas{CpuIsa::Auto};
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("avx512vl")) {
        isas.push_back(CpuIsa::AVX512);
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
        __builtin_cpu_supports("sse4.1")) {
        isas.push_back(CpuIsa::AVX2);
    }
    isas.push_back(CpuIsa::Baseline);
    return isas;
}

const char *to_string(CpuIsa isa) {
    switch (isa) {
    case CpuIsa::Auto: return "auto";
    case CpuIsa::AVX512: return "avx512";
    case CpuIsa::AVX2: return "avx2";
    case CpuIsa::Baseline: return "baseline";
    }
    return "unknown";
}

const char *to_string(Device device) {
    switch (device) {
    case Device::Auto: return "auto";
    case Device::CPU: return "cpu";
    }
    return "unknown";
}

double flop_count(int64_t b, int64_t h, int64_t n, int64_t m, int64_t d, int64_t dv, bool causal) {
    return 2.0 * double(b) * double(h) * double(n) * double(m) * double(d + dv) * (causal ? 0.5 : 1.0);
}

namespace detail {

void run(const Problem &p, const Options &options) {
    std::string why_not;
    const KernelEntry *kernel = nullptr;
    if (!options.kernel.empty()) {
        kernel = find_kernel(options.kernel);
        if (!kernel) throw std::invalid_argument("attend: options.kernel: no kernel named '" + options.kernel + "'");
        if (!fits(*kernel, p.d, p.dv)) {
            throw std::invalid_argument("attend: options.kernel: " + options.kernel + " needs d == dv == " +
                                        std::to_string(kernel->head_dim) + ", got d=" + std::to_string(p.d) +
                                        ", dv=" + std::to_string(p.dv));
        }
    } else {
        auto chosen = select_kernel(p.device, DType::Float32, p.d, p.dv, p.features, &why_not);
        if (!chosen) throw std::invalid_argument("attend: unsupported call: " + why_not);
        kernel = find_kernel(chosen->name);
    }
    if (p.empty()) return;

    std::vector<float> k_storage, v_storage;
    TensorView k = dense_head_dim(p.k, k_storage), v = dense_head_dim(p.v, v_storage);
    // Without a mask the kernels still take one: a single byte seen as [b, m] by strides 0.
    uint8_t no_mask = 1;
    TensorView mask = p.mask;
    if (!p.mask.present) {
        mask.ndim = 2;
        mask.data = &no_mask;
        mask.shape[0] = p.b;
        mask.shape[1] = p.m;
        mask.strides[0] = mask.strides[1] = 0;
    }
    // Causal: rows whose keys up to the diagonal are all masked (i + offset below a
    // batch's first unmasked key, or below 0) get uniform weights over every key,
    // so their tiles visit every key block; the others skip blocks above the diagonal.
    int64_t first_unmasked = 0;
    if (p.features.causal && p.features.mask) {
        const auto *bytes = static_cast<const uint8_t *>(p.mask.data);
        for (int64_t b = 0; b < p.b; b++) {
            int64_t first = 0;
            while (first < p.m && bytes[b * p.mask.strides[0] + first * p.mask.strides[1]] == 0) first++;
            first_unmasked = std::max(first_unmasked, first);
        }
    }
    const int64_t all_keys_rows = std::clamp(first_unmasked - p.causal_offset, int64_t(0), p.n);
    const halide_type_t f32(halide_type_float, 32), u8(halide_type_uint, 8);
    KernelBuffer q_buf(p.q, f32), k_buf(k, f32), v_buf(v, f32), mask_buf(mask, u8), out_buf(p.out, f32);

    KernelFn function = function_for(*kernel, options.cpu_isa);
    if (!function) {
        throw std::invalid_argument(std::string("attend: options.cpu_isa: ") + kernel->name + " has no " +
                                    to_string(options.cpu_isa) + " (or lower) target in this build");
    }
    install_halide_hooks();
    CallContext call;
    int status = function(&call, &q_buf.buffer, &k_buf.buffer, &v_buf.buffer, &mask_buf.buffer, p.scale,
                            p.features.causal, p.features.mask, p.drop_threshold, p.keep_scale, uint32_t(p.seed),
                            uint32_t(p.seed >> 32), int32_t(p.causal_offset), int32_t(all_keys_rows),
                            &out_buf.buffer);
    if (status != 0) {
        throw Error(std::string("attend: kernel ") + kernel->name + " failed (Halide error " +
                    std::to_string(status) + "): " + (call.errors.empty() ? "no message" : call.errors));
    }
}

}  // namespace detail
}  // namespace attend

// The kernels of this build, the one function that chooses among them, and the
// hook that turns Halide's runtime errors into exceptions.
#include <cpuid.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <vector>

#include <HalideRuntime.h>
#include <HalideRuntimeCuda.h>
#include <HalideRuntimeOpenCL.h>

#include "attend/kernel_abi.hpp"  // ATTEND_KERNEL_PARAMS

#include "attend_kernels.inc"  // generated: kernel headers, ATTEND_KERNEL_TABLE
#include "internal.hpp"

namespace attend {
namespace {

using KernelFn = KernelFunction;

struct KernelEntry {
    const char *name;
    Device device;
    int head_dim;        // 0: generic
    DType dtype;         // of q, k, v and out
    KernelFn dispatch;   // a GPU kernel or a registered one; null for the built CPU kernels
    KernelFn by_isa[4];  // a built CPU kernel: one function per target, indexed by CpuIsa; null where not built
};

// ATTEND_KERNEL(name, device, head dim, dtype, dispatch, ATTEND_ISA(isa, function)...)
// from the table. Each CPU target is its own library (its schedule parameters may
// differ: tuning/cpu.json), so the runtime, not Halide, picks the target.
struct IsaFunctions {
    KernelFn by_isa[4] = {};
    IsaFunctions &add(CpuIsa isa, KernelFn function) {
        by_isa[int(isa)] = function;
        return *this;
    }
};
KernelEntry make_entry(const char *name, Device device, int head_dim, DType dtype, KernelFn dispatch,
                       const IsaFunctions &isas) {
    KernelEntry e{name, device, head_dim, dtype, dispatch, {}};
    std::copy(std::begin(isas.by_isa), std::end(isas.by_isa), e.by_isa);
    return e;
}
#define ATTEND_ISA(isa, function) .add(CpuIsa::isa, function)
#define ATTEND_KERNEL(name, device, head_dim, dtype, dispatch, ...) \
    make_entry(#name, Device::device, head_dim, DType::dtype, dispatch, IsaFunctions() __VA_ARGS__),
const KernelEntry kKernels[] = {ATTEND_KERNEL_TABLE};
#undef ATTEND_KERNEL
#undef ATTEND_ISA

// Kernels added at run time (add_kernel): never removed, so pointers stay valid.
struct Registered {
    std::mutex lock;
    std::deque<std::string> names;
    std::deque<KernelEntry> entries;
};
Registered &registered() {
    static Registered r;
    return r;
}

const KernelEntry *find_kernel(const std::string &name) {
    for (const KernelEntry &e : kKernels) {
        if (name == e.name) return &e;
    }
    Registered &r = registered();
    std::lock_guard<std::mutex> guard(r.lock);
    for (const KernelEntry &e : r.entries) {
        if (name == e.name) return &e;
    }
    return nullptr;
}

bool fits(const KernelEntry &e, int64_t head_dim, int64_t value_dim) {
    return e.head_dim == 0 || (e.head_dim == head_dim && e.head_dim == value_dim);
}

// GPU kernels exist for d == dv in a few head dims; other (d, dv) run in a larger
// one on zero-padded host copies (see padded()).
bool fits_padded(const KernelEntry &e, int64_t head_dim, int64_t value_dim) {
    return e.device != Device::CPU && e.head_dim >= std::max(head_dim, value_dim);
}

KernelInfo info_of(const KernelEntry &e) { return KernelInfo{e.name, e.device, e.head_dim, e.dtype}; }

// The element type a kernel takes: the dtype, except that OpenCL kernels take
// 16-bit floats as their bits (uint16; see the generator's storage_type).
halide_type_t halide_type_of(DType dtype, Device device) {
    if (device == Device::OpenCL && dtype != DType::Float32) return halide_type_t(halide_type_uint, 16);
    switch (dtype) {
    case DType::Float16: return halide_type_t(halide_type_float, 16);
    case DType::BFloat16: return halide_type_t(halide_type_bfloat, 16);
    default: return halide_type_t(halide_type_float, 32);
    }
}

// The function of a CPU kernel for an instruction-set cap: its best target at or
// below the cap; for Auto, the best this CPU runs (registered kernels: their one).
KernelFn function_for(const KernelEntry &e, CpuIsa cap) {
    if (e.dispatch) return cap == CpuIsa::Auto ? e.dispatch : nullptr;
    static const CpuIsa best = supported_cpu_isas().at(1);  // after Auto
    for (int isa = int(cap == CpuIsa::Auto ? best : cap); isa <= int(CpuIsa::Baseline); isa++) {
        if (e.by_isa[isa]) return e.by_isa[isa];
    }
    return nullptr;
}

// ---- Halide runtime hooks ---------------------------------------------------

void on_halide_error(void *user_context, const char *message) {
    if (auto *call = static_cast<detail::CallContext *>(user_context)) {
        std::lock_guard<std::mutex> guard(call->lock);
        if (call->errors.size() < 4096) call->errors += message;
        return;
    }
    // Outside attend's calls (a caller's own Halide runtime calls, e.g. a device
    // copy of a Halide buffer): printed as Halide's default handler does, without its abort().
    const size_t length = std::strlen(message);
    std::fprintf(stderr, "Halide error: %s%s", message, length && message[length - 1] == '\n' ? "" : "\n");
}

void install_halide_hooks() {
    static std::once_flag once;
    std::call_once(once, [] {
        halide_set_error_handler(on_halide_error);
        // GPU calls with host tensors make device copies each call: keep freed
        // device memory in Halide's cache rather than paying cuMemAlloc/cuMemFree.
        halide_reuse_device_allocations(nullptr, true);
    });
}

// ---- Buffers handed to the kernels ------------------------------------------

// A halide_buffer_t over a TensorView, dims reversed (Halide's dim 0 is innermost).
// On a GPU it also carries the device side: the caller's Halide device state, a
// caller's CUDA pointer wrapped for the call, or a device copy of host data that
// Halide allocates during the call and release() frees.
struct KernelBuffer {
    halide_dimension_t dims[4];
    halide_buffer_t buffer{};
    const detail::TensorView &view;
    bool wrapped = false;  // buffer.device is the caller's CUDA pointer

    KernelBuffer(const detail::TensorView &t, halide_type_t type) : view(t) {
        for (int i = 0; i < t.ndim; i++) {
            int from = t.ndim - 1 - i;
            dims[i] = halide_dimension_t(0, int32_t(t.shape[from]), int32_t(t.strides[from]));
        }
        buffer.host = static_cast<uint8_t *>(t.data);
        buffer.type = type;
        buffer.dimensions = t.ndim;
        buffer.dim = dims;
    }

    // Before a GPU kernel runs. Returns a Halide error code.
    int to_device(detail::CallContext *call, const halide_device_interface_t *interface, bool is_output) {
        if (view.halide && view.halide->device) {
            buffer.device = view.halide->device;
            buffer.device_interface = view.halide->device_interface;
            buffer.flags = view.halide->flags;
            return 0;
        }
        if (!view.data) {  // the mask stand-in: device memory, never read
            return halide_device_malloc(call, &buffer, interface);
        }
#if ATTEND_HAS_CUDA
        if (view.device.device_type == kDLCUDA) {
            buffer.host = nullptr;
            wrapped = true;
            return halide_cuda_wrap_device_ptr(call, &buffer, uint64_t(reinterpret_cast<uintptr_t>(view.data)));
        }
#endif
        // Host data (written by the caller through plain pointers): Halide copies
        // host-dirty inputs to the device. out is written there, not read.
        if (!is_output) buffer.set_host_dirty(true);
        return 0;
    }

    // After the call: keep the caller's Halide buffer in step, drop what the call made.
    int release(detail::CallContext *call) {
#if ATTEND_HAS_CUDA
        if (wrapped) return halide_cuda_detach_device_ptr(call, &buffer);
#endif
        if (view.halide && view.halide->device) {
            const_cast<halide_buffer_t *>(view.halide)->flags = buffer.flags;
            return 0;
        }
        return buffer.device ? halide_device_free(call, &buffer) : 0;
    }
};

// A dense host copy (C order) of t (any strides, elements of `bytes` bytes) whose
// last dim is widened to `width` with zeros (all-zero bits: +0 in every float
// type): zero columns of q and k add nothing to a score, and those of v give
// output columns that copy_into drops. copy=false: zeros only.
detail::TensorView padded(const detail::TensorView &t, int64_t width, size_t bytes, std::vector<uint8_t> &storage,
                          bool copy = true) {
    detail::TensorView wide = t;
    wide.halide = nullptr;
    wide.device = DLDevice{kDLCPU, 0};
    wide.shape[3] = width;
    int64_t stride = 1;
    for (int i = 3; i >= 0; i--) {
        wide.strides[i] = stride;
        stride *= wide.shape[i];
    }
    storage.assign(size_t(stride) * bytes, 0);
    wide.data = storage.data();
    if (!copy) return wide;
    const auto *src = static_cast<const uint8_t *>(t.data);
    for (int64_t a = 0; a < t.shape[0]; a++)
        for (int64_t b = 0; b < t.shape[1]; b++)
            for (int64_t c = 0; c < t.shape[2]; c++)
                for (int64_t e = 0; e < t.shape[3]; e++)
                    std::memcpy(&storage[size_t(((a * t.shape[1] + b) * t.shape[2] + c) * width + e) * bytes],
                                src + (a * t.strides[0] + b * t.strides[1] + c * t.strides[2] + e * t.strides[3]) *
                                          int64_t(bytes),
                                bytes);
    return wide;
}

// Copies a dense host result (C order; its last dim at least out's: the extra
// columns of a padded one are dropped) into out's memory, by out's strides.
void copy_into(const detail::TensorView &wide, const detail::TensorView &out, size_t bytes) {
    const auto *src = static_cast<const uint8_t *>(wide.data);
    auto *dst = static_cast<uint8_t *>(out.data);
    for (int64_t a = 0; a < out.shape[0]; a++)
        for (int64_t b = 0; b < out.shape[1]; b++)
            for (int64_t c = 0; c < out.shape[2]; c++)
                for (int64_t e = 0; e < out.shape[3]; e++)
                    std::memcpy(dst + (a * out.strides[0] + b * out.strides[1] + c * out.strides[2] +
                                       e * out.strides[3]) * int64_t(bytes),
                                src + (a * wide.strides[0] + b * wide.strides[1] + c * wide.strides[2] + e) *
                                          int64_t(bytes),
                                bytes);
}

// The kernels write lse as the second value of out (c, i, h, b): they get lse
// [b, h, n] seen as [b, h, n, width] with stride 0 in the last dim. Without a
// caller's lse, or when its result is staged (see run()), lse is dense: on the
// CPU or staged in `scratch`, else in device memory that Halide allocates during
// the call (data null).
detail::TensorView lse_for_kernel(const detail::Problem &p, int64_t width, Device device, bool staged,
                                  std::vector<float> &scratch) {
    detail::TensorView t = p.lse;
    if (!p.lse.present || staged) {
        t = detail::TensorView();
        t.present = p.lse.present;
        t.name = "lse";
        t.dtype = DLDataType{kDLFloat, 32, 1};
        t.shape[0] = p.b;
        t.shape[1] = p.h;
        t.shape[2] = p.n;
        t.strides[0] = p.h * p.n;
        t.strides[1] = p.n;
        t.strides[2] = 1;
        if (device == Device::CPU || staged) {
            scratch.assign(size_t(p.b * p.h * p.n), 0.0f);
            t.data = scratch.data();
        }
    }
    t.ndim = 4;
    t.shape[3] = width;
    t.strides[3] = 0;
    return t;
}

// lse [b, h, n] as a Halide buffer sharing kernel_lse's memory and device state:
// copies use it (a copy of the stride-0 view would move each element width times).
halide_buffer_t lse_as_3d(const halide_buffer_t &kernel_lse) {
    halide_buffer_t b = kernel_lse;
    b.dimensions = 3;
    b.dim = kernel_lse.dim + 1;
    return b;
}

// How many chunks of keys run in parallel (GPU). A GPU wants thousands of thread
// blocks; with few query tiles (short sequences, few heads) the keys are cut into
// chunks until there are about kTargetBlocks, each chunk at least kMinChunk keys.
int32_t key_splits_for(const KernelEntry &kernel, const detail::Problem &p, const Options &options) {
    if (options.key_splits > 0) return options.key_splits;
    if (kernel.device == Device::CPU) return 1;  // the CPU's parallel loop is over tiles already
    const int64_t kTargetBlocks = 4096, kMinChunk = 256, kRowsPerBlock = 32;
    const int64_t blocks = (p.n + kRowsPerBlock - 1) / kRowsPerBlock * p.h * p.b;
    const int64_t wanted = (kTargetBlocks + blocks - 1) / blocks;
    return int32_t(std::clamp<int64_t>(std::min(wanted, p.m / kMinChunk), 1, 64));
}

// Whether the runtime can read a tensor's data on the host.
bool host_readable(const detail::TensorView &t) {
    return t.data && detail::location(t) == Device::CPU && !t.on_device_only;
}

// Whether a GPU call copies its result for the output t back to host memory (a
// caller's Halide buffer with a device allocation keeps it on the device).
bool result_to_host(const detail::TensorView &t) {
    return t.present && host_readable(t) && !(t.halide && t.halide->device);
}

// k and v are read in the kernels' hot loops, which need their head dim dense:
// a strided one is copied to dense memory (C order), once per call.
detail::TensorView dense_head_dim(const detail::TensorView &t, size_t bytes, std::vector<uint8_t> &storage) {
    if (t.strides[3] == 1 || t.shape[3] <= 1) return t;
    return padded(t, t.shape[3], bytes, storage);
}

}  // namespace

std::optional<KernelInfo> select_kernel(Device device, DType dtype, int64_t head_dim, int64_t value_dim,
                                        Features /*features: every kernel has them all*/, std::string *why_not) {
    auto refuse = [&](std::string reason) -> std::optional<KernelInfo> {
        if (why_not) *why_not = std::move(reason);
        return std::nullopt;
    };
    if (head_dim < 1 || value_dim < 0) return refuse("head dims must be positive");
    if (device == Device::Auto) device = Device::CPU;  // host tensors
    const KernelEntry *generic = nullptr, *padded = nullptr;
    bool any_of_device = false;
    for (const KernelEntry &e : kKernels) {
        if (e.device != device) continue;
        any_of_device = true;
        if (e.dtype != dtype) continue;
        if (e.head_dim != 0 && fits(e, head_dim, value_dim)) return info_of(e);  // specialised first, in build order
        if (e.head_dim == 0 && !generic) generic = &e;
        if (fits_padded(e, head_dim, value_dim) && (!padded || e.head_dim < padded->head_dim)) padded = &e;
    }
    if (generic) return info_of(*generic);
    if (padded) return info_of(*padded);
    if (!any_of_device) return refuse(std::string("no ") + to_string(device) + " kernels in this build");
    std::string dims;
    for (const KernelEntry &e : kKernels) {
        const std::string dim = " " + std::to_string(e.head_dim) + ",";
        if (e.device == device && e.dtype == dtype && dims.find(dim) == std::string::npos) {
            dims += dim;
        }
    }
    if (dims.empty()) {
        return refuse(std::string("no ") + to_string(dtype) + " " + to_string(device) +
                      " kernels in this build (ATTEND_DTYPES)");
    }
    dims.pop_back();
    return refuse(std::string("no ") + to_string(dtype) + " " + to_string(device) + " kernel for d=" +
                  std::to_string(head_dim) + ", dv=" + std::to_string(value_dim) + " in this build (it has d = dv =" + dims +
                  "; smaller d and dv run padded)");
}

std::vector<KernelInfo> available_kernels() {
    std::vector<KernelInfo> all;
    for (const KernelEntry &e : kKernels) all.push_back(info_of(e));
    return all;
}

void add_kernel(const KernelInfo &info, KernelFunction function) {
    if (info.name.empty()) throw std::invalid_argument("attend::add_kernel: info.name: must not be empty");
    if (info.device != Device::CPU) {
        throw std::invalid_argument(std::string("attend::add_kernel: info.device: only CPU kernels can be added, got ") +
                                    to_string(info.device));
    }
    if (info.head_dim < 0) {
        throw std::invalid_argument("attend::add_kernel: info.head_dim: must be 0 (generic) or positive, got " +
                                    std::to_string(info.head_dim));
    }
    if (!function) throw std::invalid_argument("attend::add_kernel: function: must not be null");
    Registered &r = registered();
    std::lock_guard<std::mutex> guard(r.lock);
    const bool taken = std::any_of(std::begin(kKernels), std::end(kKernels), [&](auto &e) { return info.name == e.name; }) ||
                       std::any_of(r.entries.begin(), r.entries.end(), [&](auto &e) { return info.name == e.name; });
    if (taken) throw std::invalid_argument("attend::add_kernel: info.name: a kernel named '" + info.name + "' exists");
    r.names.push_back(info.name);
    r.entries.push_back(KernelEntry{r.names.back().c_str(), Device::CPU, info.head_dim, info.dtype, function, {}});
}

namespace {
// F16C (CPUID leaf 1, ECX bit 29): clang's __builtin_cpu_supports does not know it.
bool cpu_has_f16c() {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C);
}
}  // namespace

std::vector<CpuIsa> supported_cpu_isas() {
    // Read once: cpuid traps to the hypervisor on a virtual machine, and every
    // call validates its cpu_isa against this.
    static const std::vector<CpuIsa> supported = [] {
        __builtin_cpu_init();
        std::vector<CpuIsa> isas{CpuIsa::Auto};
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512cd") &&
            __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
            __builtin_cpu_supports("avx512vl")) {
            isas.push_back(CpuIsa::AVX512);
        }
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c() &&
            __builtin_cpu_supports("sse4.1")) {
            isas.push_back(CpuIsa::AVX2);
        }
        isas.push_back(CpuIsa::Baseline);
        return isas;
    }();
    return supported;
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

const char *to_string(DType dtype) {
    switch (dtype) {
    case DType::Float32: return "float32";
    case DType::Float16: return "float16";
    case DType::BFloat16: return "bfloat16";
    }
    return "unknown";
}

const char *to_string(Device device) {
    switch (device) {
    case Device::Auto: return "auto";
    case Device::CPU: return "cpu";
    case Device::CUDA: return "cuda";
    case Device::OpenCL: return "opencl";
    }
    return "unknown";
}

const halide_device_interface_t *device_interface(Device device) {
    install_halide_hooks();
    if (device == Device::CUDA && detail::halide_interface(device)) {
        detail::prepare_cuda(0);  // the driver and the context hooks, before any allocation
    }
    return detail::halide_interface(device);
}

namespace detail {

const halide_device_interface_t *halide_interface(Device device) {
    switch (device) {
#if ATTEND_HAS_CUDA
    case Device::CUDA: return halide_cuda_device_interface();
#endif
#if ATTEND_HAS_OPENCL
    case Device::OpenCL: return halide_opencl_device_interface();
#endif
    default: return nullptr;
    }
}

}  // namespace detail

double flop_count(int64_t b, int64_t h, int64_t n, int64_t m, int64_t d, int64_t dv, bool causal) {
    return 2.0 * double(b) * double(h) * double(n) * double(m) * double(d + dv) * (causal ? 0.5 : 1.0);
}

namespace detail {

// The kernel a call runs: the one options.kernel names (checked against the call),
// else select_kernel's choice.
const KernelEntry &choose_kernel(const Problem &p, const Options &options) {
    const KernelEntry *kernel = nullptr;
    if (!options.kernel.empty()) {
        kernel = find_kernel(options.kernel);
        if (!kernel) throw std::invalid_argument("attend: options.kernel: no kernel named '" + options.kernel + "'");
        if (!fits(*kernel, p.d, p.dv) && !fits_padded(*kernel, p.d, p.dv)) {
            throw std::invalid_argument("attend: options.kernel: " + options.kernel + " needs d == dv == " +
                                        std::to_string(kernel->head_dim) +
                                        (kernel->device == Device::CPU ? "" : " (or smaller, padded)") +
                                        ", got d=" + std::to_string(p.d) +
                                        ", dv=" + std::to_string(p.dv));
        }
        if (kernel->dtype != p.dtype) {
            throw std::invalid_argument(std::string("attend: options.kernel: ") + kernel->name + " takes " +
                                        to_string(kernel->dtype) + " but the tensors are " + to_string(p.dtype));
        }
        if (kernel->device != p.device) {
            throw std::invalid_argument(std::string("attend: options.kernel: ") + kernel->name + " runs on " +
                                        to_string(kernel->device) + " but this call runs on " +
                                        to_string(p.device) + " (set options.device, or move the tensors)");
        }
    } else {
        std::string why_not;
        auto chosen = select_kernel(p.device, p.dtype, p.d, p.dv, p.features, &why_not);
        if (!chosen) throw std::invalid_argument("attend: unsupported call: " + why_not);
        kernel = find_kernel(chosen->name);
    }
    return *kernel;
}

// Causal: rows whose keys up to the diagonal are all masked (i + offset below a
// batch's first unmasked key, or below 0) get uniform weights over every key, so
// their tiles visit every key block; the others skip blocks above the diagonal.
// A mask only on the device is not scanned: every tile visits every block.
int64_t all_keys_rows_of(const Problem &p) {
    int64_t first_unmasked = 0;
    if (p.features.causal && p.features.mask) {
        if (host_readable(p.mask)) {
            const auto *bytes = static_cast<const uint8_t *>(p.mask.data);
            for (int64_t b = 0; b < p.b; b++) {
                int64_t first = 0;
                while (first < p.m && bytes[b * p.mask.strides[0] + first * p.mask.strides[1]] == 0) first++;
                first_unmasked = std::max(first_unmasked, first);
            }
        } else {
            first_unmasked = p.m + p.n;
        }
    }
    return std::clamp(first_unmasked - p.causal_offset, int64_t(0), p.n);
}

void run(const Problem &p, const Options &options) {
    const KernelEntry *kernel = &choose_kernel(p, options);
    KernelFn function = kernel->device == Device::CPU ? function_for(*kernel, options.cpu_isa) : kernel->dispatch;
    if (!function && options.cpu_isa == CpuIsa::Auto) {
        throw std::invalid_argument(std::string("attend: ") + kernel->name +
                                    " has no target this CPU runs in this build (see ATTEND_CPU_TARGETS)");
    }
    if (!function) {
        throw std::invalid_argument(std::string("attend: options.cpu_isa: ") + kernel->name + " has no " +
                                    to_string(options.cpu_isa) + " (or lower) target" +
                                    (kernel->dispatch ? " (it was added at run time with one target)" : " in this build"));
    }
    if (p.empty()) return;
    if (kernel->device == Device::CUDA) prepare_cuda(p.device_id);

    std::vector<uint8_t> q_storage, k_storage, v_storage, out_storage;
    const size_t bytes = halide_type_of(p.dtype, kernel->device).bytes();
    const bool gpu = kernel->device != Device::CPU;
    TensorView q = p.q, k = p.k, v = p.v, out = p.out;
    const bool pad = kernel->head_dim != 0 && !fits(*kernel, p.d, p.dv);
    // A GPU call's host results are staged: copied back into scratch memory, and
    // into the caller's only once every step succeeded, so that a copy or a
    // release failing part-way leaves out and lse untouched. (Padding stages out.)
    const bool stage_out = pad || (gpu && result_to_host(p.out)), stage_lse = gpu && result_to_host(p.lse);
    if (!pad) {
        k = dense_head_dim(p.k, bytes, k_storage);
        v = dense_head_dim(p.v, bytes, v_storage);
        if (stage_out) out = padded(p.out, p.dv, bytes, out_storage, /*copy=*/false);
    } else {
        if (!host_readable(p.q) || !host_readable(p.k) || !host_readable(p.v) || !host_readable(p.out)) {
            throw std::invalid_argument(std::string("attend: q: ") + kernel->name + " runs d = dv = " +
                                        std::to_string(kernel->head_dim) + "; other head dims (d=" +
                                        std::to_string(p.d) + ", dv=" + std::to_string(p.dv) +
                                        ") are padded on the host, so they need host tensors");
        }
        q = padded(p.q, kernel->head_dim, bytes, q_storage);
        k = padded(p.k, kernel->head_dim, bytes, k_storage);
        v = padded(p.v, kernel->head_dim, bytes, v_storage);
        out = padded(p.out, kernel->head_dim, bytes, out_storage, /*copy=*/false);
    }
    // Without a mask the kernels still take one, never read: a single byte seen as
    // [b, m] by strides 0; on a GPU one uninitialised byte of device memory
    // (Halide would copy a host one element by element, and its contents do not matter).
    uint8_t no_mask = 1;
    TensorView mask = p.mask;
    if (!p.mask.present) {
        mask = TensorView();
        mask.ndim = 2;
        mask.data = kernel->device == Device::CPU ? &no_mask : nullptr;
        mask.shape[0] = p.b;
        mask.shape[1] = p.m;
    }
    const int64_t all_keys_rows = all_keys_rows_of(p);
    std::vector<float> lse_scratch;
    const TensorView lse = lse_for_kernel(p, out.shape[3], kernel->device, stage_lse, lse_scratch);
    const halide_type_t element = halide_type_of(p.dtype, kernel->device), f32(halide_type_float, 32), u8(halide_type_uint, 8);
    KernelBuffer q_buf(q, element), k_buf(k, element), v_buf(v, element), mask_buf(mask, u8), out_buf(out, element),
        lse_buf(lse, f32);

    install_halide_hooks();
    CallContext call;
    call.cuda_device = p.device_id;
    call.cuda_stream = options.cuda_stream;
    auto failed = [&](const char *what, int status) {
        return Error(std::string("attend: kernel ") + kernel->name + ": " + what + " failed (Halide error " +
                     std::to_string(status) + "): " + (call.errors.empty() ? "no message" : call.errors));
    };
    KernelBuffer *buffers[] = {&q_buf, &k_buf, &v_buf, &mask_buf, &out_buf, &lse_buf};
    int status = 0;
    if (gpu) {
        for (KernelBuffer *b : buffers) {
            const bool is_output = b == &out_buf || b == &lse_buf;
            if (status == 0) status = b->to_device(&call, detail::halide_interface(kernel->device), is_output);
        }
    }
    const char *stage = "preparing device buffers";
    if (status == 0) {
        stage = "running";
        status = function(&call, &q_buf.buffer, &k_buf.buffer, &v_buf.buffer, &mask_buf.buffer, p.scale,
                          p.features.causal, p.features.mask, p.drop_threshold, p.keep_scale, uint32_t(p.seed),
                          uint32_t(p.seed >> 32), int32_t(p.causal_offset), int32_t(all_keys_rows),
                          key_splits_for(*kernel, p, options), &out_buf.buffer, &lse_buf.buffer);
    }
    if (status == 0 && stage_out) {
        stage = "copying the result to the host";
        status = halide_copy_to_host(&call, &out_buf.buffer);
    }
    if (status == 0 && stage_lse) {
        stage = "copying lse to the host";
        halide_buffer_t lse_3d = lse_as_3d(lse_buf.buffer);
        status = halide_copy_to_host(&call, &lse_3d);
        lse_buf.buffer.flags = lse_3d.flags;
    }
    if (gpu) {
        for (KernelBuffer *b : buffers) {
            int released = b->release(&call);
            if (status == 0 && released != 0) {
                stage = "releasing device buffers";
                status = released;
            }
        }
    }
    if (status != 0) {
        Error error = failed(stage, status);
        if (kernel->device == Device::CUDA) {
            if (std::string fault = note_cuda_fault(p.device_id); !fault.empty()) error = Error(error.what() + ("; " + fault));
        }
        throw error;
    }
    if (stage_out) copy_into(out, p.out, bytes);
    if (stage_lse) {
        TensorView into = p.lse;  // [b, h, n] as the [b, h, n, 1] copy_into takes
        into.shape[3] = 1;
        into.strides[3] = 1;
        copy_into(lse, into, sizeof(float));
    }
    // A CPU kernel wrote the host memory of a caller's Halide buffer: its device copy is stale.
    for (const TensorView *written : {&p.out, &p.lse}) {
        if (!gpu && written->halide && written->halide->device_interface) {
            const_cast<halide_buffer_t *>(written->halide)->flags |= halide_buffer_flag_host_dirty;
        }
    }
}

}  // namespace detail
}  // namespace attend

// CUDA interop: Halide's CUDA runtime runs our kernels in the caller's CUDA
// state. By default Halide creates a context of its own, so device pointers
// from the CUDA runtime API or PyTorch (which live in the device's primary
// context) would be foreign to it; these hooks hand it the caller's current
// context, else the primary context, and the stream of the call.
//
// The driver is loaded here with dlopen (no link-time dependency on libcuda, so
// libattend loads on machines without a GPU), by its versioned name: many
// systems ship libcuda.so.1 without the libcuda.so link Halide looks for.
// Loading it RTLD_GLOBAL lets Halide's runtime find the same symbols.
//
// Register limit: Halide 21's CUDA runtime JIT-compiles every module with
// CU_JIT_MAX_REGISTERS = 64 unless the environment variable
// HL_CUDA_JIT_MAX_REGISTERS says otherwise; the flash schedules need up to 255
// (bench/cuda_kernel_report.py), and a cap of 64 spills the rest of each row's
// state to local memory. Rather than set a variable in the caller's environment,
// libattend provides Halide's driver-lookup hook (halide_cuda_get_symbol) and
// hands Halide a cuModuleLoadDataEx that raises the cap to 255, the most a
// thread can have, unless the caller set HL_CUDA_JIT_MAX_REGISTERS (then their
// value, which Halide passes, is kept). The same hook records each kernel
// function Halide looks up, so cuda_functions() can report what the driver
// compiled it into.
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>
#include <vector>

#include <HalideRuntimeCuda.h>

#include "device_buffers.hpp"  // CallContext
#include "internal.hpp"

namespace attend::detail {
#if ATTEND_HAS_CUDA
namespace {

// The few driver entry points used here (CUDA driver API, stable ABI).
using CUresult = int;
using CUdevice = int;
using CUcontext = void *;
struct Driver {
    CUresult (*cuInit)(unsigned);
    CUresult (*cuDeviceGetCount)(int *);
    CUresult (*cuDeviceGet)(CUdevice *, int);
    CUresult (*cuCtxGetCurrent)(CUcontext *);
    CUresult (*cuDevicePrimaryCtxRetain)(CUcontext *, CUdevice);
    CUresult (*cuGetErrorName)(CUresult, const char **);
    // For kernel faults (optional: a driver without them only loses the check).
    CUresult (*cuCtxSynchronize)();
    CUresult (*cuCtxPushCurrent)(CUcontext);
    CUresult (*cuCtxPopCurrent)(CUcontext *);
    CUresult (*cuCtxGetId)(CUcontext, unsigned long long *);
};

std::mutex driver_lock;
Driver driver{};
std::string driver_problem;           // why the driver is unusable; empty when it is
int device_count = 0;
std::map<int, CUcontext> primary;     // retained primary contexts, kept for the process
// Contexts a kernel fault left unusable (a sticky error: every later call in them
// fails), by context id, with the error. Calls into them are refused, not made.
std::map<unsigned long long, std::string> broken;
std::atomic<bool> any_broken{false};  // calls read this, not the map, while none is

std::string error_name(CUresult r) {
    const char *name = nullptr;
    if (driver.cuGetErrorName && driver.cuGetErrorName(r, &name) == 0 && name) return name;
    return "CUDA error " + std::to_string(r);
}

// libcuda.so.1, opened once (null without a driver).
void *driver_library() {
    static void *library = dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL);
    return library;
}

void load_driver() {
    void *library = driver_library();
    if (!library) {
        const char *why = dlerror();
        driver_problem = std::string("no CUDA driver: libcuda.so.1 could not be loaded (") + (why ? why : "?") + ")";
        return;
    }
    auto get = [&](auto &fn, const char *name) {
        fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(library, name));
        if (!fn && driver_problem.empty()) driver_problem = std::string("the CUDA driver has no ") + name;
    };
    get(driver.cuInit, "cuInit");
    get(driver.cuDeviceGetCount, "cuDeviceGetCount");
    get(driver.cuDeviceGet, "cuDeviceGet");
    get(driver.cuCtxGetCurrent, "cuCtxGetCurrent");
    get(driver.cuDevicePrimaryCtxRetain, "cuDevicePrimaryCtxRetain");
    get(driver.cuGetErrorName, "cuGetErrorName");
    if (!driver_problem.empty()) return;
    auto optional = [&](auto &fn, const char *name) {
        fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(library, name));
    };
    optional(driver.cuCtxSynchronize, "cuCtxSynchronize");
    optional(driver.cuCtxPushCurrent, "cuCtxPushCurrent_v2");
    optional(driver.cuCtxPopCurrent, "cuCtxPopCurrent_v2");
    optional(driver.cuCtxGetId, "cuCtxGetId");
    if (CUresult r = driver.cuInit(0)) {
        driver_problem = "cuInit failed: " + error_name(r) + " (no usable GPU?)";
    } else if (CUresult r = driver.cuDeviceGetCount(&device_count)) {
        driver_problem = "cuDeviceGetCount failed: " + error_name(r);
    }
}

// Halide hooks. They run inside kernel calls (any thread), and return Halide
// error codes rather than throwing.
int acquire_context(void *user_context, void **context, bool create) {
    CUcontext current = nullptr;
    if (driver.cuCtxGetCurrent && driver.cuCtxGetCurrent(&current) == 0 && current) {
        *context = current;  // the caller's context: its pointers and streams live there
        return halide_error_code_success;
    }
    if (!create) {
        *context = nullptr;
        return halide_error_code_success;
    }
    int device = user_context ? static_cast<CallContext *>(user_context)->cuda_device : 0;
    std::lock_guard<std::mutex> guard(driver_lock);
    auto found = primary.find(device);
    if (found != primary.end()) {
        *context = found->second;
        return halide_error_code_success;
    }
    CUdevice handle = 0;
    CUcontext ctx = nullptr;
    CUresult r = driver.cuDeviceGet ? driver.cuDeviceGet(&handle, device) : -1;
    if (r == 0) r = driver.cuDevicePrimaryCtxRetain(&ctx, handle);
    if (r != 0 || !ctx) {
        halide_error(user_context, ("attend: CUDA: no primary context for device " + std::to_string(device) + ": " +
                                    error_name(r))
                                       .c_str());
        return halide_error_code_device_interface_no_device;
    }
    primary[device] = ctx;
    *context = ctx;
    return halide_error_code_success;
}

int release_context(void *) { return halide_error_code_success; }

int get_stream(void *user_context, void *, void **stream) {
    *stream = user_context ? static_cast<CallContext *>(user_context)->cuda_stream : nullptr;
    return halide_error_code_success;
}

// The context a call on `device` runs in (see acquire_context): the caller's
// current one, else the device's primary context once made; null before that.
// Called with driver_lock held.
CUcontext context_of(int device) {
    CUcontext current = nullptr;
    if (driver.cuCtxGetCurrent && driver.cuCtxGetCurrent(&current) == 0 && current) return current;
    auto found = primary.find(device);
    return found == primary.end() ? nullptr : found->second;
}

// A context's id: unique for the process's life (a reset context gets a new
// one), where the driver has cuCtxGetId (CUDA 12); else its handle.
unsigned long long id_of(CUcontext context) {
    unsigned long long id = 0;
    if (driver.cuCtxGetId && driver.cuCtxGetId(context, &id) == 0) return id;
    return static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(context));
}

// Errors after which a context is unusable for the rest of its life (kernel faults).
bool sticky(CUresult r) {
    return r == 700 /* ILLEGAL_ADDRESS */ || r == 702 /* LAUNCH_TIMEOUT */ || r == 710 /* ASSERT */ ||
           (r >= 714 && r <= 719) /* HARDWARE_STACK_ERROR .. LAUNCH_FAILED */;
}

std::string refusal(int device, const std::string &error) {
    return "the CUDA context of device " + std::to_string(device) + " is unusable after a kernel fault (" + error +
           "): attend makes no more calls in it; reset the device (cudaDeviceReset) to use it again";
}

// ---- The register limit and the record of compiled functions -------------

constexpr int kJitMaxRegisters = 0;          // CUjit_option CU_JIT_MAX_REGISTERS
constexpr int kFuncNumRegisters = 4;         // CUfunction_attribute CU_FUNC_ATTRIBUTE_NUM_REGS
constexpr int kFuncLocalSizeBytes = 3;       // CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES
constexpr unsigned kNoRegisterCap = 255;     // the most registers a thread can have

using ModuleLoadDataEx = CUresult (*)(void **, const void *, unsigned, int *, void **);
using ModuleGetFunction = CUresult (*)(void **, void *, const char *);
using FuncGetAttribute = CUresult (*)(int *, int, void *);

// The attend kernel this thread is running (set by CudaKernelScope), for the
// record: Halide loads modules and looks up functions on the calling thread.
thread_local const char *running_kernel = nullptr;

// What the driver compiled a kernel function into, read when Halide first looks
// it up in a module (its context is current then; a handle would not outlive
// the module, which Halide may unload).
std::mutex record_lock;
std::map<void *, int> module_limits;  // module -> the JIT register limit it was loaded with
std::map<std::pair<void *, std::string>, CudaFunctionInfo> loaded;  // by (module, function)

template <class Function>
Function driver_function(const char *name) {
    return driver_library() ? reinterpret_cast<Function>(dlsym(driver_library(), name)) : nullptr;
}

CUresult load_module(void **module, const void *image, unsigned count, int *options, void **values) {
    static const auto real = driver_function<ModuleLoadDataEx>("cuModuleLoadDataEx");
    static const bool caller_chose = std::getenv("HL_CUDA_JIT_MAX_REGISTERS") != nullptr;
    std::vector<int> own_options(options, options + count);
    std::vector<void *> own_values(values, values + count);
    int limit = -1;
    for (unsigned i = 0; i < count; i++) {
        if (own_options[i] != kJitMaxRegisters) continue;
        if (!caller_chose) own_values[i] = reinterpret_cast<void *>(uintptr_t(kNoRegisterCap));
        limit = int(reinterpret_cast<uintptr_t>(own_values[i]));
    }
    const CUresult result = real(module, image, count, own_options.data(), own_values.data());
    if (result == 0) {
        std::lock_guard<std::mutex> guard(record_lock);
        module_limits[*module] = limit;
        // A new module at the address of an unloaded one: forget the old one's functions.
        for (auto at = loaded.lower_bound({*module, std::string()}); at != loaded.end() && at->first.first == *module;) {
            at = loaded.erase(at);
        }
    }
    return result;
}

CUresult get_function(void **function, void *module, const char *name) {
    static const auto real = driver_function<ModuleGetFunction>("cuModuleGetFunction");
    static const auto attribute = driver_function<FuncGetAttribute>("cuFuncGetAttribute");
    const CUresult result = real(function, module, name);
    if (result != 0 || !running_kernel) return result;
    std::lock_guard<std::mutex> guard(record_lock);
    // Halide looks a function up at every launch: the first lookup in a module records it.
    auto [at, first] = loaded.try_emplace({module, name});
    if (!first) return result;
    auto limit = module_limits.find(module);
    CudaFunctionInfo &info = at->second;
    info = CudaFunctionInfo{running_kernel, name, limit == module_limits.end() ? -1 : limit->second, -1, -1};
    if (attribute) {
        if (attribute(&info.registers, kFuncNumRegisters, *function) != 0) info.registers = -1;
        if (attribute(&info.local_bytes, kFuncLocalSizeBytes, *function) != 0) info.local_bytes = -1;
    }
    return result;
}

}  // namespace

CudaKernelScope::CudaKernelScope(const char *kernel) : previous_(running_kernel) { running_kernel = kernel; }
CudaKernelScope::~CudaKernelScope() { running_kernel = previous_; }

std::string note_cuda_fault(int device) {
    std::lock_guard<std::mutex> guard(driver_lock);
    CUcontext context = context_of(device);
    if (!context || !driver.cuCtxSynchronize || !driver.cuCtxPushCurrent || !driver.cuCtxPopCurrent) return "";
    // Synchronising reports a context's sticky error (on a healthy context it
    // waits for the work queued there: this runs only after a failure).
    CUcontext popped = nullptr;
    if (driver.cuCtxPushCurrent(context) != 0) return "";
    CUresult status = driver.cuCtxSynchronize();
    driver.cuCtxPopCurrent(&popped);
    if (!sticky(status)) return "";
    broken[id_of(context)] = error_name(status);
    any_broken = true;
    return refusal(device, error_name(status));
}

void prepare_cuda(int device) {
    // Once per process: the driver, the device count and the hooks. Each call
    // after that only reads what they left.
    static std::once_flag once;
    std::call_once(once, [] {
        std::lock_guard<std::mutex> guard(driver_lock);
        load_driver();
        if (driver_problem.empty()) {
            halide_set_cuda_acquire_context(acquire_context);
            halide_set_cuda_release_context(release_context);
            halide_set_cuda_get_stream(get_stream);
        }
    });
    if (!driver_problem.empty()) throw Error("attend: CUDA: " + driver_problem);
    if (device < 0 || device >= device_count) {
        throw Error("attend: CUDA: device " + std::to_string(device) + " does not exist (this machine has " +
                    std::to_string(device_count) + " CUDA device" + (device_count == 1 ? "" : "s") + ")");
    }
    if (!any_broken) return;
    std::lock_guard<std::mutex> guard(driver_lock);
    if (CUcontext context = context_of(device)) {
        auto found = broken.find(id_of(context));
        if (found != broken.end()) throw Error("attend: CUDA: " + refusal(device, found->second));
    }
}

#else
void prepare_cuda(int) { throw Error("attend: CUDA: this build has no CUDA kernels (ATTEND_CUDA=OFF)"); }
std::string note_cuda_fault(int) { return ""; }
CudaKernelScope::CudaKernelScope(const char *) : previous_(nullptr) {}
CudaKernelScope::~CudaKernelScope() {}
#endif
}  // namespace attend::detail

#if ATTEND_HAS_CUDA
// Halide's CUDA runtime looks every driver function up through this hook (a
// weak symbol in Halide, defined here): the driver's, except the two wrapped.
extern "C" void *halide_cuda_get_symbol(void *, const char *name) {
    using namespace attend::detail;
    void *symbol = driver_library() ? dlsym(driver_library(), name) : nullptr;
    if (!symbol) return nullptr;  // Halide reports the driver function it lacks
    if (std::strcmp(name, "cuModuleLoadDataEx") == 0) return reinterpret_cast<void *>(&load_module);
    if (std::strcmp(name, "cuModuleGetFunction") == 0) return reinterpret_cast<void *>(&get_function);
    return symbol;
}
#endif

namespace attend {

std::vector<CudaFunctionInfo> cuda_functions() {
    std::vector<CudaFunctionInfo> all;
#if ATTEND_HAS_CUDA
    std::lock_guard<std::mutex> guard(detail::record_lock);
    for (const auto &[key, info] : detail::loaded) all.push_back(info);
    // By kernel, then function (a kernel loaded in several contexts appears once per context).
    std::sort(all.begin(), all.end(), [](const CudaFunctionInfo &a, const CudaFunctionInfo &b) {
        return std::tie(a.kernel, a.function) < std::tie(b.kernel, b.function);
    });
#endif
    return all;
}

}  // namespace attend

// A fake CUDA driver (built as libcuda.so.1) for testing, on machines without a
// GPU, how attend handles what a driver can report: no device, device memory
// running out, and kernel faults that leave a context unusable. It implements
// the part of the driver API that Halide's CUDA runtime and attend call, with
// device memory in host memory and the driver's rules for contexts and sticky
// errors. It runs no kernels: a launch that does not fault returns
// CUDA_ERROR_NOT_SUPPORTED. Settings: fake_cuda.h.
#include "fake_cuda.h"

#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace {

using CUresult = int;
using CUdevice = int;
using CUdeviceptr = unsigned long long;

enum : CUresult {
    kSuccess = 0,
    kInvalidValue = 1,
    kOutOfMemory = 2,
    kNotInitialized = 3,
    kNoDevice = 100,
    kInvalidDevice = 101,
    kInvalidContext = 201,
    kInvalidHandle = 400,
    kIllegalAddress = 700,
    kNotSupported = 801,
};

struct Context {
    int device = 0;
    unsigned long long id = 0;
    CUresult sticky = kSuccess;  // once a kernel faulted: every later call in the context fails with it
};

struct Module {
    Context *context;
};

struct State {
    std::mutex lock;
    CUresult init_result = kSuccess;
    bool initialised = false;
    int devices = 1;
    uint64_t memory = uint64_t(1) << 30;
    bool fault_next_launch = false;
    std::vector<Context *> primary;  // one per device, made on first use, never freed
    std::map<CUdeviceptr, size_t> allocations;
    AttendFakeCudaStats stats{};
};

State &state() {
    static State s;
    return s;
}

thread_local std::vector<Context *> current_stack;  // the context stack of this thread

int configure_locked(State &s, const char *settings) {
    std::string text = settings ? settings : "";
    size_t at = 0;
    while (at < text.size()) {
        size_t end = text.find(',', at);
        if (end == std::string::npos) end = text.size();
        std::string item = text.substr(at, end - at);
        at = end + 1;
        if (item.empty()) continue;
        size_t eq = item.find('=');
        if (eq == std::string::npos) return -1;
        std::string key = item.substr(0, eq), value = item.substr(eq + 1);
        if (key == "init") {
            s.init_result = std::atoi(value.c_str());
        } else if (key == "devices") {
            s.devices = std::atoi(value.c_str());
        } else if (key == "memory") {
            s.memory = std::strtoull(value.c_str(), nullptr, 10);
        } else if (key == "fault" && (value == "launch" || value == "none")) {
            s.fault_next_launch = value == "launch";
        } else {
            return -1;
        }
    }
    return 0;
}

// The settings of the environment, once, when the driver loads.
__attribute__((constructor)) void read_environment() {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    configure_locked(s, std::getenv("ATTEND_FAKE_CUDA"));
}

Context *primary_of(State &s, int device) {
    if (s.primary.size() < size_t(s.devices)) s.primary.resize(size_t(s.devices), nullptr);
    if (!s.primary[size_t(device)]) {
        s.primary[size_t(device)] = new Context{device, 1000 + uint64_t(device), kSuccess};
    }
    return s.primary[size_t(device)];
}

Context *current() { return current_stack.empty() ? nullptr : current_stack.back(); }

// The checks every call that works in the current context makes, in the driver's
// order: initialised, a context, not broken. Counts the call.
CUresult enter_work(State &s) {
    s.stats.work_calls++;
    if (!s.initialised) return kNotInitialized;
    Context *c = current();
    if (!c) return kInvalidContext;
    return c->sticky;
}

CUresult copy(void *to, const void *from, size_t bytes) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (CUresult r = enter_work(s)) return r;
    std::memcpy(to, from, bytes);
    return kSuccess;
}

void *host(CUdeviceptr p) { return reinterpret_cast<void *>(static_cast<uintptr_t>(p)); }

}  // namespace

extern "C" {

int attend_fake_cuda_configure(const char *settings) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    return configure_locked(s, settings);
}

void attend_fake_cuda_stats(AttendFakeCudaStats *stats) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    *stats = s.stats;
}

CUresult cuGetErrorName(CUresult error, const char **name) {
    static const std::map<CUresult, const char *> names = {
        {kSuccess, "CUDA_SUCCESS"},
        {kInvalidValue, "CUDA_ERROR_INVALID_VALUE"},
        {kOutOfMemory, "CUDA_ERROR_OUT_OF_MEMORY"},
        {kNotInitialized, "CUDA_ERROR_NOT_INITIALIZED"},
        {kNoDevice, "CUDA_ERROR_NO_DEVICE"},
        {kInvalidDevice, "CUDA_ERROR_INVALID_DEVICE"},
        {kInvalidContext, "CUDA_ERROR_INVALID_CONTEXT"},
        {kInvalidHandle, "CUDA_ERROR_INVALID_HANDLE"},
        {kIllegalAddress, "CUDA_ERROR_ILLEGAL_ADDRESS"},
        {kNotSupported, "CUDA_ERROR_NOT_SUPPORTED"},
    };
    auto found = names.find(error);
    if (found == names.end()) return kInvalidValue;
    *name = found->second;
    return kSuccess;
}

CUresult cuInit(unsigned) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    s.initialised = s.init_result == kSuccess;
    return s.init_result;
}

CUresult cuDeviceGetCount(int *count) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (!s.initialised) return kNotInitialized;
    *count = s.devices;
    return kSuccess;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (!s.initialised) return kNotInitialized;
    if (ordinal < 0 || ordinal >= s.devices) return kInvalidDevice;
    *device = ordinal;
    return kSuccess;
}

CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (!s.initialised) return kNotInitialized;
    if (device < 0 || device >= s.devices) return kInvalidDevice;
    switch (attribute) {
    case 75: *value = 8; break;   // compute capability major
    case 76: *value = 0; break;   // minor
    case 16: *value = 1; break;   // multiprocessors
    case 10: *value = 32; break;  // warp size
    default: *value = 1024; break;
    }
    return kSuccess;
}

CUresult cuDeviceGetName(char *name, int length, CUdevice) {
    if (length > 0) std::strncpy(name, "attend fake CUDA device", size_t(length) - 1)[length - 1] = 0;
    return kSuccess;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    *bytes = size_t(s.memory);
    return kSuccess;
}

CUresult cuDevicePrimaryCtxRetain(void **context, CUdevice device) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (!s.initialised) return kNotInitialized;
    if (device < 0 || device >= s.devices) return kInvalidDevice;
    *context = primary_of(s, device);
    return kSuccess;
}

// Halide creates a context of its own only without attend's hooks; this one is the primary.
CUresult cuCtxCreate_v2(void **context, unsigned, CUdevice device) {
    CUresult r = cuDevicePrimaryCtxRetain(context, device);
    if (r == kSuccess) current_stack.push_back(static_cast<Context *>(*context));
    return r;
}

CUresult cuCtxDestroy_v2(void *) { return kSuccess; }
CUresult cuProfilerStop() { return kSuccess; }

CUresult cuCtxGetApiVersion(void *, unsigned *version) {
    *version = 12000;
    return kSuccess;
}

CUresult cuCtxGetCurrent(void **context) {
    *context = current();
    return kSuccess;
}

CUresult cuCtxSetCurrent(void *context) {
    if (current_stack.empty()) {
        current_stack.push_back(static_cast<Context *>(context));
    } else {
        current_stack.back() = static_cast<Context *>(context);
    }
    return kSuccess;
}

CUresult cuCtxPushCurrent_v2(void *context) {
    if (!context) return kInvalidContext;
    current_stack.push_back(static_cast<Context *>(context));
    return kSuccess;
}

CUresult cuCtxPopCurrent_v2(void **context) {
    if (current_stack.empty()) return kInvalidContext;
    if (context) *context = current_stack.back();
    current_stack.pop_back();
    return kSuccess;
}

CUresult cuCtxGetDevice(CUdevice *device) {
    Context *c = current();
    if (!c) return kInvalidContext;
    *device = c->device;
    return kSuccess;
}

CUresult cuCtxGetId(void *context, unsigned long long *id) {
    if (!context) return kInvalidContext;
    *id = static_cast<Context *>(context)->id;
    return kSuccess;
}

CUresult cuCtxSynchronize() {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (!s.initialised) return kNotInitialized;
    Context *c = current();
    return c ? c->sticky : kInvalidContext;
}

CUresult cuStreamSynchronize(void *) { return cuCtxSynchronize(); }

CUresult cuModuleLoadDataEx(void **module, const void *image, unsigned, int *, void **) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (CUresult r = enter_work(s)) return r;
    if (!image) return kInvalidValue;
    *module = new Module{current()};
    return kSuccess;
}

CUresult cuModuleLoadData(void **module, const void *image) { return cuModuleLoadDataEx(module, image, 0, nullptr, nullptr); }

CUresult cuModuleUnload(void *module) {
    delete static_cast<Module *>(module);
    return kSuccess;
}

CUresult cuModuleGetFunction(void **function, void *module, const char *name) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (CUresult r = enter_work(s)) return r;
    if (!module || !name) return kInvalidHandle;
    *function = module;  // a kernel is known by its module: nothing here runs it
    return kSuccess;
}

CUresult cuLaunchKernel(void *function, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *,
                        void **, void **) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (CUresult r = enter_work(s)) return r;
    if (!function) return kInvalidHandle;
    s.stats.launches++;
    if (s.fault_next_launch) {
        // Launches are asynchronous: the launch succeeds, the fault shows later.
        s.fault_next_launch = false;
        current()->sticky = kIllegalAddress;
        return kSuccess;
    }
    return kNotSupported;
}

CUresult cuMemAlloc_v2(CUdeviceptr *at, size_t bytes) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (CUresult r = enter_work(s)) return r;
    if (bytes == 0) return kInvalidValue;
    if (bytes > s.memory - s.stats.live_bytes) return kOutOfMemory;
    void *memory = std::malloc(bytes);
    if (!memory) return kOutOfMemory;
    *at = CUdeviceptr(reinterpret_cast<uintptr_t>(memory));
    s.allocations[*at] = bytes;
    s.stats.live_bytes += bytes;
    s.stats.allocations++;
    return kSuccess;
}

CUresult cuMemFree_v2(CUdeviceptr at) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    auto found = s.allocations.find(at);
    if (found == s.allocations.end()) return kInvalidValue;
    s.stats.live_bytes -= found->second;
    s.allocations.erase(found);
    std::free(host(at));
    return kSuccess;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr to, const void *from, size_t bytes) { return copy(host(to), from, bytes); }
CUresult cuMemcpyDtoH_v2(void *to, CUdeviceptr from, size_t bytes) { return copy(to, host(from), bytes); }
CUresult cuMemcpyDtoD_v2(CUdeviceptr to, CUdeviceptr from, size_t bytes) { return copy(host(to), host(from), bytes); }
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr to, const void *from, size_t bytes, void *) {
    return copy(host(to), from, bytes);
}
CUresult cuMemcpyDtoHAsync_v2(void *to, CUdeviceptr from, size_t bytes, void *) { return copy(to, host(from), bytes); }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr to, CUdeviceptr from, size_t bytes, void *) {
    return copy(host(to), host(from), bytes);
}
CUresult cuMemcpy3D_v2(const void *) { return kNotSupported; }

CUresult cuPointerGetAttribute(void *result, int attribute, CUdeviceptr at) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    auto found = s.allocations.upper_bound(at);
    if (found == s.allocations.begin()) return kInvalidValue;
    --found;
    if (at >= found->first + found->second) return kInvalidValue;
    if (attribute != 1 /* CU_POINTER_ATTRIBUTE_CONTEXT */) return kInvalidValue;
    *static_cast<void **>(result) = primary_of(s, 0);
    return kSuccess;
}

}  // extern "C"

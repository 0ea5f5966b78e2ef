// A fake CUDA driver (built as libcuda.so.1) for testing, on machines without a
// GPU, how attend handles what a driver can report: no device, device memory
// running out, and kernel faults that leave a context unusable. It implements
// the part of the driver API that Halide's CUDA runtime and attend call, with
// device memory in host memory and the driver's rules: calls before cuInit fail,
// work needs a current context, copies must stay inside allocations, and after
// a fault every call that works in the context fails with the fault's error.
// It runs no kernels. It records the JIT options each module is loaded with, and
// (with ptxas=PATH) compiles each module's PTX with ptxas under that register
// limit, so cuFuncGetAttribute reports the registers and local memory a driver
// would give it. Settings: fake_cuda.h.
#include "fake_cuda.h"

#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <iterator>
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

// What ptxas makes of one function of a module (-1: not known).
struct Figures {
    int registers = -1, local_bytes = -1;
};

struct Function {
    Figures figures;
};

struct Module {
    Context *context;
    int max_registers = -1;   // the CU_JIT_MAX_REGISTERS option it was loaded with (-1: none)
    int registers_needed = -1;  // the most registers any function uses with no limit (ptxas; -1: not known)
    std::map<std::string, Figures> figures;  // per function, under max_registers (ptxas; empty: not known)
    std::map<std::string, Function> functions;  // looked up so far: they live as long as the module
};

struct Allocation {
    size_t bytes;
    Context *context;
};

enum class Launch { Unsupported, Noop };

struct Settings {  // see fake_cuda.h
    CUresult init_result = kSuccess;
    int devices = 1;
    uint64_t memory = uint64_t(1) << 30;
    Launch launch = Launch::Unsupported;
    bool fault_next_launch = false;
    uint64_t fault_at_copy_to_host = 0;  // 0: none; else the count of device-to-host copies that faults
    std::string ptxas;                   // compiles each module's PTX for its figures; empty: none
};

struct State {
    std::mutex lock;
    Settings settings;
    bool initialised = false;
    std::vector<Context *> primary;  // one per device, made on first use, never freed
    std::map<CUdeviceptr, Allocation> allocations;
    AttendFakeCudaStats stats{};
    std::vector<AttendFakeCudaModule> loaded_modules;  // every module loaded, in order
};

// The driver's state outlives every caller, as a real driver's does: Halide's
// runtime frees its cached device memory from a destructor at exit, which can
// run after this library's own destructors. So the state is never destroyed,
// and the context stack of a thread has no destructor.
State &state() {
    static State *s = new State;
    return *s;
}

struct ContextStack {
    static constexpr int kCapacity = 64;
    Context *items[kCapacity];
    int size;
    bool empty() const { return size == 0; }
    Context *&back() { return items[size - 1]; }
    bool push(Context *c) {
        if (size == kCapacity) return false;
        items[size++] = c;
        return true;
    }
    void pop() { size--; }
};
thread_local ContextStack current_stack{};

// A whole decimal number in [low, high], else false.
bool parse(const std::string &text, long long low, long long high, long long &value) {
    char *end = nullptr;
    value = std::strtoll(text.c_str(), &end, 10);
    return !text.empty() && *end == 0 && value >= low && value <= high;
}

int configure_locked(State &s, const char *settings) {
    Settings next = s.settings;
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
        long long number = 0;
        if (key == "init" && parse(value, 0, 999, number)) {
            next.init_result = CUresult(number);
        } else if (key == "devices" && parse(value, 0, 8, number)) {
            next.devices = int(number);
        } else if (key == "memory" && parse(value, 0, 1LL << 40, number)) {
            next.memory = uint64_t(number);
        } else if (key == "launch" && (value == "unsupported" || value == "noop")) {
            next.launch = value == "noop" ? Launch::Noop : Launch::Unsupported;
        } else if (key == "fault" && (value == "launch" || value == "none")) {
            next.fault_next_launch = value == "launch";
            if (value == "none") next.fault_at_copy_to_host = 0;
        } else if (key == "ptxas") {
            next.ptxas = value;
        } else if (key == "fault" && value.rfind("copy_to_host:", 0) == 0 &&
                   parse(value.substr(13), 1, 1000000, number)) {
            next.fault_at_copy_to_host = s.stats.copies_to_host + uint64_t(number);
        } else {
            return -1;
        }
    }
    s.settings = next;
    return 0;
}

// The settings of the environment, once, when the driver loads. A bad one stops
// the test program at once rather than letting it run with other settings.
__attribute__((constructor)) void read_environment() {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    const char *settings = std::getenv("ATTEND_FAKE_CUDA");
    if (configure_locked(s, settings) != 0) {
        std::fprintf(stderr, "fake CUDA driver: bad ATTEND_FAKE_CUDA '%s' (see tests/fake_cuda/fake_cuda.h)\n", settings);
        std::abort();
    }
}

Context *primary_of(State &s, int device) {
    if (s.primary.size() < size_t(device) + 1) s.primary.resize(size_t(device) + 1, nullptr);
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

// The host memory of [at, at + bytes) of device memory, or null where that is
// not inside one allocation.
void *device_range(State &s, CUdeviceptr at, size_t bytes) {
    auto found = s.allocations.upper_bound(at);
    if (found == s.allocations.begin()) return nullptr;
    --found;
    if (at + bytes > found->first + found->second.bytes) return nullptr;
    return reinterpret_cast<void *>(static_cast<uintptr_t>(at));
}

enum class Direction { ToDevice, ToHost, OnDevice };

CUresult copy(CUdeviceptr device_to, void *host_to, CUdeviceptr device_from, const void *host_from, size_t bytes,
              Direction direction) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (CUresult r = enter_work(s)) return r;
    void *to = direction == Direction::ToHost ? host_to : device_range(s, device_to, bytes);
    const void *from = direction == Direction::ToDevice ? host_from : device_range(s, device_from, bytes);
    if (!to || !from) return kInvalidValue;
    if (direction == Direction::ToHost && ++s.stats.copies_to_host == s.settings.fault_at_copy_to_host) {
        current()->sticky = kIllegalAddress;  // as when a kernel in the context faulted meanwhile
        return kIllegalAddress;
    }
    std::memcpy(to, from, bytes);
    return kSuccess;
}

// Per function of a PTX module, what `ptxas -v` reports for sm_90 (the H100 and
// H200) under a register limit (-1: none); empty when it cannot run.
std::map<std::string, Figures> ptxas_figures(const std::string &ptxas, const char *ptx, int max_registers) {
    std::map<std::string, Figures> result;
    char source[] = "/tmp/attend_fake_cuda_XXXXXX";
    const int fd = mkstemp(source);
    if (fd < 0) return result;
    const size_t length = std::strlen(ptx);
    const bool written = write(fd, ptx, length) == ssize_t(length);
    close(fd);
    std::string command = "'" + ptxas + "' -arch=sm_90 -v -O3 -o /dev/null";
    if (max_registers > 0) command += " --maxrregcount=" + std::to_string(max_registers);
    command += " '" + std::string(source) + "' 2>&1";
    FILE *out = written ? popen(command.c_str(), "r") : nullptr;
    // "Function properties for NAME" / "N bytes stack frame, ..." / "Used R registers, ..."
    std::string function;
    char line[4096];
    while (out && std::fgets(line, sizeof line, out)) {
        const std::string text = line;
        size_t at;
        if ((at = text.find("Function properties for ")) != std::string::npos) {
            function = text.substr(at + 24);
            function.erase(function.find_last_not_of(" \n\r") + 1);
        } else if ((at = text.find(" bytes stack frame")) != std::string::npos && !function.empty()) {
            result[function].local_bytes = std::atoi(text.c_str() + text.find_first_not_of(" \t"));
        } else if ((at = text.find("Used ")) != std::string::npos && !function.empty()) {
            result[function].registers = std::atoi(text.c_str() + at + 5);
        }
    }
    if (out && pclose(out) != 0) result.clear();
    unlink(source);
    return result;
}

bool initialised() {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    return s.initialised;
}

}  // namespace

extern "C" {

int attend_fake_cuda_configure(const char *settings) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    return configure_locked(s, settings);
}

int attend_fake_cuda_modules(AttendFakeCudaModule *modules, int capacity) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    for (int i = 0; i < capacity && size_t(i) < s.loaded_modules.size(); i++) modules[i] = s.loaded_modules[size_t(i)];
    return int(s.loaded_modules.size());
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
    s.initialised = s.settings.init_result == kSuccess;
    return s.settings.init_result;
}

CUresult cuDeviceGetCount(int *count) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (!s.initialised) return kNotInitialized;
    *count = s.settings.devices;
    return kSuccess;
}

CUresult cuDeviceGet(CUdevice *device, int ordinal) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (!s.initialised) return kNotInitialized;
    if (ordinal < 0 || ordinal >= s.settings.devices) return kInvalidDevice;
    *device = ordinal;
    return kSuccess;
}

CUresult cuDeviceGetAttribute(int *value, int attribute, CUdevice device) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (!s.initialised) return kNotInitialized;
    if (device < 0 || device >= s.settings.devices) return kInvalidDevice;
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
    if (length > 0) std::snprintf(name, size_t(length), "attend fake CUDA device");
    return kSuccess;
}

CUresult cuDeviceTotalMem_v2(size_t *bytes, CUdevice) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    *bytes = size_t(s.settings.memory);
    return kSuccess;
}

CUresult cuDevicePrimaryCtxRetain(void **context, CUdevice device) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (!s.initialised) return kNotInitialized;
    if (device < 0 || device >= s.settings.devices) return kInvalidDevice;
    *context = primary_of(s, device);
    return kSuccess;
}

// Halide creates a context of its own only without attend's hooks; this one is the primary.
CUresult cuCtxCreate_v2(void **context, unsigned, CUdevice device) {
    CUresult r = cuDevicePrimaryCtxRetain(context, device);
    if (r == kSuccess && !current_stack.push(static_cast<Context *>(*context))) return kInvalidValue;
    return r;
}

CUresult cuCtxDestroy_v2(void *) { return kSuccess; }
CUresult cuProfilerStop() { return kSuccess; }

CUresult cuCtxGetApiVersion(void *, unsigned *version) {
    *version = 12000;
    return kSuccess;
}

CUresult cuCtxGetCurrent(void **context) {
    if (!initialised()) return kNotInitialized;
    *context = current();
    return kSuccess;
}

CUresult cuCtxSetCurrent(void *context) {
    if (!initialised()) return kNotInitialized;
    if (current_stack.empty()) {
        current_stack.push(static_cast<Context *>(context));
    } else {
        current_stack.back() = static_cast<Context *>(context);
    }
    return kSuccess;
}

CUresult cuCtxPushCurrent_v2(void *context) {
    if (!initialised()) return kNotInitialized;
    if (!context) return kInvalidContext;
    return current_stack.push(static_cast<Context *>(context)) ? kSuccess : kInvalidValue;
}

CUresult cuCtxPopCurrent_v2(void **context) {
    if (!initialised()) return kNotInitialized;
    if (current_stack.empty()) return kInvalidContext;
    if (context) *context = current_stack.back();
    current_stack.pop();
    return kSuccess;
}

CUresult cuCtxGetDevice(CUdevice *device) {
    if (!initialised()) return kNotInitialized;
    Context *c = current();
    if (!c) return kInvalidContext;
    *device = c->device;
    return kSuccess;
}

CUresult cuCtxGetId(void *context, unsigned long long *id) {
    if (!initialised()) return kNotInitialized;
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

CUresult cuModuleLoadDataEx(void **module, const void *image, unsigned count, int *options, void **values) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (CUresult r = enter_work(s)) return r;
    if (!image) return kInvalidValue;
    auto *m = new Module{current()};
    for (unsigned i = 0; i < count; i++) {
        if (options[i] == 0 /* CU_JIT_MAX_REGISTERS */) m->max_registers = int(reinterpret_cast<uintptr_t>(values[i]));
    }
    if (!s.settings.ptxas.empty()) {
        const char *ptx = static_cast<const char *>(image);
        m->figures = ptxas_figures(s.settings.ptxas, ptx, m->max_registers);
        for (const auto &[name, figures] : ptxas_figures(s.settings.ptxas, ptx, -1)) {
            m->registers_needed = std::max(m->registers_needed, figures.registers);
        }
    }
    s.loaded_modules.push_back(AttendFakeCudaModule{m->max_registers, m->registers_needed});
    *module = m;
    return kSuccess;
}

CUresult cuModuleLoadData(void **module, const void *image) { return cuModuleLoadDataEx(module, image, 0, nullptr, nullptr); }

CUresult cuModuleUnload(void *module) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    delete static_cast<Module *>(module);
    return kSuccess;
}

CUresult cuModuleGetFunction(void **function, void *module, const char *name) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (CUresult r = enter_work(s)) return r;
    if (!module || !name) return kInvalidHandle;
    auto *m = static_cast<Module *>(module);
    auto figures = m->figures.find(name);
    Function &f = m->functions[name];
    f.figures = figures == m->figures.end() ? Figures() : figures->second;
    *function = &f;
    return kSuccess;
}

// Known attributes: CU_FUNC_ATTRIBUTE_NUM_REGS (4) and LOCAL_SIZE_BYTES (3),
// from ptxas (NOT_SUPPORTED without ptxas=PATH).
CUresult cuFuncGetAttribute(int *value, int attribute, void *function) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (!value || !function) return kInvalidValue;
    const Figures &f = static_cast<Function *>(function)->figures;
    const int known = attribute == 4 ? f.registers : attribute == 3 ? f.local_bytes : -1;
    if (known < 0) return kNotSupported;
    *value = known;
    return kSuccess;
}

CUresult cuLaunchKernel(void *function, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void *,
                        void **, void **) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (CUresult r = enter_work(s)) return r;
    if (!function) return kInvalidHandle;
    s.stats.launches++;
    if (s.settings.fault_next_launch) {
        // Launches are asynchronous: the launch succeeds, the fault shows later.
        s.settings.fault_next_launch = false;
        current()->sticky = kIllegalAddress;
        return kSuccess;
    }
    return s.settings.launch == Launch::Noop ? kSuccess : kNotSupported;
}

CUresult cuMemAlloc_v2(CUdeviceptr *at, size_t bytes) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (CUresult r = enter_work(s)) return r;
    if (bytes == 0) return kInvalidValue;
    if (bytes > s.settings.memory || s.stats.live_bytes > s.settings.memory - bytes) return kOutOfMemory;
    void *memory = std::malloc(bytes);
    if (!memory) return kOutOfMemory;
    *at = CUdeviceptr(reinterpret_cast<uintptr_t>(memory));
    s.allocations[*at] = Allocation{bytes, current()};
    s.stats.live_bytes += bytes;
    s.stats.peak_live_bytes = std::max(s.stats.peak_live_bytes, s.stats.live_bytes);
    s.stats.allocations++;
    return kSuccess;
}

CUresult cuMemFree_v2(CUdeviceptr at) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (!s.initialised) return kNotInitialized;
    if (Context *c = current(); c && c->sticky) return c->sticky;
    auto found = s.allocations.find(at);
    if (found == s.allocations.end()) return kInvalidValue;
    s.stats.live_bytes -= found->second.bytes;
    s.allocations.erase(found);
    std::free(reinterpret_cast<void *>(static_cast<uintptr_t>(at)));
    return kSuccess;
}

CUresult cuMemcpyHtoD_v2(CUdeviceptr to, const void *from, size_t bytes) {
    return copy(to, nullptr, 0, from, bytes, Direction::ToDevice);
}
CUresult cuMemcpyDtoH_v2(void *to, CUdeviceptr from, size_t bytes) {
    return copy(0, to, from, nullptr, bytes, Direction::ToHost);
}
CUresult cuMemcpyDtoD_v2(CUdeviceptr to, CUdeviceptr from, size_t bytes) {
    return copy(to, nullptr, from, nullptr, bytes, Direction::OnDevice);
}
CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr to, const void *from, size_t bytes, void *) {
    return cuMemcpyHtoD_v2(to, from, bytes);
}
CUresult cuMemcpyDtoHAsync_v2(void *to, CUdeviceptr from, size_t bytes, void *) { return cuMemcpyDtoH_v2(to, from, bytes); }
CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr to, CUdeviceptr from, size_t bytes, void *) {
    return cuMemcpyDtoD_v2(to, from, bytes);
}
CUresult cuMemcpy3D_v2(const void *) { return kNotSupported; }  // Halide 21 looks it up but copies without it

CUresult cuPointerGetAttribute(void *result, int attribute, CUdeviceptr at) {
    State &s = state();
    std::lock_guard<std::mutex> guard(s.lock);
    if (attribute != 1 /* CU_POINTER_ATTRIBUTE_CONTEXT */ || !device_range(s, at, 1)) return kInvalidValue;
    *static_cast<void **>(result) = std::prev(s.allocations.upper_bound(at))->second.context;
    return kSuccess;
}

}  // extern "C"

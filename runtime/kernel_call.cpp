// Running one kernel call, and the Halide runtime hooks every call relies on.
#include "kernel_call.hpp"

#include <cstdio>
#include <cstring>
#include <utility>

#include <HalideRuntimeCuda.h>
#include <HalideRuntimeOpenCL.h>

#include "device_buffers.hpp"

namespace attend {
namespace detail {
namespace {

void on_halide_error(void *user_context, const char *message) {
    if (auto *call = static_cast<CallContext *>(user_context)) {
        std::lock_guard<std::mutex> guard(call->lock);
        if (call->errors.size() < 4096) call->errors += message;
        return;
    }
    // Outside attend's calls (a caller's own Halide runtime calls, e.g. a device
    // copy of a Halide buffer): printed as Halide's default handler does, without its abort().
    const size_t length = std::strlen(message);
    std::fprintf(stderr, "Halide error: %s%s", message, length && message[length - 1] == '\n' ? "" : "\n");
}

// The kernels' heap buffers (a CPU forward task's copy of v in panels: m·dv
// floats) are freed at the end of each task and allocated again by the next.
// Blocks that large come fresh from mmap, whose pages the OS zeroes at the first
// touch: for a task of one tile that took as long as the tile (b=1 h=8 n=32
// m=65536 d=128: 200 ms a call, 100 ms with blocks reused). So each thread keeps
// the largest block it freed, at least kCachedBytes, for its next allocation
// that fits: at most one such block per thread stays allocated between calls.
// A header before each block holds its size (halide_free is not given it); it
// keeps the alignment of Halide's default allocator.
constexpr size_t kCachedBytes = size_t(1) << 20;
constexpr size_t kHeaderBytes = 128;

struct CachedBlock {
    char *base = nullptr;  // from halide_default_malloc; the caller's block starts kHeaderBytes later
    size_t size = 0;
    ~CachedBlock() {
        if (base) halide_default_free(nullptr, base);
    }
};
thread_local CachedBlock cached_block;

void *malloc_reusing_blocks(void *user_context, size_t size) {
    if (size >= kCachedBytes && cached_block.base && cached_block.size >= size) {
        char *base = std::exchange(cached_block.base, nullptr);
        cached_block.size = 0;
        return base + kHeaderBytes;
    }
    auto *base = static_cast<char *>(halide_default_malloc(user_context, size + kHeaderBytes));
    if (!base) return nullptr;
    std::memcpy(base, &size, sizeof(size));
    return base + kHeaderBytes;
}

void free_reusing_blocks(void *user_context, void *block) {
    if (!block) return;
    char *base = static_cast<char *>(block) - kHeaderBytes;
    size_t size;
    std::memcpy(&size, base, sizeof(size));
    if (size >= kCachedBytes && size > cached_block.size) {
        std::swap(base, cached_block.base);
        cached_block.size = size;
        if (!base) return;
    }
    halide_default_free(user_context, base);
}

}  // namespace

void install_halide_hooks() {
    static std::once_flag once;
    std::call_once(once, [] {
        // Before anything else of this Halide runtime allocates: every block it
        // frees must have been allocated with the header.
        halide_set_custom_malloc(malloc_reusing_blocks);
        halide_set_custom_free(free_reusing_blocks);
        halide_set_error_handler(on_halide_error);
        // GPU calls with host tensors make device copies each call: keep freed
        // device memory in Halide's cache rather than paying cuMemAlloc/cuMemFree.
        halide_reuse_device_allocations(nullptr, true);
    });
}

namespace {
// Installed when the library loads: Halide's runtime may allocate (device
// bookkeeping, a caller's device copies) before attend's first kernel call.
const bool hooks_installed_at_load = (install_halide_hooks(), true);
}  // namespace

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

void run_kernel(const char *kernel, Device device, int cuda_device, void *cuda_stream,
                std::initializer_list<KernelBuffer *> buffers, const std::function<int(void *)> &launch) {
    install_halide_hooks();
    if (device == Device::CUDA) prepare_cuda(cuda_device);
    CallContext call;
    call.cuda_device = cuda_device;
    call.cuda_stream = cuda_stream;
    const bool gpu = device != Device::CPU;
    int status = 0;
    std::string stage = "preparing device buffers";
    if (gpu) {
        for (KernelBuffer *b : buffers) {
            if (status == 0) status = b->to_device(&call, halide_interface(device));
        }
    }
    if (status == 0) {
        stage = "running";
        CudaKernelScope running(kernel);
        status = launch(&call);
    }
    if (gpu) {
        for (KernelBuffer *b : buffers) {
            if (status == 0 && b->to_host) {
                stage = std::string("copying ") + b->label + " to the host";
                status = b->copy_to_host(&call);
            }
        }
        for (KernelBuffer *b : buffers) {
            const int released = b->release(&call);
            if (status == 0 && released != 0) {
                stage = "releasing device buffers";
                status = released;
            }
        }
    }
    if (status == 0) return;
    std::string message = std::string("attend: kernel ") + kernel + ": " + stage + " failed (Halide error " +
                          std::to_string(status) + "): " + (call.errors.empty() ? "no message" : call.errors);
    if (device == Device::CUDA) {
        if (std::string fault = note_cuda_fault(cuda_device); !fault.empty()) message += "; " + fault;
    }
    throw Error(message);
}

}  // namespace detail

const halide_device_interface_t *device_interface(Device device) {
    detail::install_halide_hooks();
    if (device == Device::CUDA && detail::halide_interface(device)) {
        detail::prepare_cuda(0);  // the driver and the context hooks, before any allocation
    }
    return detail::halide_interface(device);
}

}  // namespace attend

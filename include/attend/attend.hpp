// Attend: the attention of naturalspeech2's `Attend` module, from Halide kernels.
//
//   out = dropout(softmax(q kᵀ * scale + masks)) v
//
// Two entry points take the same tensors: DLPack tensors in PyTorch's order and
// Halide buffers in Halide's (reversed) order.
//
//   tensor | DLPack shape (outermost first)     | Halide buffer dims (innermost first)
//   q      | [b, h, n, d]                       | (d, n, h, b)
//   k      | [b, h, m, d] [b, hk, m, d] [b, m, d] | (d, m, h, b) (d, m, hk, b) (d, m, b)
//   v      | like k, last dim dv                | like k, first dim dv
//   mask   | bool [b, m], true = attend         | (m, b)
//   out    | [b, h, n, dv], written             | (dv, n, h, b)
//   lse    | [b, h, n] (optional), written      | (n, h, b)
//
// A 3-D k/v is shared by all heads (multi-query); hk heads with h % hk == 0 are
// grouped-query. Masked scores become -FLT_MAX, so a row with every key masked
// gets uniform weights (the mean of v), as in the original module.
//
// lse, when given, receives the log-sum-exp of each query row: the natural log of
// the softmax denominator, ln sum_j exp(s_ij) with s_ij = scale * q_i . k_j, over
// the keys the row attends to (dropout does not change it). A row with every key
// masked has none: its lse is -inf (and its out, as in the seed, the mean of v).
// With out it is what merge() needs to combine attentions over disjoint keys.
//
// dtypes: q, k, v and out are all float32, all float16 or all bfloat16 (DLPack
// kDLFloat 32/16, kDLBfloat 16); mask is bool or uint8; lse is float32.
//
// Strides: any non-negative strides are accepted. k and v are read in place when
// their head dim is dense (stride 1) and copied to dense memory otherwise; q,
// mask, out and lse are used in place with any strides. out and lse must not
// overlap themselves, each other or any input.
//
// Devices: tensors on a CUDA GPU (DLPack kDLCUDA, or Halide buffers with a CUDA
// device allocation) run the CUDA kernel on that GPU; host tensors run the CPU
// kernel, or a GPU kernel when options.device asks for one (the runtime copies
// them to the device and the result back). OpenCL is only chosen explicitly
// (options.device = OpenCL) and takes host tensors or Halide buffers with an
// OpenCL device allocation. All tensors must be on one device. On CUDA the
// kernel runs in the caller's current context (else the device's primary
// context, as the CUDA runtime API and PyTorch use) on options.cuda_stream;
// with device-resident out the call returns once the kernel is queued.
//
// Errors: a bad argument throws std::invalid_argument naming the argument, the
// expectation and what was given; a failure while running throws attend::Error.
// In both cases out (and lse) are left untouched.
#pragma once

#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <HalideBuffer.h>
#include <dlpack/dlpack.h>

#include "attend/kernel_abi.hpp"  // Operation, the kernels' signatures

#if defined(_WIN32)
#define ATTEND_API __declspec(dllexport)
#else
#define ATTEND_API __attribute__((visibility("default")))
#endif

namespace attend {

enum class Device { Auto, CPU, CUDA, OpenCL };
// The element type of q, k, v and out (one for all four; lse is float32).
// Float16 and BFloat16 kernels accumulate in float32 and round out once.
enum class DType { Float32, Float16, BFloat16 };

// Which instruction set the CPU kernels may use. Auto runs the best target of the
// build this CPU has (checked once, with cpuid); the others cap it (tests and benchmarks
// use them to run every CPU path of the build on one machine).
enum class CpuIsa { Auto, AVX512, AVX2, Baseline };

// Where the causal diagonal sits when n != m. TopLeft (the seed's and PyTorch's
// is_causal): key j is masked for query i when j > i. BottomRight (decoding with
// a KV cache: n new queries after m - n cached keys): masked when j > i + m - n.
enum class CausalAlign { TopLeft, BottomRight };

struct Options {
    float dropout = 0.0f;          // probability p of zeroing a weight, in [0, 1]
    bool training = false;         // dropout applies only in training (nn.Dropout)
    bool causal = false;           // key j is masked for query i when j > i (top-left)
    CausalAlign causal_align = CausalAlign::TopLeft;
    std::optional<float> scale;    // default: d^-0.5
    uint64_t seed = 0;             // dropout: the mask is a pure function of (seed, b, h, i, j)
    Device device = Device::Auto;  // Auto: where the tensors are
    void *cuda_stream = nullptr;   // CUDA: the CUstream the kernel is ordered on (null: the default stream)
    CpuIsa cpu_isa = CpuIsa::Auto;
    std::string kernel;            // force a kernel by name (tests, tuning); empty: select_kernel decides
    int key_splits = 0;            // chunks of keys computed in parallel and merged (GPU); 0: chosen from the
                                   // size (1 on the CPU), at most 64
    int query_splits = 0;          // CPU: tasks the query rows of one head run as, each a run of consecutive
                                   // tiles sharing one copy of v; 0: chosen from the thread count; at most
                                   // 65536 (any value gives the same result, bitwise)
    // A shard of a longer sequence: the global positions of the call's first query
    // and first key (>= 0; query_offset + n and key_offset + m at most 2^31 - 1).
    // Causal compares global positions (key j is masked for query i when
    // j + key_offset > i + query_offset, plus m - n for BottomRight, the call's own
    // m and n) and the dropout hash takes them, so attention over a shard of the
    // keys is exactly that part of attention over all keys: merge() of the shards
    // gives the whole call. A bottom-right call's causal mask over key shards: each
    // shard TopLeft with query_offset + M - N (M >= N, the whole call's); its
    // dropout rows are then those global positions, not the whole call's i.
    int64_t query_offset = 0;
    int64_t key_offset = 0;
};

// A failure while running a kernel (Halide runtime error, out of memory).
class ATTEND_API Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// What a call needs from a kernel beyond device, dtype and head dims.
struct Features {
    bool mask = false;
    bool causal = false;
    bool dropout = false;
};

struct KernelInfo {
    std::string name;  // e.g. "attend_cpu_d64"
    Device device = Device::CPU;
    int head_dim = 0;  // 0: generic (any d and dv); else d == dv == head_dim
    DType dtype = DType::Float32;  // of q, k, v and out
    Operation operation = Operation::Forward;
    std::vector<CpuIsa> cpu_isas;  // a CPU kernel's built targets, best first (empty for GPU and added kernels)
    int max_rows = 0;  // > 0: a decode kernel, chosen for calls of at most this many query rows per head (n)
};

// What a call asks of the kernels.
struct KernelRequest {
    Operation operation = Operation::Forward;
    Device device = Device::CPU;  // Auto: host tensors, so CPU
    DType dtype = DType::Float32;
    int64_t head_dim = 0, value_dim = 0;  // d and dv
    Features features;
    int64_t rows_per_head = 0;     // n: the query rows of each head (0: unknown; no decode kernel)
    std::string kernel;            // Options::kernel: a kernel forced by name; empty: the choice is made here
    CpuIsa cpu_isa = CpuIsa::Auto;  // Options::cpu_isa
};

// What runs it.
struct KernelChoice {
    KernelInfo kernel;
    CpuIsa cpu_isa = CpuIsa::Auto;  // the target of a CPU kernel that runs (Auto for GPU and added kernels)
    bool padded = false;            // d and dv run zero-padded to the kernel's head dim (GPU; host tensors only)
};

// The one decision of which kernel runs a call, the one forward() makes: answers
// "is this supported?" (nullopt, with the reason in *why_not) and "which kernel,
// which CPU target, padded or not". A forced kernel (request.kernel) is checked
// against the request instead of chosen.
ATTEND_API std::optional<KernelChoice> select_kernel(const KernelRequest &request, std::string *why_not = nullptr);
// The same for a forward call with no forced kernel, answering with the kernel only.
ATTEND_API std::optional<KernelInfo> select_kernel(Device device, DType dtype, int64_t head_dim, int64_t value_dim,
                                                   Features features, std::string *why_not = nullptr);

// Every kernel of this build, and the CPU instruction sets this machine can run.
ATTEND_API std::vector<KernelInfo> available_kernels();
ATTEND_API std::vector<CpuIsa> supported_cpu_isas();
ATTEND_API const char *to_string(CpuIsa isa);
ATTEND_API const char *to_string(Device device);
ATTEND_API const char *to_string(DType dtype);
ATTEND_API const char *to_string(Operation operation);

// Halide's device interface for CUDA or OpenCL, to give Halide buffers a device
// allocation (buffer.device_malloc(attend::device_interface(Device::CUDA)));
// null where this build has no kernels for that device. CUDA: throws attend::Error
// when there is no driver or GPU.
ATTEND_API const halide_device_interface_t *device_interface(Device device);

// CUDA: what the driver compiled each CUDA kernel function into, for the kernels
// that have run in this process (a kernel's module is compiled on its first
// call), so a register spill cannot hide. The library JIT-compiles every module
// with the register limit 255 (no cap), unless the environment variable
// HL_CUDA_JIT_MAX_REGISTERS was set when the first module loaded (then that
// value; Halide 21 alone would use 64).
struct CudaFunctionInfo {
    std::string kernel;    // e.g. "attend_cuda_d64_lanes_k8"
    std::string function;  // its entry point in the module, e.g. "_kernel_partial_s0_io_block_id_z"
    int max_registers = -1;  // the JIT limit its module was compiled with (-1: none given)
    int registers = -1;      // registers per thread (-1: the driver could not say)
    int local_bytes = -1;    // local memory per thread, spills included (-1: the driver could not say)
};
ATTEND_API std::vector<CudaFunctionInfo> cuda_functions();

ATTEND_API void forward(const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask,
                        const DLTensor &out, const Options &options = {});
// The same, also writing lse (float32 [b, h, n]; nullptr: not wanted).
ATTEND_API void forward(const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask,
                        const DLTensor &out, const DLTensor *lse, const Options &options = {});

// Checks a forward call as forward() does, without running it: throws the same
// std::invalid_argument, writes nothing. (attend::dist checks each rank's shard
// before any rank starts.)
ATTEND_API void check_forward(const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask,
                              const DLTensor &out, const DLTensor *lse, const Options &options = {});

// mask: an undefined buffer (default-constructed) means no mask; element type
// bool or uint8 (nonzero = attend).
ATTEND_API void forward(const Halide::Runtime::Buffer<const void> &q, const Halide::Runtime::Buffer<const void> &k,
                        const Halide::Runtime::Buffer<const void> &v, const Halide::Runtime::Buffer<const void> &mask,
                        const Halide::Runtime::Buffer<void> &out, const Options &options = {});
// lse: float32 (n, h, b); an undefined buffer means not wanted.
ATTEND_API void forward(const Halide::Runtime::Buffer<const void> &q, const Halide::Runtime::Buffer<const void> &k,
                        const Halide::Runtime::Buffer<const void> &v, const Halide::Runtime::Buffer<const void> &mask,
                        const Halide::Runtime::Buffer<void> &out, const Halide::Runtime::Buffer<void> &lse,
                        const Options &options = {});

// The backward of forward() (the gradients of a loss L through it): from the
// forward's inputs, its out and lse, and dout = dL/dout, writes dq, dk and dv
// (dL/dq, dL/dk, dL/dv) with the options of the forward call (the same seed
// gives the same dropout mask). Shapes: dout as out, dq as q, dk as k and dv as
// v (3-D for multi-query: the sums over the heads that share them); all of q's
// dtype, accumulated in float32 and rounded once. lse is required. A row whose
// keys are all masked had uniform weights over every key: its dq is 0, it adds
// nothing to dk, and it adds dout / m (times its dropout factors) to dv of every
// key, as the seed's autograd gives. Strides, devices and errors as forward();
// dq, dk and dv must not overlap each other or any input, and on any error none
// of them is written.
ATTEND_API void backward(const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask,
                         const DLTensor &out, const DLTensor &lse, const DLTensor &dout, const DLTensor &dq,
                         const DLTensor &dk, const DLTensor &dv, const Options &options = {});
// The same on Halide buffers (Halide's dim order; mask: undefined for none).
ATTEND_API void backward(const Halide::Runtime::Buffer<const void> &q, const Halide::Runtime::Buffer<const void> &k,
                         const Halide::Runtime::Buffer<const void> &v, const Halide::Runtime::Buffer<const void> &mask,
                         const Halide::Runtime::Buffer<const void> &out, const Halide::Runtime::Buffer<const void> &lse,
                         const Halide::Runtime::Buffer<const void> &dout, const Halide::Runtime::Buffer<void> &dq,
                         const Halide::Runtime::Buffer<void> &dk, const Halide::Runtime::Buffer<void> &dv,
                         const Options &options = {});

// The exact merge of two attentions of the same queries over disjoint key sets A
// and B (split-KV, ring attention): from (out_a, lse_a) over A's keys_a keys and
// (out_b, lse_b) over B's keys_b keys, writes (out, lse) over A and B together,
// as forward() over all the keys would give them:
//   lse = ln(exp(lse_a) + exp(lse_b)),
//   out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b.
// A row with every key masked in both parts (lse_a = lse_b = -inf) gets the
// seed's uniform weights over all keys: (keys_a out_a + keys_b out_b) / (keys_a +
// keys_b), and lse -inf; so keys_a and keys_b (the parts' key counts; a merged
// part has the sum) only matter for such rows. Shapes: out_* [b, h, n, dv] and
// lse_* [b, h, n], float32, host memory, any strides. out may be out_a or out_b
// (the same tensor, to accumulate in place), and lse likewise; other overlaps are
// rejected. Causal and dropout compose when each part was computed at its keys'
// global positions (Options::key_offset).
ATTEND_API void merge(const DLTensor &out_a, const DLTensor &lse_a, int64_t keys_a, const DLTensor &out_b,
                      const DLTensor &lse_b, int64_t keys_b, const DLTensor &out, const DLTensor &lse);
// The same on Halide buffers: out_* (dv, n, h, b), lse_* (n, h, b).
ATTEND_API void merge(const Halide::Runtime::Buffer<const void> &out_a,
                      const Halide::Runtime::Buffer<const void> &lse_a, int64_t keys_a,
                      const Halide::Runtime::Buffer<const void> &out_b,
                      const Halide::Runtime::Buffer<const void> &lse_b, int64_t keys_b,
                      const Halide::Runtime::Buffer<void> &out, const Halide::Runtime::Buffer<void> &lse);

// Adds a CPU kernel (generated for this machine with the `-user_context` target
// feature, and linked against libattend's Halide runtime: `-no_runtime`) under
// info.name: how `attend tune` (tools/tune.py) runs its candidates, loaded with
// dlopen, through the same validation and marshalling as a built-in kernel.
// Options::kernel = info.name runs it (forward() a forward kernel, backward() a
// backward one); select_kernel never picks it, and options.cpu_isa must stay
// Auto. Throws std::invalid_argument when the name is empty or taken, the
// device is not CPU, info.operation is not the overload's (Forward for a
// ForwardKernel, Backward for a BackwardKernel), or function is null. Kernels
// stay registered until the process ends.
ATTEND_API void add_kernel(const KernelInfo &info, ForwardKernel function);
ATTEND_API void add_kernel(const KernelInfo &info, BackwardKernel function);

// Floating-point operations of one call, as benchmarks count them: 2·b·h·n·m·(d + dv)
// for the two matrix products (4·b·h·n·m·d when dv = d), halved for causal.
ATTEND_API double flop_count(int64_t b, int64_t h, int64_t n, int64_t m, int64_t d, int64_t dv, bool causal);
// The same for backward(): five matrix products (the scores and dP recomputed,
// dv, dk, dq), 2·b·h·n·m·(3d + 2dv) (10·b·h·n·m·d when dv = d, 2.5 times the
// forward's), halved for causal.
ATTEND_API double backward_flop_count(int64_t b, int64_t h, int64_t n, int64_t m, int64_t d, int64_t dv, bool causal);

namespace testing {
// The most elements one tensor view of a kernel call may span: the kernels'
// 32-bit indexing, 2^31 - 1. A call with a larger view runs as several kernel
// calls on pieces of its tensors (docs/contract.md). Tests lower it to run
// small calls in pieces; returns the previous value. Process-wide; throws
// std::invalid_argument outside [1, 2^31 - 1].
ATTEND_API int64_t set_max_kernel_view_elements(int64_t elements);
}  // namespace testing

}  // namespace attend

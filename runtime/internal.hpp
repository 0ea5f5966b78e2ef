// The runtime's internals: one view of a tensor whatever it came as, the checked
// problem (its kernel selected) that validation hands to the operation's runner,
// and the CUDA interop those runners use.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "attend/attend.hpp"
#include "kernel_table.hpp"

namespace attend::detail {

// A tensor in PyTorch's order (outermost first), strides in elements, data
// already advanced by any byte offset.
struct TensorView {
    const char *name = "";
    bool present = false;
    void *data = nullptr;
    DLDataType dtype{};
    DLDevice device{kDLCPU, 0};
    bool on_device_only = false;  // a Halide buffer whose current data is on a device
    const halide_buffer_t *halide = nullptr;  // the caller's Halide buffer (its device state travels along)
    int ndim = 0;
    int64_t shape[4] = {};
    int64_t strides[4] = {};
};

TensorView view_of(const char *name, const DLTensor &t);

// Where a tensor's data is, as a kernel device: CPU for host memory (cpu and
// cuda-host), Auto for a device attend does not run on.
Device location(const TensorView &t);
TensorView view_of(const char *name, const halide_buffer_t &b);

// Whether the runtime can read a tensor's data on the host.
bool host_readable(const TensorView &t);

// Whether a GPU call copies its result for the output t back to host memory (a
// caller's Halide buffer with a device allocation keeps it on the device).
bool result_to_host(const TensorView &t);

// A part of a call: batches [b0, b0 + batches), heads [h0, h0 + heads) (whole
// groups of a kv head, or part of one group), query rows [i0, i0 + rows), keys
// [j0, j0 + keys).
struct Piece {
    int64_t b0 = 0, batches = 0, h0 = 0, heads = 0, i0 = 0, rows = 0, j0 = 0, keys = 0;
    bool same_rows(const Piece &o) const { return b0 == o.b0 && h0 == o.h0 && i0 == o.i0; }
};

// A call that passed validation: every field is consistent and in range.
struct Problem {
    int64_t b = 0, h = 0, kv_heads = 0, n = 0, m = 0, d = 0, dv = 0;
    TensorView q, k, v, mask, out, lse;  // k, v always 4-D here ([b, 1, m, d] for multi-query); lse optional
    TensorView dout, grad_q, grad_k, grad_v;  // the backward's dout, dq, dk, dv (dk, dv 4-D as k, v)
    DType dtype = DType::Float32;  // of q, k, v and out
    Device device = Device::CPU;  // where the kernel runs
    int device_id = 0;            // CUDA: the GPU of the tensors (0 for host tensors)
    Features features;
    float scale = 1.0f;
    uint32_t drop_threshold = 0;  // weights whose 24-bit uniform is below it are dropped
    float keep_scale = 1.0f;      // 1 / (1 - p); 0 when p = 1
    uint64_t seed = 0;
    int64_t causal_offset = 0;    // key j is masked for query i when j > i + causal_offset (offsets included)
    int64_t query_offset = 0, key_offset = 0;  // global positions of the first query and key
    int64_t batch_offset = 0, head_offset = 0;  // global indices of the first batch and head (a piece's)
    Selection selection;          // the kernel that runs it
    // The kernel calls it runs as (plan_pieces): one piece, the whole call, unless
    // a view would pass the kernels' 32-bit indexing or, for a CPU backward, its
    // dK/dV sums would pass their memory bound. Key pieces of the same rows are
    // consecutive (merged by the forward).
    std::vector<Piece> pieces;
    bool empty() const { return b == 0 || h == 0 || n == 0 || dv == 0; }
    int64_t group() const { return kv_heads > 0 ? h / kv_heads : 0; }  // heads per kv head
};

// Throws std::invalid_argument naming the argument, the expectation and what was given.
Problem validate(const TensorView &q, const TensorView &k, const TensorView &v, const TensorView &mask,
                 const TensorView &out, const TensorView &lse, const Options &options);

// The same for a backward call: also dout (out's shape) and the gradients dq,
// dk, dv (q's, k's and v's shapes), all of q's dtype; lse is required.
Problem validate_backward(const TensorView &q, const TensorView &k, const TensorView &v, const TensorView &mask,
                          const TensorView &out, const TensorView &lse, const TensorView &dout, const TensorView &dq,
                          const TensorView &dk, const TensorView &dv, const Options &options);

// The pieces of a validated call whose kernel is selected; throws
// std::invalid_argument naming a tensor that no piece can make small enough
// (one row of one head), or that would need pieces on device memory.
std::vector<Piece> plan_pieces(const Problem &p, Operation op);

// How many tasks a CPU backward kernel runs each kv head's keys as, each with its
// own float32 share of dq: enough for about kBackwardTasks tasks in all, each of
// at least kMinBackwardTaskKeys keys (more, smaller tasks measured slower: the
// shares cost their zeroing and their sum), as far as one kv head's sums stay
// within the bound on a call's sums (plan_pieces cuts calls to it with these
// splits). From the whole call's shape alone (never the thread count), the
// same in each of its pieces: dq's bits depend on it. 1 on a GPU.
constexpr int64_t kBackwardTasks = 32, kMinBackwardTaskKeys = 256;
int32_t backward_key_splits(const Problem &p);

// The piece of p as a call of its own: views of p's tensors at the piece, its
// offsets (query, key, batch, head, causal) keeping every position global.
Problem piece_of(const Problem &p, const Piece &piece);

// An absent optional tensor (mask, lse).
TensorView absent(const char *name);

// merge()'s checks (throw std::invalid_argument like validate), and merge() itself.
void validate_merge(const TensorView &out_a, const TensorView &lse_a, int64_t keys_a, const TensorView &out_b,
                    const TensorView &lse_b, int64_t keys_b, const TensorView &out, const TensorView &lse);
void merge(const TensorView &out_a, const TensorView &lse_a, int64_t keys_a, const TensorView &out_b,
           const TensorView &lse_b, int64_t keys_b, const TensorView &out, const TensorView &lse);

// Runs the forward kernel validation selected; throws attend::Error when it fails.
void run_forward(const Problem &problem, const Options &options);
// The same for the backward.
void run_backward(const Problem &problem, const Options &options);

// Causal: rows below this may have every key masked (computed from the mask), so
// the kernels do not skip keys above the diagonal for them.
int64_t all_keys_rows_of(const Problem &p);

// The scalar arguments every operation's kernels share (the kernel ABI's
// structs name them alike), from the validated problem.
template <class KernelArgs>
void set_shared_scalars(KernelArgs &a, const Problem &p) {
    a.scale = p.scale;
    a.causal = p.features.causal;
    a.has_mask = p.features.mask;
    a.drop_threshold = p.drop_threshold;
    a.keep_scale = p.keep_scale;
    a.seed_lo = uint32_t(p.seed);
    a.seed_hi = uint32_t(p.seed >> 32);
    a.causal_offset = int32_t(p.causal_offset);
    a.query_offset = int32_t(p.query_offset);
    a.key_offset = int32_t(p.key_offset);
    a.batch_offset = int32_t(p.batch_offset);
    a.head_offset = int32_t(p.head_offset);
    a.all_keys_rows = int32_t(all_keys_rows_of(p));
}

// The mask the kernels take: the caller's, or without one a single byte seen as
// [b, m] by strides 0 (never read; on a GPU uninitialised device memory).
TensorView mask_for_kernel(const Problem &p, uint8_t *host_byte);

// CUDA: loads the driver (libcuda.so.1) once per process, and checks that `device`
// exists and that its context was not broken by a kernel fault; throws
// attend::Error saying what is missing. Also installs
// the hooks that make Halide use the caller's current context (else the
// device's primary context, as the CUDA runtime API does) and the call's stream.
void prepare_cuda(int device);

// After a CUDA call on `device` failed: whether a kernel fault left its context
// unusable (a sticky error). If so the context is remembered, so prepare_cuda
// refuses later calls in it, and the returned text says so; else "".
std::string note_cuda_fault(int device);

// CUDA: while one lives, this thread runs the attend kernel `kernel`, so the
// modules and functions Halide loads meanwhile are recorded as its (cuda_functions()).
class CudaKernelScope {
public:
    explicit CudaKernelScope(const char *kernel);
    ~CudaKernelScope();
    CudaKernelScope(const CudaKernelScope &) = delete;
    CudaKernelScope &operator=(const CudaKernelScope &) = delete;

private:
    const char *previous_;
};

// Halide's device interface of a device of this build (null if none), without
// preparing anything: to recognise where a caller's Halide buffer lives.
const halide_device_interface_t *halide_interface(Device device);

}  // namespace attend::detail

// The forward call: from a validated Problem (its kernel already selected) to
// the kernel's arguments, then one kernel call.
#include <algorithm>
#include <cstdlib>
#include <thread>

#include "attend/dlpack_types.hpp"
#include "attend/half.hpp"
#include "attend/kernel_abi.hpp"
#include "device_buffers.hpp"
#include "kernel_call.hpp"
#include "internal.hpp"
#include "kernel_table.hpp"

namespace attend::detail {
namespace {

// The threads of Halide's pool: HL_NUM_THREADS, else one per core.
int64_t cpu_threads() {
    if (const char *env = std::getenv("HL_NUM_THREADS")) {
        const long threads = std::strtol(env, nullptr, 10);
        if (threads > 0) return threads;
    }
    return std::max(1u, std::thread::hardware_concurrency());
}

// CPU kernels cut their work into about this many tasks per thread (for balance).
constexpr int64_t kCpuTasksPerThread = 4;

// How many chunks of keys run in parallel. A GPU wants thousands of thread
// blocks; with few query tiles (short sequences, few heads) the keys are cut into
// chunks until there are about kTargetBlocks, each chunk at least kMinChunk keys.
// A CPU decode kernel's tasks are (chunk, kv head, batch), every row of a kv
// head's group in one: a few per thread (for balance), each chunk at least
// kMinCpuChunk keys (the merge's cost).
int32_t key_splits_for(const Problem &p, const Options &options) {
    if (options.key_splits > 0) return options.key_splits;
    const KernelEntry &kernel = *p.selection.kernel;
    if (kernel.device == Device::CPU) {
        if (kernel.max_rows == 0) return 1;  // the CPU's parallel loop is over tiles already
        const int64_t kMinCpuChunk = 512;
        const int64_t tasks = p.kv_heads * p.b, wanted = kCpuTasksPerThread * cpu_threads();
        return int32_t(std::clamp<int64_t>(std::min((wanted + tasks - 1) / tasks, p.m / kMinCpuChunk), 1, 64));
    }
    const int64_t kTargetBlocks = 4096, kMinChunk = 256, kRowsPerBlock = 32;
    const int64_t blocks = (p.n + kRowsPerBlock - 1) / kRowsPerBlock * p.h * p.b;
    const int64_t wanted = (kTargetBlocks + blocks - 1) / blocks;
    return int32_t(std::clamp<int64_t>(std::min(wanted, p.m / kMinChunk), 1, 64));
}

// How many tasks a CPU forward kernel runs the query rows of one head as. A task
// runs its tiles in turn, k and v staying in the core's cache between them, with
// one float32 copy of the head's v where the schedule copies v into panels:
// the fewer tasks the better, as long as every thread has a few (for balance).
// The kernel takes at most one task per tile.
int32_t query_splits_for(const Problem &p, const Options &options) {
    if (options.query_splits > 0) return options.query_splits;
    const KernelEntry &kernel = *p.selection.kernel;
    if (kernel.device != Device::CPU || kernel.max_rows != 0) return 1;  // not read
    const int64_t heads = p.h * p.b, wanted = kCpuTasksPerThread * cpu_threads();
    return int32_t(std::clamp<int64_t>((wanted + heads - 1) / heads, 1, std::min<int64_t>(p.n, 65536)));
}

// The kernels write lse as the second value of out (c, i, h, b): they get lse
// [b, h, n] seen as [b, h, n, width] with stride 0 in the last dim. Without a
// caller's lse, or when its result is staged, lse is dense: on the CPU or
// staged in `scratch`, else in device memory that Halide allocates during the
// call (data null).
TensorView lse_for_kernel(const Problem &p, int64_t width, bool staged, std::vector<float> &scratch) {
    TensorView t = p.lse;
    if (!p.lse.present || staged) {
        t = TensorView();
        t.present = p.lse.present;
        t.name = "lse";
        t.dtype = DLDataType{kDLFloat, 32, 1};
        t.shape[0] = p.b;
        t.shape[1] = p.h;
        t.shape[2] = p.n;
        t.strides[0] = p.h * p.n;
        t.strides[1] = p.n;
        t.strides[2] = 1;
        if (p.selection.kernel->device == Device::CPU || staged) {
            scratch.assign(size_t(p.b * p.h * p.n), 0.0f);
            t.data = scratch.data();
        }
    }
    t.ndim = 4;
    t.shape[3] = width;
    t.strides[3] = 0;
    return t;
}

// The kernel ABI's scalar arguments from the problem (run_forward adds the buffers).
ForwardKernelArgs forward_args(const Problem &p, const Options &options) {
    ForwardKernelArgs a;
    set_shared_scalars(a, p);
    a.key_splits = key_splits_for(p, options);
    a.query_splits = query_splits_for(p, options);
    return a;
}

}  // namespace

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

// Without a mask the kernels still take one, never read: a single byte seen as
// [b, m] by strides 0; on a GPU one uninitialised byte of device memory (Halide
// would copy a host one element by element, and its contents do not matter).
TensorView mask_for_kernel(const Problem &p, uint8_t *host_byte) {
    if (p.mask.present) return p.mask;
    TensorView t;
    t.name = "mask";
    t.ndim = 2;
    t.data = p.selection.kernel->device == Device::CPU ? host_byte : nullptr;
    t.shape[0] = p.b;
    t.shape[1] = p.m;
    return t;
}

namespace {

// One kernel call for the whole of p.
void run_forward_call(const Problem &p, const Options &options) {
    if (p.empty()) return;
    const KernelEntry &kernel = *p.selection.kernel;
    const bool gpu = kernel.device != Device::CPU;
    const size_t bytes = kernel.element.bytes();

    // k and v are read in the hot loops, which need their head dim dense. A
    // padded call runs on zero-padded dense copies. A GPU call's host results are
    // staged: copied back into scratch memory, and into the caller's only once
    // every step succeeded, so that a step failing part-way leaves out and lse
    // untouched.
    std::vector<uint8_t> q_storage, k_storage, v_storage, out_storage;
    TensorView q = p.q, k = p.k, v = p.v, out = p.out;
    const bool stage_out = p.selection.padded || (gpu && result_to_host(p.out));
    const bool stage_lse = gpu && result_to_host(p.lse);
    if (p.selection.padded) {
        q = dense_copy(p.q, kernel.head_dim, bytes, q_storage);
        k = dense_copy(p.k, kernel.head_dim, bytes, k_storage);
        v = dense_copy(p.v, kernel.head_dim, bytes, v_storage);
        out = zeros(p.out, kernel.head_dim, bytes, out_storage);
    } else {
        k = dense_last_dim(p.k, bytes, k_storage);
        v = dense_last_dim(p.v, bytes, v_storage);
        if (stage_out) out = zeros(p.out, p.dv, bytes, out_storage);
    }
    uint8_t no_mask = 1;
    const TensorView mask = mask_for_kernel(p, &no_mask);
    std::vector<float> lse_scratch;
    const TensorView lse = lse_for_kernel(p, out.shape[3], stage_lse, lse_scratch);

    const halide_type_t f32(halide_type_float, 32), u8(halide_type_uint, 8);
    KernelBuffer q_buf(q, kernel.element), k_buf(k, kernel.element), v_buf(v, kernel.element), mask_buf(mask, u8),
        out_buf(out, kernel.element), lse_buf(lse, f32);
    out_buf.is_output = lse_buf.is_output = true;
    out_buf.label = "the result";
    out_buf.to_host = stage_out;
    lse_buf.to_host = stage_lse;

    ForwardKernelArgs args = forward_args(p, options);
    args.q = &q_buf.buffer;
    args.k = &k_buf.buffer;
    args.v = &v_buf.buffer;
    args.mask = &mask_buf.buffer;
    args.out = &out_buf.buffer;
    args.lse = &lse_buf.buffer;
    const ForwardKernel function = p.selection.function_for<Operation::Forward>();
    run_kernel(kernel.name, kernel.device, p.device_id, options.cuda_stream,
               {&q_buf, &k_buf, &v_buf, &mask_buf, &out_buf, &lse_buf},
               [&](void *user_context) { return call_kernel(function, user_context, args); });

    if (stage_out) copy_into(out, p.out, bytes);
    if (stage_lse) {
        TensorView into = p.lse;  // [b, h, n] as the [b, h, n, 1] copy_into takes
        into.shape[3] = 1;
        into.strides[3] = 1;
        copy_into(lse, into, sizeof(float));
    }
    if (!gpu) {
        mark_host_written(p.out);
        mark_host_written(p.lse);
    }
}

float load(const void *data, int64_t offset, DType dtype) {
    if (dtype == DType::Float32) return static_cast<const float *>(data)[offset];
    return bits_to_float(static_cast<const uint16_t *>(data)[offset], dtype);
}

void store(void *data, int64_t offset, DType dtype, float value) {
    if (dtype == DType::Float32) static_cast<float *>(data)[offset] = value;
    else static_cast<uint16_t *>(data)[offset] = float_to_bits(value, dtype);
}

// to = from, element by element, converting the float type (host tensors,
// 3-D or 4-D, of the same shape).
void convert_into(const TensorView &from, const TensorView &to) {
    const DType from_type = *dlpack::dtype_of(from.dtype), to_type = *dlpack::dtype_of(to.dtype);
    const int64_t last = from.ndim == 4 ? from.shape[3] : 1;
    auto offset = [&](const TensorView &t, int64_t a, int64_t b, int64_t c, int64_t e) {
        return a * t.strides[0] + b * t.strides[1] + c * t.strides[2] + (t.ndim == 4 ? e * t.strides[3] : 0);
    };
    for (int64_t a = 0; a < from.shape[0]; a++) {
        for (int64_t b = 0; b < from.shape[1]; b++) {
            for (int64_t c = 0; c < from.shape[2]; c++) {
                for (int64_t e = 0; e < last; e++) {
                    store(to.data, offset(to, a, b, c, e), to_type,
                          load(from.data, offset(from, a, b, c, e), from_type));
                }
            }
        }
    }
}

// A dense host float32 tensor of t's shape (4-D with its last dim `width`, or 3-D).
TensorView float32_like(const TensorView &t, const char *name, std::vector<float> &storage) {
    TensorView dense = t;
    dense.name = name;
    dense.present = true;
    dense.halide = nullptr;
    dense.device = DLDevice{kDLCPU, 0};
    dense.on_device_only = false;
    dense.dtype = DLDataType{kDLFloat, 32, 1};
    int64_t stride = 1;
    for (int i = t.ndim - 1; i >= 0; i--) {
        dense.strides[i] = stride;
        stride *= t.shape[i];
    }
    storage.assign(size_t(stride), 0.0f);
    dense.data = storage.data();
    return dense;
}

// The key pieces [first, last) of the same rows: each a kernel call into
// scratch, merged in float32 by their log-sum-exp (as shards of the keys are),
// then written to the rows' out and lse.
void run_key_pieces(const Problem &p, const Piece *first, const Piece *last, const Options &options) {
    Piece rows = *first;
    rows.j0 = 0;
    rows.keys = p.m;
    const Problem whole_rows = piece_of(p, rows);
    std::vector<float> out_storage, lse_storage, part_f32_storage, part_lse_storage;
    std::vector<uint8_t> part_storage;
    const TensorView merged = float32_like(whole_rows.out, "out_a", out_storage);
    TensorView lse_shape = whole_rows.out;  // lse's [b, h, n] from out's shape
    lse_shape.ndim = 3;
    const TensorView merged_lse = float32_like(lse_shape, "lse_a", lse_storage);
    const TensorView part_lse = float32_like(lse_shape, "lse_b", part_lse_storage);
    const bool float32 = p.dtype == DType::Float32;
    TensorView part = zeros(whole_rows.out, p.dv, p.selection.kernel->element.bytes(), part_storage);
    part.name = "out_b";
    const TensorView part_f32 = float32 ? part : float32_like(whole_rows.out, "out_b", part_f32_storage);
    int64_t merged_keys = 0;
    for (const Piece *piece = first; piece != last; ++piece) {
        Problem c = piece_of(p, *piece);
        const bool first_piece = piece == first;
        c.out = first_piece && float32 ? merged : part;
        c.lse = first_piece ? merged_lse : part_lse;
        run_forward_call(c, options);
        if (first_piece) {
            if (!float32) convert_into(part, merged);
        } else {
            if (!float32) convert_into(part, part_f32);
            merge(merged, merged_lse, merged_keys, part_f32, part_lse, piece->keys, merged, merged_lse);
        }
        merged_keys += piece->keys;
    }
    convert_into(merged, whole_rows.out);
    if (whole_rows.lse.present) convert_into(merged_lse, whole_rows.lse);
}

}  // namespace

void run_forward(const Problem &p, const Options &options) {
    if (p.pieces.size() <= 1) {
        run_forward_call(p, options);
        return;
    }
    const Piece *pieces = p.pieces.data(), *end = pieces + p.pieces.size();
    for (const Piece *first = pieces; first != end;) {
        const Piece *last = first + 1;
        while (last != end && last->same_rows(*first)) ++last;
        if (last - first == 1) run_forward_call(piece_of(p, *first), options);
        else run_key_pieces(p, first, last, options);
        first = last;
    }
    mark_host_written(p.out);
    mark_host_written(p.lse);
}

}  // namespace attend::detail

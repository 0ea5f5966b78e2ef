// The kernel ABI: the C signature of the generated kernels of each operation,
// written once. The generator checks its Inputs and Outputs against the names
// here when it runs (a mismatch fails the build), the runtime's kernel table
// checks each generated function's type against the signature at compile time,
// and the runtime fills the argument struct in one function per operation.
//
// This header has no dependencies: the generators include it too.
#pragma once

#include <cstdint>

struct halide_buffer_t;

namespace attend {

enum class Operation { Forward, Backward };

// forward: out = softmax(masked scale q kᵀ, with dropout) v, and lse (see attend.hpp).
// q, k, v, mask and out are Halide buffers in Halide's dim order; lse is out's
// second value (the kernels write out as a Tuple of (attention, lse)).
struct ForwardKernelArgs {
    halide_buffer_t *q = nullptr, *k = nullptr, *v = nullptr;
    halide_buffer_t *mask = nullptr;  // read only when has_mask
    float scale = 1.0f;               // applied to q kᵀ
    bool causal = false;
    bool has_mask = false;
    uint32_t drop_threshold = 0;  // weights whose 24-bit hash is below it are dropped; 0: no dropout
    float keep_scale = 1.0f;      // 1 / (1 - p); 0 when p = 1
    uint32_t seed_lo = 0, seed_hi = 0;
    int32_t causal_offset = 0;  // causal masks key j for query i when j > i + causal_offset
    int32_t query_offset = 0;   // global positions of the first query and key: the dropout hash's row and key
    int32_t key_offset = 0;
    int32_t batch_offset = 0;   // global indices of the first batch and head (a piece of a larger call): the
    int32_t head_offset = 0;    // dropout hash's batch and head
    int32_t all_keys_rows = 0;  // causal: rows below it may have every key masked (their tiles visit every key)
    int32_t key_splits = 1;     // chunks of keys computed in parallel and merged (GPU)
    int32_t query_splits = 1;   // CPU: tasks per head, each a run of consecutive query tiles (others ignore it)
    halide_buffer_t *out = nullptr, *lse = nullptr;
};

// The generated signature: user_context, then the fields above in order.
#define ATTEND_FORWARD_KERNEL_PARAMS                                                                             \
    (const void *user_context, halide_buffer_t *q, halide_buffer_t *k, halide_buffer_t *v, halide_buffer_t *mask, \
     float scale, bool causal, bool has_mask, uint32_t drop_threshold, float keep_scale, uint32_t seed_lo,      \
     uint32_t seed_hi, int32_t causal_offset, int32_t query_offset, int32_t key_offset, int32_t batch_offset,      \
     int32_t head_offset, int32_t all_keys_rows,                                                                \
     int32_t key_splits, int32_t query_splits, halide_buffer_t *out, halide_buffer_t *lse)
using ForwardKernel = int(*) ATTEND_FORWARD_KERNEL_PARAMS;

// The generator's Inputs, then its Output, by name (out is the Tuple of out and lse).
inline constexpr const char *kForwardKernelArgNames[] = {
    "q", "k", "v", "mask", "scale", "causal", "has_mask", "drop_threshold", "keep_scale",
    "seed_lo", "seed_hi", "causal_offset", "query_offset", "key_offset", "batch_offset", "head_offset", "all_keys_rows",
    "key_splits", "query_splits", "out"};

// The one place the struct becomes positional arguments.
inline int call_kernel(ForwardKernel kernel, const void *user_context, const ForwardKernelArgs &a) {
    return kernel(user_context, a.q, a.k, a.v, a.mask, a.scale, a.causal, a.has_mask, a.drop_threshold, a.keep_scale,
                  a.seed_lo, a.seed_hi, a.causal_offset, a.query_offset, a.key_offset, a.batch_offset, a.head_offset,
                  a.all_keys_rows, a.key_splits, a.query_splits,
                  a.out, a.lse);
}

// backward: dq, dk, dv from the forward's inputs, its out and lse, and dout (see
// attend.hpp). The scalars are the forward's, computed the same way.
struct BackwardKernelArgs {
    halide_buffer_t *q = nullptr, *k = nullptr, *v = nullptr;
    halide_buffer_t *mask = nullptr;  // read only when has_mask
    halide_buffer_t *out = nullptr, *lse = nullptr, *dout = nullptr;
    float scale = 1.0f;
    bool causal = false;
    bool has_mask = false;
    uint32_t drop_threshold = 0;
    float keep_scale = 1.0f;
    uint32_t seed_lo = 0, seed_hi = 0;
    int32_t causal_offset = 0;
    int32_t query_offset = 0;
    int32_t key_offset = 0;
    int32_t batch_offset = 0;
    int32_t head_offset = 0;
    int32_t all_keys_rows = 0;  // causal: rows below it may have every key masked (they weigh every key for dv)
    int32_t key_splits = 1;     // CPU: tasks per kv head (dq's bits depend on it: chosen from the shape alone)
    halide_buffer_t *dq = nullptr, *dk = nullptr, *dv = nullptr;
};

#define ATTEND_BACKWARD_KERNEL_PARAMS                                                                            \
    (const void *user_context, halide_buffer_t *q, halide_buffer_t *k, halide_buffer_t *v, halide_buffer_t *mask, \
     halide_buffer_t *out, halide_buffer_t *lse, halide_buffer_t *dout, float scale, bool causal, bool has_mask,  \
     uint32_t drop_threshold, float keep_scale, uint32_t seed_lo, uint32_t seed_hi, int32_t causal_offset,       \
     int32_t query_offset, int32_t key_offset, int32_t batch_offset, int32_t head_offset, int32_t all_keys_rows,   \
     int32_t key_splits, halide_buffer_t *dq, halide_buffer_t *dk, halide_buffer_t *dv)
using BackwardKernel = int(*) ATTEND_BACKWARD_KERNEL_PARAMS;

inline constexpr const char *kBackwardKernelArgNames[] = {
    "q", "k", "v", "mask", "out", "lse", "dout", "scale", "causal", "has_mask", "drop_threshold", "keep_scale",
    "seed_lo", "seed_hi", "causal_offset", "query_offset", "key_offset", "batch_offset", "head_offset",
    "all_keys_rows", "key_splits", "dq", "dk", "dv"};

inline int call_kernel(BackwardKernel kernel, const void *user_context, const BackwardKernelArgs &a) {
    return kernel(user_context, a.q, a.k, a.v, a.mask, a.out, a.lse, a.dout, a.scale, a.causal, a.has_mask,
                  a.drop_threshold, a.keep_scale, a.seed_lo, a.seed_hi, a.causal_offset, a.query_offset, a.key_offset,
                  a.batch_offset, a.head_offset, a.all_keys_rows, a.key_splits, a.dq, a.dk, a.dv);
}

// The function type of each operation's kernels (the table checks the generated
// functions against it).
template <Operation>
struct KernelSignature;
template <>
struct KernelSignature<Operation::Forward> {
    using type = ForwardKernel;
};
template <>
struct KernelSignature<Operation::Backward> {
    using type = BackwardKernel;
};

}  // namespace attend

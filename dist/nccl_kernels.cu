// nccl_kernels.hpp's kernels.
#include "nccl_kernels.hpp"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>

namespace attend::dist::detail {
namespace {

__device__ float to_float(float x) { return x; }
__device__ float to_float(__half x) { return __half2float(x); }
__device__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
__device__ T from_float(float x);
template <>
__device__ float from_float<float>(float x) { return x; }
template <>
__device__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// A block per row (grid-stride), its threads over the columns.
template <class T>
__global__ void merge_rows(float *acc, float *acc_lse, double acc_keys, const T *part, const float *part_lse,
                           double part_keys, int64_t rows, int64_t dv, bool first) {
    for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
        double wa = 0, wb = 1, merged = part_lse[row];
        if (!first) {
            const double la = acc_lse[row], lb = part_lse[row], top = fmax(la, lb);
            if (top == -INFINITY) {  // every key masked in both: the uniform weights over all keys
                wa = acc_keys / (acc_keys + part_keys);
                wb = 1.0 - wa;
                merged = -INFINITY;
            } else {
                const double ea = exp(la - top), eb = exp(lb - top);
                wa = ea / (ea + eb);
                wb = eb / (ea + eb);
                merged = top + log(ea + eb);
            }
        }
        for (int64_t c = threadIdx.x; c < dv; c += blockDim.x) {
            float &a = acc[row * dv + c];
            const float p = to_float(part[row * dv + c]);
            a = first ? p : float(wa * a + wb * p);
        }
        __syncthreads();  // every thread has read acc_lse[row]
        if (threadIdx.x == 0) acc_lse[row] = float(merged);
    }
}

template <class T>
__global__ void write_rows(const float *acc, const float *acc_lse, T *out, int64_t o0, int64_t o1, int64_t o2,
                           int64_t o3, float *lse, int64_t l0, int64_t l1, int64_t l2, int64_t b, int64_t h,
                           int64_t rows, int64_t dv) {
    for (int64_t row = blockIdx.x; row < b * h * rows; row += gridDim.x) {
        const int64_t bi = row / (h * rows), hi = row / rows % h, ii = row % rows;
        for (int64_t c = threadIdx.x; c < dv; c += blockDim.x) {
            out[bi * o0 + hi * o1 + ii * o2 + c * o3] = from_float<T>(acc[row * dv + c]);
        }
        if (lse && threadIdx.x == 0) lse[bi * l0 + hi * l1 + ii * l2] = acc_lse[row];
    }
}

constexpr int kThreads = 128;
unsigned blocks_for(int64_t rows) { return unsigned(std::clamp<int64_t>(rows, 1, int64_t(1) << 20)); }

}  // namespace

cudaError_t merge_on_device(ElementCode part_type, float *acc, float *acc_lse, int64_t acc_keys, const void *part,
                            const float *part_lse, int64_t part_keys, int64_t rows, int64_t dv, bool first,
                            cudaStream_t stream) {
    if (rows == 0) return cudaSuccess;
    const double ka = double(acc_keys), kb = double(part_keys);
    switch (part_type) {
    case kFloat32:
        merge_rows<<<blocks_for(rows), kThreads, 0, stream>>>(acc, acc_lse, ka, static_cast<const float *>(part),
                                                               part_lse, kb, rows, dv, first);
        break;
    case kFloat16:
        merge_rows<<<blocks_for(rows), kThreads, 0, stream>>>(acc, acc_lse, ka, static_cast<const __half *>(part),
                                                               part_lse, kb, rows, dv, first);
        break;
    case kBFloat16:
        merge_rows<<<blocks_for(rows), kThreads, 0, stream>>>(
            acc, acc_lse, ka, static_cast<const __nv_bfloat16 *>(part), part_lse, kb, rows, dv, first);
        break;
    default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

cudaError_t write_on_device(ElementCode out_type, const float *acc, const float *acc_lse, void *out,
                            const int64_t *s, float *lse, const int64_t *l, int64_t b, int64_t h, int64_t rows,
                            int64_t dv, cudaStream_t stream) {
    const int64_t total = b * h * rows;
    if (total == 0) return cudaSuccess;
    const int64_t l0 = lse ? l[0] : 0, l1 = lse ? l[1] : 0, l2 = lse ? l[2] : 0;
    switch (out_type) {
    case kFloat32:
        write_rows<<<blocks_for(total), kThreads, 0, stream>>>(acc, acc_lse, static_cast<float *>(out), s[0], s[1],
                                                                s[2], s[3], lse, l0, l1, l2, b, h, rows, dv);
        break;
    case kFloat16:
        write_rows<<<blocks_for(total), kThreads, 0, stream>>>(acc, acc_lse, static_cast<__half *>(out), s[0], s[1],
                                                                s[2], s[3], lse, l0, l1, l2, b, h, rows, dv);
        break;
    case kBFloat16:
        write_rows<<<blocks_for(total), kThreads, 0, stream>>>(acc, acc_lse, static_cast<__nv_bfloat16 *>(out), s[0],
                                                                s[1], s[2], s[3], lse, l0, l1, l2, b, h, rows, dv);
        break;
    default: return cudaErrorInvalidValue;
    }
    return cudaGetLastError();
}

}  // namespace attend::dist::detail

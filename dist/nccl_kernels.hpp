// The NCCL ring's device work (nccl_kernels.cu, built by nvcc): merging a
// part's attention into the float32 accumulators of a query chunk, and writing
// them into out and lse. Element types as codes, so that nvcc sees no Halide header.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

namespace attend::dist::detail {

enum ElementCode : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// acc [rows, dv] and acc_lse [rows] (float32, dense) merged with part (of
// part_type) and part_lse by their log-sum-exp, as attend::merge does (key
// counts for rows whose every key is masked in both); first: acc = part.
cudaError_t merge_on_device(ElementCode part_type, float *acc, float *acc_lse, int64_t acc_keys, const void *part,
                            const float *part_lse, int64_t part_keys, int64_t rows, int64_t dv, bool first,
                            cudaStream_t stream);

// out[b, h, i, c] (of out_type, element strides) = acc[((b·h_count + h)·rows + i)·dv + c],
// and lse likewise from acc_lse when lse is not null.
cudaError_t write_on_device(ElementCode out_type, const float *acc, const float *acc_lse, void *out,
                            const int64_t *out_strides, float *lse, const int64_t *lse_strides, int64_t b,
                            int64_t h, int64_t rows, int64_t dv, cudaStream_t stream);

}  // namespace attend::dist::detail

/* "Kernels" with the generated kernels' signatures (ATTEND_FORWARD_KERNEL_PARAMS
 * and ATTEND_BACKWARD_KERNEL_PARAMS of include/attend/kernel_abi.hpp, written out
 * in C) that write zeros to their outputs (out and lse; dq, dk and dv) and report
 * success: tools/tune.py's probe must reject them. */
#include <stdbool.h>
#include <stdint.h>
#include <string.h>

#include <HalideRuntime.h>

static void zero(halide_buffer_t *b) {
    int64_t at[4] = {0, 0, 0, 0};
    int dims = b->dimensions;
    for (;;) {
        int64_t offset = 0;
        for (int i = 0; i < dims; i++) offset += at[i] * b->dim[i].stride;
        memset(b->host + offset * ((b->type.bits + 7) / 8), 0, (b->type.bits + 7) / 8);
        int i = 0;
        while (i < dims && ++at[i] == b->dim[i].extent) at[i++] = 0;
        if (i == dims) return;
    }
}

int mutant(const void *user_context, halide_buffer_t *q, halide_buffer_t *k, halide_buffer_t *v,
           halide_buffer_t *mask, float scale, bool causal, bool has_mask, uint32_t drop_threshold, float keep_scale,
           uint32_t seed_lo, uint32_t seed_hi, int32_t causal_offset, int32_t query_offset, int32_t key_offset,
           int32_t batch_offset, int32_t head_offset, int32_t all_keys_rows, int32_t key_splits,
           int32_t query_splits, halide_buffer_t *out, halide_buffer_t *lse) {
    (void)user_context, (void)q, (void)k, (void)v, (void)mask, (void)scale, (void)causal, (void)has_mask;
    (void)drop_threshold, (void)keep_scale, (void)seed_lo, (void)seed_hi, (void)causal_offset, (void)all_keys_rows;
    (void)query_offset, (void)key_offset, (void)batch_offset, (void)head_offset;
    (void)key_splits, (void)query_splits;
    zero(out);
    zero(lse);
    return 0;
}

int mutant_backward(const void *user_context, halide_buffer_t *q, halide_buffer_t *k, halide_buffer_t *v,
                    halide_buffer_t *mask, halide_buffer_t *out, halide_buffer_t *lse, halide_buffer_t *dout,
                    float scale, bool causal, bool has_mask, uint32_t drop_threshold, float keep_scale,
                    uint32_t seed_lo, uint32_t seed_hi, int32_t causal_offset, int32_t query_offset,
                    int32_t key_offset, int32_t batch_offset, int32_t head_offset, int32_t all_keys_rows,
                    int32_t key_splits, halide_buffer_t *dq, halide_buffer_t *dk, halide_buffer_t *dv) {
    (void)user_context, (void)q, (void)k, (void)v, (void)mask, (void)out, (void)lse, (void)dout, (void)scale;
    (void)causal, (void)has_mask, (void)drop_threshold, (void)keep_scale, (void)seed_lo, (void)seed_hi;
    (void)causal_offset, (void)query_offset, (void)key_offset, (void)batch_offset, (void)head_offset;
    (void)all_keys_rows, (void)key_splits;
    zero(dq);
    zero(dk);
    zero(dv);
    return 0;
}

// The backward call: from a validated Problem (its backward kernel already
// selected) to the kernel's arguments, then one kernel call per piece.
#include <algorithm>
#include <vector>

#include "attend/kernel_abi.hpp"
#include "device_buffers.hpp"
#include "internal.hpp"
#include "kernel_call.hpp"
#include "kernel_table.hpp"

namespace attend::detail {
namespace {

// One kernel call for the whole of p, its kv heads' keys run as key_splits tasks each.
void run_backward_call(const Problem &p, const Options &options, int32_t key_splits) {
    const KernelEntry &kernel = *p.selection.kernel;
    const bool gpu = kernel.device != Device::CPU;
    const size_t bytes = kernel.element.bytes();

    // The kernels read and write every tensor with a dense head dim: others run
    // on dense copies (zero-padded to the kernel's head dim when padded), and a
    // result written to a copy, or on a GPU for host memory, reaches the
    // caller's tensor only once the call succeeded.
    std::vector<uint8_t> storage[8];
    const int64_t width_q = p.selection.padded ? kernel.head_dim : p.d;
    const int64_t width_v = p.selection.padded ? kernel.head_dim : p.dv;
    auto input = [&](const TensorView &t, int64_t width, std::vector<uint8_t> &into) {
        return p.selection.padded ? dense_copy(t, width, bytes, into) : dense_last_dim(t, bytes, into);
    };
    const TensorView q = input(p.q, width_q, storage[0]), k = input(p.k, width_q, storage[1]),
                     v = input(p.v, width_v, storage[2]), out = input(p.out, width_v, storage[3]),
                     dout = input(p.dout, width_v, storage[4]);
    auto staged = [&](const TensorView &t) {
        return p.selection.padded || (t.strides[3] != 1 && t.shape[3] > 1) || (gpu && result_to_host(t));
    };
    const bool stage_dq = staged(p.grad_q), stage_dk = staged(p.grad_k), stage_dv = staged(p.grad_v);
    const TensorView dq = stage_dq ? zeros(p.grad_q, width_q, bytes, storage[5]) : p.grad_q;
    const TensorView dk = stage_dk ? zeros(p.grad_k, width_q, bytes, storage[6]) : p.grad_k;
    const TensorView dv = stage_dv ? zeros(p.grad_v, width_v, bytes, storage[7]) : p.grad_v;
    uint8_t no_mask = 1;
    const TensorView mask = mask_for_kernel(p, &no_mask);

    const halide_type_t f32(halide_type_float, 32), u8(halide_type_uint, 8);
    KernelBuffer q_buf(q, kernel.element), k_buf(k, kernel.element), v_buf(v, kernel.element), mask_buf(mask, u8),
        out_buf(out, kernel.element), lse_buf(p.lse, f32), dout_buf(dout, kernel.element),
        dq_buf(dq, kernel.element), dk_buf(dk, kernel.element), dv_buf(dv, kernel.element);
    for (KernelBuffer *gradient : {&dq_buf, &dk_buf, &dv_buf}) gradient->is_output = true;
    dq_buf.to_host = stage_dq;
    dk_buf.to_host = stage_dk;
    dv_buf.to_host = stage_dv;

    BackwardKernelArgs a;
    a.q = &q_buf.buffer;
    a.k = &k_buf.buffer;
    a.v = &v_buf.buffer;
    a.mask = &mask_buf.buffer;
    a.out = &out_buf.buffer;
    a.lse = &lse_buf.buffer;
    a.dout = &dout_buf.buffer;
    set_shared_scalars(a, p);
    a.key_splits = key_splits;
    a.dq = &dq_buf.buffer;
    a.dk = &dk_buf.buffer;
    a.dv = &dv_buf.buffer;
    const BackwardKernel function = p.selection.function_for<Operation::Backward>();
    run_kernel(kernel.name, kernel.device, p.device_id, options.cuda_stream,
               {&q_buf, &k_buf, &v_buf, &mask_buf, &out_buf, &lse_buf, &dout_buf, &dq_buf, &dk_buf, &dv_buf},
               [&](void *user_context) { return call_kernel(function, user_context, a); });

    if (stage_dq) copy_into(dq, p.grad_q, bytes);
    if (stage_dk) copy_into(dk, p.grad_k, bytes);
    if (stage_dv) copy_into(dv, p.grad_v, bytes);
}

}  // namespace

void run_backward(const Problem &p, const Options &options) {
    const size_t bytes = p.selection.kernel->element.bytes();
    if (p.empty()) {  // no queries, or no columns of v: every gradient is 0 (validation checked they are on the host)
        for (const TensorView *t : {&p.grad_q, &p.grad_k, &p.grad_v}) {
            std::vector<uint8_t> zero_storage;
            copy_into(zeros(*t, t->shape[3], bytes, zero_storage), *t, bytes);
        }
    } else {
        // The whole call's splits in every piece: its pieces give the whole call's bits.
        const int32_t key_splits = backward_key_splits(p);
        for (const Piece &piece : p.pieces) {
            run_backward_call(p.pieces.size() == 1 ? p : piece_of(p, piece), options, key_splits);
        }
    }
    if (p.selection.kernel->device == Device::CPU || p.empty()) {
        for (const TensorView *t : {&p.grad_q, &p.grad_k, &p.grad_v}) mark_host_written(*t);
    }
}

}  // namespace attend::detail

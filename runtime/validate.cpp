// Validation at the boundary: every check of a call happens here, once, before
// any kernel runs, so a rejected call has written nothing.
#include <algorithm>
#include <climits>
#include <cmath>
#include <sstream>

#include "attend/dlpack_types.hpp"
#include "attend/dropout_hash.hpp"
#include "internal.hpp"
#include "kernel_table.hpp"

namespace attend::detail {
namespace {

std::string list_string(const int64_t *values, int count) {
    std::ostringstream s;
    s << "[";
    for (int i = 0; i < count; i++) s << (i ? ", " : "") << values[i];
    s << "]";
    return s.str();
}

std::string shape_string(const TensorView &t) { return list_string(t.shape, t.ndim); }
std::string stride_string(const TensorView &t) { return list_string(t.strides, t.ndim); }

std::string device_string(DLDevice d) {
    switch (d.device_type) {
    case kDLCPU: return "cpu";
    case kDLCUDAHost: return "cuda-host (pinned host memory)";
    case kDLCUDA: return "cuda:" + std::to_string(d.device_id);
    case kDLOpenCL: return "opencl:" + std::to_string(d.device_id);
    default: return "device type " + std::to_string(int(d.device_type)) + ":" + std::to_string(d.device_id);
    }
}

[[noreturn]] void fail(const std::string &message) { throw std::invalid_argument("attend: " + message); }

using dlpack::is_float32;
using dlpack::is_mask_type;

int64_t element_count(const TensorView &t) {
    int64_t count = 1;
    for (int i = 0; i < t.ndim; i++) count *= t.shape[i];
    return count;
}

// Offset in elements of the last element (0 for a tensor with no elements).
int64_t last_offset(const TensorView &t) {
    int64_t last = 0;
    for (int i = 0; i < t.ndim; i++) last += (t.shape[i] - 1) * t.strides[i];
    return last;
}

void check_basic(const TensorView &t, std::initializer_list<int> ranks, const char *layout) {
    if (std::find(ranks.begin(), ranks.end(), t.ndim) == ranks.end()) {
        fail(std::string(t.name) + ": expected " + layout + ", got " + std::to_string(t.ndim) + " dims " +
             (t.ndim >= 0 && t.ndim <= 4 ? shape_string(t) : std::string()));
    }
    for (int i = 0; i < t.ndim; i++) {
        if (t.shape[i] < 0) {
            fail(std::string(t.name) + ": dim " + std::to_string(i) + " has negative size " +
                 std::to_string(t.shape[i]) + " (shape " + shape_string(t) + ")");
        }
        if (t.strides[i] < 0) {
            fail(std::string(t.name) + ": stride of dim " + std::to_string(i) + " is " + std::to_string(t.strides[i]) +
                 "; negative strides are not supported");
        }
    }
    if (location(t) == Device::Auto) {
        fail(std::string(t.name) + ": tensor is on " + device_string(t.device) +
             "; attend runs on host memory (cpu, cuda-host) and cuda devices");
    }
    if (t.device.device_type == kDLOpenCL && !t.halide) {
        fail(std::string(t.name) + ": tensor is on " + device_string(t.device) +
             "; OpenCL tensors through DLPack are not supported: pass host tensors with options.device = OpenCL, "
             "or Halide buffers with an OpenCL allocation");
    }
    const bool device_only = t.halide && t.halide->device && !t.data;
    if (element_count(t) > 0 && t.data == nullptr && !device_only) {
        fail(std::string(t.name) + ": data is null for a tensor of shape " + shape_string(t));
    }
    // A span no address space holds is an error (and keeps the byte arithmetic
    // of the overlap checks within 64 bits).
    __int128 span_bytes = 0;
    for (int i = 0; i < t.ndim; i++) {
        if (t.shape[i] > 0) span_bytes += __int128(t.shape[i] - 1) * t.strides[i] * ((t.dtype.bits + 7) / 8);
    }
    if (span_bytes > (__int128(1) << 47)) {
        fail(std::string(t.name) + ": its strides " + stride_string(t) + " span more than 2^47 bytes of memory");
    }
    // The kernels index with 32-bit integers: a size must fit. (Strides and
    // spans are the pieces' concern: a call beyond them runs in pieces.)
    for (int i = 0; i < t.ndim; i++) {
        if (t.shape[i] > INT32_MAX) {
            fail(std::string(t.name) + ": dim " + std::to_string(i) + " has size " + std::to_string(t.shape[i]) +
                 ", beyond the 32-bit indexing of the kernels (at most 2147483647)");
        }
    }
}

// q's element type as a DType; throws unless float32, float16 or bfloat16.
DType element_type(const TensorView &q) {
    if (auto dtype = dlpack::dtype_of(q.dtype)) return *dtype;
    fail(std::string(q.name) + ": expected dtype float32, float16 or bfloat16, got " + dlpack::name_of(q.dtype));
}

void check_float32(const TensorView &t) {
    if (!is_float32(t.dtype)) {
        fail(std::string(t.name) + ": expected dtype float32, got " + dlpack::name_of(t.dtype));
    }
}

void check_same(const TensorView &t, int dim, int64_t expected, const TensorView &ref, const char *what) {
    if (t.shape[dim] != expected) {
        fail(std::string(t.name) + ": " + what + " is " + std::to_string(t.shape[dim]) + " but " + ref.name +
             "'s is " + std::to_string(expected) + " (" + t.name + " " + shape_string(t) + ", " + ref.name + " " +
             shape_string(ref) + ")");
    }
}

// Outputs are written through: no two of their elements may share memory.
void check_no_self_overlap(const TensorView &t) {
    if (element_count(t) == 0) return;
    int order[4] = {0, 1, 2, 3};  // dims by increasing stride (insertion sort of at most 4)
    for (int r = 1; r < t.ndim && r < 4; r++) {
        for (int s = r; s > 0 && t.strides[order[s]] < t.strides[order[s - 1]]; s--) std::swap(order[s], order[s - 1]);
    }
    int64_t span = 0;  // offset of the last element of the inner dims seen so far
    for (int r = 0; r < t.ndim; r++) {
        int i = order[r];
        if (t.shape[i] == 1) continue;
        if (t.strides[i] <= span) {
            fail(std::string(t.name) + ": strides make elements overlap (dim " + std::to_string(i) + " stride " +
                 std::to_string(t.strides[i]) + "); " + t.name + " must have distinct memory for every element");
        }
        span += (t.shape[i] - 1) * t.strides[i];
    }
}

bool overlaps(const TensorView &a, const TensorView &b) {
    if (!a.present || !b.present || element_count(a) == 0 || element_count(b) == 0) return false;
    if (!a.data || !b.data) return false;  // a Halide buffer on a device only: its host side is unset
    auto begin_a = static_cast<const char *>(a.data), begin_b = static_cast<const char *>(b.data);
    auto end_a = begin_a + (last_offset(a) + 1) * (a.dtype.bits / 8);
    auto end_b = begin_b + (last_offset(b) + 1) * (b.dtype.bits / 8);
    return begin_a < end_b && begin_b < end_a;
}

// A 3-D k or v [b, m, d] seen as [b, 1, m, d]: one kv head shared by all heads.
TensorView as_4d(TensorView t) {
    if (t.ndim == 4) return t;
    t.shape[3] = t.shape[2];
    t.strides[3] = t.strides[2];
    t.shape[2] = t.shape[1];
    t.strides[2] = t.strides[1];
    t.shape[1] = 1;
    t.strides[1] = 0;
    t.ndim = 4;
    return t;
}

void check_options(const Options &options) {
    if (!(options.dropout >= 0.0f && options.dropout <= 1.0f)) {  // also rejects NaN
        std::ostringstream s;
        s << "options.dropout: expected a probability in [0, 1], got " << options.dropout;
        fail(s.str());
    }
    if (options.scale && !std::isfinite(*options.scale)) {
        std::ostringstream s;
        s << "options.scale: expected a finite number, got " << *options.scale;
        fail(s.str());
    }
    if (options.causal_align != CausalAlign::TopLeft && options.causal_align != CausalAlign::BottomRight) {
        fail("options.causal_align: unknown alignment " + std::to_string(int(options.causal_align)));
    }
    if (options.device != Device::Auto && options.device != Device::CPU && options.device != Device::CUDA &&
        options.device != Device::OpenCL) {
        fail("options.device: unknown device " + std::to_string(int(options.device)));
    }
    if (options.query_offset < 0) {
        fail("options.query_offset: expected a position >= 0, got " + std::to_string(options.query_offset));
    }
    if (options.key_offset < 0) {
        fail("options.key_offset: expected a position >= 0, got " + std::to_string(options.key_offset));
    }
    if (options.key_splits < 0 || options.key_splits > 64) {
        fail("options.key_splits: expected 0 (automatic) to 64, got " + std::to_string(options.key_splits));
    }
    if (options.query_splits < 0 || options.query_splits > 65536) {
        fail("options.query_splits: expected 0 (automatic) to 65536, got " + std::to_string(options.query_splits));
    }
    auto isas = supported_cpu_isas();
    if (std::find(isas.begin(), isas.end(), options.cpu_isa) == isas.end()) {
        fail(std::string("options.cpu_isa: ") + to_string(options.cpu_isa) + " is not supported by this CPU");
    }
}

// Where the call runs: where the tensors are, unless options.device asks for a GPU
// for host tensors. Also checks what that device needs of the tensors.
Device check_device(const std::vector<const TensorView *> &tensors, const Options &options) {
    const TensorView &q = *tensors[0];
    for (const TensorView *t : tensors) {
        if (t->present && (t->device.device_type != q.device.device_type || t->device.device_id != q.device.device_id)) {
            fail(std::string(t->name) + ": is on " + device_string(t->device) + " but q is on " +
                 device_string(q.device) + "; all tensors must be on one device");
        }
    }
    const Device on = location(q);
    Device run_on = options.device == Device::Auto ? on : options.device;
    if (on != Device::CPU && run_on != on) {
        fail(std::string("options.device: asks for ") + to_string(options.device) + " but the tensors are on " +
             device_string(q.device) + " (copy them, or leave options.device as auto)");
    }
    for (const TensorView *t : tensors) {
        if (!t->present) continue;
        if (run_on == Device::CPU && t->on_device_only) {
            fail(std::string(t->name) + ": the buffer's current data is on a device (device_dirty) and the call "
                                        "runs on the cpu: copy it to the host first");
        }
        if (run_on != Device::CPU && t->halide && t->halide->device &&
            t->halide->device_interface != halide_interface(run_on)) {
            fail(std::string(t->name) + ": has a device allocation of another device API than " + to_string(run_on));
        }
    }
    return run_on;
}

}  // namespace

Device location(const TensorView &t) {
    switch (t.device.device_type) {
    case kDLCPU:
    case kDLCUDAHost: return Device::CPU;
    case kDLCUDA: return Device::CUDA;
    case kDLOpenCL: return Device::OpenCL;
    default: return Device::Auto;  // unsupported, rejected by validation
    }
}

bool host_readable(const TensorView &t) { return t.data && location(t) == Device::CPU && !t.on_device_only; }

bool result_to_host(const TensorView &t) { return t.present && host_readable(t) && !(t.halide && t.halide->device); }

TensorView view_of(const char *name, const DLTensor &t) {
    TensorView v;
    v.name = name;
    v.present = true;
    v.data = t.data ? static_cast<char *>(t.data) + t.byte_offset : nullptr;
    v.dtype = t.dtype;
    v.device = t.device;
    v.ndim = t.ndim;
    if (t.ndim < 0 || t.ndim > 4) return v;  // rejected by validation, with the rank
    if (t.ndim > 0 && t.shape == nullptr) {
        v.ndim = -1;
        return v;
    }
    int64_t compact = 1;
    for (int i = t.ndim - 1; i >= 0; i--) {
        v.shape[i] = t.shape[i];
        v.strides[i] = t.strides ? t.strides[i] : compact;  // null strides: compact row-major
        compact *= t.shape[i];
    }
    return v;
}

TensorView view_of(const char *name, const halide_buffer_t &b) {
    TensorView v;
    v.name = name;
    v.present = true;
    v.data = b.host;
    v.dtype = dlpack::from_halide(b.type);
    v.on_device_only = b.device_interface != nullptr && (b.flags & halide_buffer_flag_device_dirty) != 0;
    v.halide = &b;
    if (b.device && b.device_interface) {
        if (b.device_interface == halide_interface(Device::CUDA)) v.device = DLDevice{kDLCUDA, 0};
        if (b.device_interface == halide_interface(Device::OpenCL)) v.device = DLDevice{kDLOpenCL, 0};
    }
    v.ndim = b.dimensions;
    if (b.dimensions < 0 || b.dimensions > 4) return v;
    for (int i = 0; i < b.dimensions; i++) {  // Halide's dim 0 is the innermost
        v.shape[b.dimensions - 1 - i] = b.dim[i].extent;
        v.strides[b.dimensions - 1 - i] = b.dim[i].stride;
    }
    return v;
}

TensorView absent(const char *name) {
    TensorView t;
    t.name = name;
    return t;
}

namespace {

// The checks the forward and the backward share: options, q, k, v, mask, out
// and lse (their ranks, dtypes, shapes), and the device of all of them and of
// `more` (the backward's tensors). What the call writes, and the kernel, are
// checked by each operation.
Problem check_call(const TensorView &q, const TensorView &k, const TensorView &v, const TensorView &mask,
                   const TensorView &out, const TensorView &lse, const std::vector<const TensorView *> &more,
                   const Options &options) {
    check_options(options);
    check_basic(q, {4}, "4 dims [b, h, n, d]");
    check_basic(k, {3, 4}, "3 dims [b, m, d] or 4 dims [b, hk, m, d]");
    check_basic(v, {3, 4}, "3 dims [b, m, dv] or 4 dims [b, hk, m, dv]");
    check_basic(out, {4}, "4 dims [b, h, n, dv]");
    if (mask.present) check_basic(mask, {2}, "2 dims [b, m]");
    if (lse.present) check_basic(lse, {3}, "3 dims [b, h, n]");
    const DType dtype = element_type(q);
    for (const TensorView *t : {&k, &v, &out}) {
        if (t->dtype.code != q.dtype.code || t->dtype.bits != q.dtype.bits || t->dtype.lanes != q.dtype.lanes) {
            fail(std::string(t->name) + ": dtype " + dlpack::name_of(t->dtype) + " differs from q's " +
                 dlpack::name_of(q.dtype) + "; q, k, v and out must have one dtype");
        }
    }
    if (lse.present) check_float32(lse);
    if (mask.present && !is_mask_type(mask.dtype)) {
        fail(std::string("mask: expected dtype bool (or uint8), got ") + dlpack::name_of(mask.dtype));
    }
    std::vector<const TensorView *> all{&q, &k, &v, &out, &mask, &lse};
    all.insert(all.end(), more.begin(), more.end());
    const Device run_on = check_device(all, options);
    if (k.ndim != v.ndim) {
        fail("v: has " + std::to_string(v.ndim) + " dims but k has " + std::to_string(k.ndim) +
             "; k and v must both be 3-D (multi-query) or both 4-D");
    }

    Problem p;
    p.b = q.shape[0];
    p.h = q.shape[1];
    p.n = q.shape[2];
    p.d = q.shape[3];
    p.k = as_4d(k);
    p.v = as_4d(v);
    p.kv_heads = p.k.shape[1];
    p.m = p.k.shape[2];
    p.dv = p.v.shape[3];

    check_same(k, 0, p.b, q, "batch size");
    check_same(v, 0, p.b, q, "batch size");
    check_same(k, k.ndim - 1, p.d, q, "head dim");
    if (k.ndim == 4) {
        if (p.kv_heads == 0 || p.h % p.kv_heads != 0) {
            fail("k: its " + std::to_string(p.kv_heads) + " kv heads must divide q's " + std::to_string(p.h) +
                 " heads (k " + shape_string(k) + ", q " + shape_string(q) + ")");
        }
        check_same(v, 1, p.kv_heads, k, "number of kv heads");
    }
    check_same(v, v.ndim - 2, p.m, k, "number of keys");
    if (p.m == 0) fail("k: has 0 keys " + shape_string(k) + "; attention needs at least one key");
    if (p.d == 0) fail("q: head dim is 0 " + shape_string(q) + "; expected at least 1");
    if (out.shape[0] != p.b || out.shape[1] != p.h || out.shape[2] != p.n || out.shape[3] != p.dv) {
        std::ostringstream s;
        s << "out: expected shape [" << p.b << ", " << p.h << ", " << p.n << ", " << p.dv
          << "] ([b, h, n, dv] from q and v), got " << shape_string(out);
        fail(s.str());
    }
    if (mask.present && (mask.shape[0] != p.b || mask.shape[1] != p.m)) {
        fail("mask: expected shape [" + std::to_string(p.b) + ", " + std::to_string(p.m) +
             "] ([b, m] from q and k), got " + shape_string(mask));
    }
    if (lse.present && (lse.shape[0] != p.b || lse.shape[1] != p.h || lse.shape[2] != p.n)) {
        std::ostringstream s;
        s << "lse: expected shape [" << p.b << ", " << p.h << ", " << p.n << "] ([b, h, n] from q), got "
          << shape_string(lse);
        fail(s.str());
    }
    p.q = q;
    p.mask = mask;
    p.out = out;
    p.lse = lse;
    p.dtype = dtype;
    p.device = run_on;
    p.device_id = q.device.device_type == kDLCUDA ? q.device.device_id : 0;
    for (const TensorView *t : {&p.k, &p.v}) {
        if (location(*t) != Device::CPU && t->strides[3] != 1 && t->shape[3] > 1) {
            fail(std::string(t->name) + ": on a device its last dim must be dense (stride 1), got stride " +
                 std::to_string(t->strides[3]));
        }
    }
    p.scale = options.scale ? *options.scale : float(1.0 / std::sqrt(double(p.d)));
    p.seed = options.seed;
    bool dropout = options.training && options.dropout > 0.0f;
    p.drop_threshold = dropout ? attend::dropout::threshold_for(options.dropout) : 0;
    p.keep_scale = !dropout ? 1.0f : options.dropout < 1.0f ? float(1.0 / (1.0 - double(options.dropout))) : 0.0f;
    p.features = Features{mask.present, options.causal, p.drop_threshold > 0};
    p.query_offset = options.query_offset;
    p.key_offset = options.key_offset;
    if (p.query_offset > INT32_MAX - p.n) {
        fail("options.query_offset: " + std::to_string(p.query_offset) + " + n (" + std::to_string(p.n) +
             ") must be at most 2147483647 (the kernels' positions are 32-bit)");
    }
    if (p.key_offset > INT32_MAX - p.m) {
        fail("options.key_offset: " + std::to_string(p.key_offset) + " + m (" + std::to_string(p.m) +
             ") must be at most 2147483647 (the kernels' positions are 32-bit)");
    }
    // Key j is masked for query i when j > i + causal_offset. Beyond [-n, m] every
    // key is masked for every row, or none is: clamped there, the kernels' row and
    // key arithmetic stays within 32 bits whatever the offsets.
    p.causal_offset = std::clamp((options.causal_align == CausalAlign::BottomRight ? p.m - p.n : 0) +
                                     p.query_offset - p.key_offset,
                                 -p.n, p.m);

    return p;
}

// The kernel of operation `op` for the checked call p.
void select_kernel_for(Problem &p, Operation op, const Options &options) {
    KernelRequest request;
    request.operation = op;
    request.device = p.device;
    request.dtype = p.dtype;
    request.head_dim = p.d;
    request.value_dim = p.dv;
    request.features = p.features;
    request.rows_per_head = p.n;
    request.kernel = options.kernel;
    request.cpu_isa = options.cpu_isa;
    std::string why_not;
    bool no_kernel_fits = false;
    auto selection = select(request, &why_not, &no_kernel_fits);
    if (!selection) fail(no_kernel_fits ? "unsupported call: " + why_not : why_not);
    p.selection = *selection;
    const KernelEntry &kernel = *p.selection.kernel;
    if (p.selection.padded && !p.empty()) {
        for (const TensorView *t : {&p.q, &p.k, &p.v, &p.out, &p.dout, &p.grad_q, &p.grad_k, &p.grad_v}) {
            if (t->present && !host_readable(*t)) {
                fail(std::string(t->name) + ": " + kernel.name + " runs d = dv = " + std::to_string(kernel.head_dim) +
                     "; other head dims (d=" + std::to_string(p.d) + ", dv=" + std::to_string(p.dv) +
                     ") are padded on the host, so they need host tensors");
            }
        }
    }
}

// A tensor the call writes: distinct memory for each of its elements, none
// shared with `others`.
void check_written(const TensorView &t, const std::vector<const TensorView *> &others, const char *rule) {
    check_no_self_overlap(t);
    for (const TensorView *other : others) {
        if (overlaps(t, *other)) fail(std::string(t.name) + ": overlaps the memory of " + other->name + "; " + rule);
    }
}

}  // namespace

Problem validate(const TensorView &q, const TensorView &k, const TensorView &v, const TensorView &mask,
                 const TensorView &out, const TensorView &lse, const Options &options) {
    Problem p = check_call(q, k, v, mask, out, lse, {}, options);
    check_written(out, {&q, &k, &v, &mask}, "out must not alias an input");
    if (lse.present) check_written(lse, {&q, &k, &v, &mask, &out}, "lse must have memory of its own");
    select_kernel_for(p, Operation::Forward, options);
    p.pieces = plan_pieces(p, Operation::Forward);
    return p;
}

Problem validate_backward(const TensorView &q, const TensorView &k, const TensorView &v, const TensorView &mask,
                          const TensorView &out, const TensorView &lse, const TensorView &dout, const TensorView &dq,
                          const TensorView &dk, const TensorView &dv, const Options &options) {
    check_basic(dout, {4}, "4 dims [b, h, n, dv], like out");
    check_basic(dq, {4}, "4 dims [b, h, n, d], like q");
    check_basic(dk, {3, 4}, "k's dims ([b, m, d] or [b, hk, m, d])");
    check_basic(dv, {3, 4}, "v's dims ([b, m, dv] or [b, hk, m, dv])");
    if (!lse.present) fail("lse: required: the backward recomputes the weights from the forward's lse");
    Problem p = check_call(q, k, v, mask, out, lse, {&dout, &dq, &dk, &dv}, options);
    for (const TensorView *t : {&dout, &dq, &dk, &dv}) {
        if (t->dtype.code != q.dtype.code || t->dtype.bits != q.dtype.bits || t->dtype.lanes != q.dtype.lanes) {
            fail(std::string(t->name) + ": dtype " + dlpack::name_of(t->dtype) + " differs from q's " +
                 dlpack::name_of(q.dtype) + "; the gradients and dout have q's dtype");
        }
    }
    // Each gradient has its tensor's shape; dout has out's.
    auto check_like = [](const TensorView &t, const TensorView &like) {
        bool same = t.ndim == like.ndim;
        for (int i = 0; same && i < t.ndim; i++) same = t.shape[i] == like.shape[i];
        if (!same) {
            fail(std::string(t.name) + ": expected " + like.name + "'s shape " + shape_string(like) + ", got " +
                 shape_string(t));
        }
    };
    check_like(dout, out);
    check_like(dq, q);
    check_like(dk, k);
    check_like(dv, v);
    const std::vector<const TensorView *> inputs{&q, &k, &v, &mask, &out, &lse, &dout};
    check_written(dq, inputs, "the gradients must not alias an input");
    check_written(dk, inputs, "the gradients must not alias an input");
    check_written(dv, inputs, "the gradients must not alias an input");
    if (overlaps(dq, dk) || overlaps(dq, dv)) fail("dq: overlaps the memory of dk or dv; each gradient needs its own");
    if (overlaps(dk, dv)) fail("dk: overlaps the memory of dv; each gradient needs its own");
    p.dout = dout;
    p.grad_q = dq;
    p.grad_k = as_4d(dk);
    p.grad_v = as_4d(dv);
    if (p.empty()) {
        for (const TensorView *t : {&p.grad_q, &p.grad_k, &p.grad_v}) {
            if (element_count(*t) > 0 && !host_readable(*t)) {
                fail(std::string(t->name) + ": with no queries (or no columns of v) every gradient is 0, which is "
                                            "written on the host only: pass host tensors for such a call");
            }
        }
    }
    select_kernel_for(p, Operation::Backward, options);
    p.pieces = plan_pieces(p, Operation::Backward);
    return p;
}

// ---- merge ------------------------------------------------------------------

namespace {

bool same_tensor(const TensorView &a, const TensorView &b) {
    if (a.data != b.data || a.ndim != b.ndim) return false;
    for (int i = 0; i < a.ndim; i++) {
        if (a.shape[i] != b.shape[i] || a.strides[i] != b.strides[i]) return false;
    }
    return true;
}

// t's first `dims` dims equal ref's.
void check_same_shape(const TensorView &t, const TensorView &ref, int dims) {
    TensorView expected = ref;
    expected.ndim = dims;
    for (int i = 0; i < dims; i++) {
        if (t.shape[i] != ref.shape[i]) {
            fail(std::string(t.name) + ": expected shape " + shape_string(expected) + " (from " + ref.name + " " +
                 shape_string(ref) + "), got " + shape_string(t));
        }
    }
}

}  // namespace

void validate_merge(const TensorView &out_a, const TensorView &lse_a, int64_t keys_a, const TensorView &out_b,
                    const TensorView &lse_b, int64_t keys_b, const TensorView &out, const TensorView &lse) {
    for (const TensorView *t : {&out_a, &out_b, &out}) check_basic(*t, {4}, "4 dims [b, h, n, dv]");
    for (const TensorView *t : {&lse_a, &lse_b, &lse}) check_basic(*t, {3}, "3 dims [b, h, n]");
    for (const TensorView *t : {&out_a, &lse_a, &out_b, &lse_b, &out, &lse}) {
        check_float32(*t);
        if (location(*t) != Device::CPU || t->on_device_only) {
            fail(std::string(t->name) + ": is on " + device_string(t->device) +
                 "; merge runs on host memory: copy device tensors to the host first");
        }
    }
    if (keys_a < 1) fail("keys_a: expected the number of keys of part a (at least 1), got " + std::to_string(keys_a));
    if (keys_b < 1) fail("keys_b: expected the number of keys of part b (at least 1), got " + std::to_string(keys_b));
    check_same_shape(out_b, out_a, 4);
    check_same_shape(out, out_a, 4);
    for (const TensorView *t : {&lse_a, &lse_b, &lse}) check_same_shape(*t, out_a, 3);
    // Each output element is written after its own inputs are read: the same
    // tensor as an input (in place) is fine, any other overlap is not.
    check_no_self_overlap(out);
    check_no_self_overlap(lse);
    auto check_alias = [](const TensorView &written, const TensorView &input, bool may_be_it) {
        if (overlaps(written, input) && !(may_be_it && same_tensor(written, input))) {
            fail(std::string(written.name) + ": overlaps the memory of " + input.name +
                 (may_be_it ? std::string("; it may be ") + input.name + " itself (to merge in place), nothing else"
                            : std::string("; it must not")));
        }
    };
    for (const TensorView *input : {&out_a, &out_b, &lse_a, &lse_b}) {
        check_alias(out, *input, input == &out_a || input == &out_b);
        check_alias(lse, *input, input == &lse_a || input == &lse_b);
    }
    if (overlaps(out, lse)) fail("lse: overlaps the memory of out; they must be distinct");
}

}  // namespace attend::detail

// Pieces of a call. The kernels index with 32 bits: each view they get must
// span at most 2^31 - 1 elements, each stride of a dim longer than 1 must fit
// too. A larger call runs as several kernel calls on views of its tensors:
// whole batches first, then whole groups of heads (each a kv head's), then
// heads of one group, then query rows and keys (the forward only; key pieces of the same rows are
// merged by their log-sum-exp, exactly as shards are). A CPU backward also runs
// in batches or kv heads when its float32 sums would pass kMaxBackwardSumBytes.
// Every piece keeps global positions through its offsets, so masks, causal and
// dropout see the whole call.
#include <algorithm>
#include <array>
#include <atomic>

#include "internal.hpp"

namespace attend::detail {
namespace {

std::atomic<int64_t> max_view_elements{INT32_MAX};

// A CPU backward kernel sums dk and dv in float32 for all of a call's keys, and
// each task's share of dq for all of its rows, before it writes them: a call keeps
// those sums under this (backward_sum_bytes).
constexpr int64_t kMaxBackwardSumBytes = int64_t(32) << 20;

// The float32 sums of a CPU backward call of these extents, with each kv head's
// keys run as `splits` tasks (a share of dq each).
int64_t backward_sum_bytes(const Problem &p, int64_t batches, int64_t heads, int64_t splits) {
    const KernelEntry &kernel = *p.selection.kernel;
    const int64_t d = p.selection.padded ? kernel.head_dim : p.d, dv = p.selection.padded ? kernel.head_dim : p.dv;
    const int64_t kv_heads = std::max<int64_t>(1, heads / p.group());
    return int64_t(sizeof(float)) * batches * (kv_heads * p.m * (d + dv) + splits * heads * p.n * d);
}

[[noreturn]] void fail(const std::string &message) { throw std::invalid_argument("attend: " + message); }

// Which of the call's dims a tensor's dims are.
enum class Kind { PerRow, PerKey, Mask };

struct Sized {
    const TensorView *t;
    Kind kind;
};

// The call's tensors that a kernel sees, by kind (the backward's are absent,
// not present, in a forward call). No allocation: this runs on every call.
std::array<Sized, 10> kernel_tensors(const Problem &p) {
    return {{{&p.q, Kind::PerRow}, {&p.out, Kind::PerRow}, {&p.lse, Kind::PerRow}, {&p.dout, Kind::PerRow},
             {&p.grad_q, Kind::PerRow}, {&p.k, Kind::PerKey}, {&p.v, Kind::PerKey}, {&p.grad_k, Kind::PerKey},
             {&p.grad_v, Kind::PerKey}, {&p.mask, Kind::Mask}}};
}

// The kv heads of a piece's heads: whole groups, or the one group they are part of.
int64_t first_kv_head(const Piece &e, int64_t group) { return e.h0 / group; }
int64_t kv_heads_of(const Piece &e, int64_t group) { return std::max<int64_t>(1, e.heads / group); }

// The shape of t's view in a piece of these extents.
void piece_shape(const TensorView &t, Kind kind, const Piece &e, int64_t group, int64_t (&shape)[4]) {
    for (int i = 0; i < 4; i++) shape[i] = t.shape[i];
    shape[0] = e.batches;
    if (kind == Kind::Mask) {
        shape[1] = e.keys;
    } else {
        shape[1] = kind == Kind::PerRow ? e.heads : kv_heads_of(e, group);
        shape[2] = kind == Kind::PerRow ? e.rows : e.keys;
    }
}

// Elements from the first to the last element of t's view of this shape, or of
// the dense copy the runtime may make of it (padded head dim, or a head dim
// that is not dense); -1 when a dim longer than 1 has a stride past 32 bits.
int64_t kernel_span(const TensorView &t, const int64_t (&shape)[4], int64_t dense_width) {
    int64_t last = 0, count = 1;
    for (int i = 0; i < t.ndim; i++) {
        if (shape[i] == 0) return 0;
        if (shape[i] > 1 && t.strides[i] > INT32_MAX) return -1;
        last += (shape[i] - 1) * t.strides[i];
        count *= i == 3 ? std::max(shape[i], dense_width) : shape[i];
    }
    return std::max(last + 1, count);
}

// The first of the call's tensors whose view in a piece of extents e the
// kernels cannot index (null if none), and its span.
const TensorView *too_large(const Problem &p, const Piece &e, int64_t *span = nullptr) {
    const int64_t width = p.selection.padded ? p.selection.kernel->head_dim : 0;
    for (const Sized &s : kernel_tensors(p)) {
        if (!s.t->present) continue;
        int64_t shape[4];
        piece_shape(*s.t, s.kind, e, p.group(), shape);
        const int64_t elements = kernel_span(*s.t, shape, s.t->ndim == 4 ? width : 0);
        if (elements < 0 || elements > max_view_elements.load()) {
            if (span) *span = elements;
            return s.t;
        }
    }
    return nullptr;
}

// The largest count in [1, total] for which fits(count) holds (fits is
// monotone: a smaller piece fits if a larger one does); 0 if none.
template <class Fits>
int64_t largest(int64_t total, Fits fits) {
    if (!fits(1)) return 0;
    int64_t lo = 1, hi = total;  // fits(lo)
    while (lo < hi) {
        const int64_t mid = lo + (hi - lo + 1) / 2;
        if (fits(mid)) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// Equal pieces of at most `most` out of `total`.
int64_t balanced(int64_t total, int64_t most) {
    const int64_t pieces = (total + most - 1) / most;
    return (total + pieces - 1) / pieces;
}

std::string span_text(const TensorView &t, int64_t span) {
    return span < 0 ? std::string(t.name) + ": a stride past 2147483647 elements"
                    : std::string(t.name) + ": " + std::to_string(span) + " elements";
}

}  // namespace

int32_t backward_key_splits(const Problem &p) {
    if (p.selection.kernel->device != Device::CPU || p.empty()) return 1;
    const int64_t tasks = p.b * p.kv_heads, wanted = (kBackwardTasks + tasks - 1) / tasks;
    // As many as one kv head's sums allow (the smallest piece of a backward call).
    const int64_t one_kv_head = backward_sum_bytes(p, 1, p.group(), 0);
    const int64_t share = backward_sum_bytes(p, 1, p.group(), 1) - one_kv_head;
    const int64_t allowed = share > 0 ? (kMaxBackwardSumBytes - one_kv_head) / share : wanted;
    const int64_t by_keys = p.m / kMinBackwardTaskKeys;
    return int32_t(std::clamp<int64_t>(std::min({wanted, allowed, by_keys}), 1, 64));
}

std::vector<Piece> plan_pieces(const Problem &p, Operation op) {
    const int64_t group = p.group();
    const Piece whole{0, p.b, 0, p.h, 0, p.n, 0, p.m};
    if (p.empty() || p.m == 0) return {whole};
    const KernelEntry &kernel = *p.selection.kernel;
    const bool bound_sums = op == Operation::Backward && kernel.device == Device::CPU;
    const int64_t key_splits = bound_sums ? backward_key_splits(p) : 1;
    auto fits = [&](const Piece &e) {
        const int64_t kv_heads = e.batches * kv_heads_of(e, group);  // a soft bound: one kv head runs whatever
        if (bound_sums && kv_heads > 1 &&
            backward_sum_bytes(p, e.batches, e.heads, key_splits) > kMaxBackwardSumBytes) {
            return false;
        }
        return too_large(p, e) == nullptr;
    };
    if (fits(whole)) return {whole};

    int64_t span = 0;
    if (const TensorView *t = too_large(p, whole, &span)) {
        for (const Sized &s : kernel_tensors(p)) {
            if (s.t->present && !host_readable(*s.t)) {
                fail(span_text(*t, span) + " is more than the kernels' 32-bit indexing (2147483647) allows: such a "
                     "call runs in pieces, which needs host tensors (" + s.t->name + " is on a device)");
            }
        }
    }
    // Whole batches, else whole groups of heads of one batch, else heads of one
    // group, else (forward only) rows and keys.
    Piece e = whole;
    e.batches = largest(p.b, [&](int64_t x) { return fits({0, x, 0, p.h, 0, p.n, 0, p.m}); });
    if (e.batches == 0) {
        e.batches = 1;
        e.heads = group * largest(p.kv_heads, [&](int64_t x) { return fits({0, 1, 0, x * group, 0, p.n, 0, p.m}); });
    }
    if (e.heads == 0 && op == Operation::Backward) {  // dk and dv sum over a group's heads: never split
        const TensorView *t = too_large(p, {0, 1, 0, group, 0, p.n, 0, p.m}, &span);
        fail(span_text(*t, span) + " for one batch and one kv head's heads, more than the kernels' 32-bit "
             "indexing (2147483647 elements per view) allows; the backward runs in pieces of whole batches and "
             "groups of heads only");
    }
    if (e.heads == 0) e.heads = largest(group, [&](int64_t x) { return fits({0, 1, 0, x, 0, p.n, 0, p.m}); });
    if (e.heads == 0) {
        e.heads = 1;
        if (const TensorView *t = too_large(p, {0, 1, 0, 1, 0, 1, 0, 1}, &span)) {
            fail(span_text(*t, span) + " for one row of one head, more than the kernels' 32-bit indexing "
                 "(2147483647 elements per view) allows");
        }
        e.rows = largest(p.n, [&](int64_t x) { return fits({0, 1, 0, 1, 0, x, 0, 1}); });
        e.keys = largest(p.m, [&](int64_t x) { return fits({0, 1, 0, 1, 0, 1, 0, x}); });
    }
    e.batches = balanced(p.b, e.batches);
    // Heads: whole groups balanced over the kv heads, or parts of each group balanced within it.
    e.heads = e.heads >= group ? group * balanced(p.kv_heads, e.heads / group) : balanced(group, e.heads);
    e.rows = balanced(p.n, e.rows);
    e.keys = balanced(p.m, e.keys);

    std::vector<Piece> pieces;
    for (int64_t b0 = 0; b0 < p.b; b0 += e.batches) {
        for (int64_t h0 = 0; h0 < p.h;) {
            const int64_t group_end = e.heads >= group ? p.h : (h0 / group + 1) * group;
            const int64_t heads = std::min(e.heads, group_end - h0);
            for (int64_t i0 = 0; i0 < p.n; i0 += e.rows) {
                for (int64_t j0 = 0; j0 < p.m; j0 += e.keys) {  // innermost: a row's key pieces are consecutive
                    pieces.push_back({b0, std::min(e.batches, p.b - b0), h0, heads, i0, std::min(e.rows, p.n - i0),
                                      j0, std::min(e.keys, p.m - j0)});
                }
            }
            h0 += heads;
        }
    }
    return pieces;
}

namespace {

// t restricted to [start[i], start[i] + extent[i]) in each of its dims.
TensorView sub_view(const TensorView &t, std::initializer_list<std::pair<int64_t, int64_t>> ranges) {
    if (!t.present) return t;
    TensorView s = t;
    s.halide = nullptr;  // host memory only (plan_pieces): the view's data is all there is
    int i = 0;
    int64_t offset = 0;
    for (const auto &[start, extent] : ranges) {
        offset += start * t.strides[i];
        s.shape[i++] = extent;
    }
    s.data = static_cast<uint8_t *>(t.data) + offset * ((t.dtype.bits + 7) / 8);
    return s;
}

}  // namespace

Problem piece_of(const Problem &p, const Piece &s) {
    Problem c = p;
    const int64_t g0 = first_kv_head(s, p.group()), kv_heads = kv_heads_of(s, p.group());
    for (TensorView *t : {&c.q, &c.out, &c.lse, &c.dout, &c.grad_q}) {
        *t = sub_view(*t, {{s.b0, s.batches}, {s.h0, s.heads}, {s.i0, s.rows}});
    }
    for (TensorView *t : {&c.k, &c.v, &c.grad_k, &c.grad_v}) {
        *t = sub_view(*t, {{s.b0, s.batches}, {g0, kv_heads}, {s.j0, s.keys}});
    }
    c.mask = sub_view(c.mask, {{s.b0, s.batches}, {s.j0, s.keys}});
    c.b = s.batches;
    c.kv_heads = kv_heads;
    c.h = s.heads;
    c.n = s.rows;
    c.m = s.keys;
    c.batch_offset += s.b0;
    c.head_offset += s.h0;
    c.query_offset += s.i0;
    c.key_offset += s.j0;
    c.causal_offset = std::clamp(p.causal_offset + s.i0 - s.j0, -c.n, c.m);  // as validation clamps it
    c.pieces = {Piece{0, c.b, 0, c.h, 0, c.n, 0, c.m}};
    return c;
}

}  // namespace attend::detail

namespace attend::testing {

int64_t set_max_kernel_view_elements(int64_t elements) {
    if (elements < 1 || elements > INT32_MAX) {
        throw std::invalid_argument("attend: elements: expected 1 to 2147483647, got " + std::to_string(elements));
    }
    return detail::max_view_elements.exchange(elements);
}

}  // namespace attend::testing

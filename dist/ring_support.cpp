// ring_support.hpp's functions.
#include "ring_support.hpp"

#include <algorithm>
#include <climits>
#include <cstring>

#include "attend/dlpack_types.hpp"
#include "attend/half.hpp"

namespace attend::dist::detail {

void fail(const std::string &message) { throw std::invalid_argument("attend: " + message); }

void check_mpi(int code, const char *what) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    throw Error(std::string("attend: ") + what + " failed: " + std::string(text, size_t(length)));
}

size_t element_bytes(const DLTensor &t) { return size_t(t.dtype.bits * t.dtype.lanes + 7) / 8; }

bool on_host(const DLTensor &t) { return t.device.device_type == kDLCPU || t.device.device_type == kDLCUDAHost; }

// Row by row along the last dim: a memcpy where both are dense there and of one type.
void convert(const View &from, const View &to) {
    const auto from_type = dlpack::dtype_of(from.dtype), to_type = dlpack::dtype_of(to.dtype);
    const bool same = !from_type || !to_type || *from_type == *to_type;
    const size_t last = from.shape.size() - 1, bytes = from.bytes();
    const int64_t length = from.shape[last], from_step = from.strides[last], to_step = to.strides[last];
    auto load = [&](const uint8_t *p) {
        if (*from_type == DType::Float32) {
            float x;
            std::memcpy(&x, p, sizeof x);
            return x;
        }
        uint16_t bits;
        std::memcpy(&bits, p, sizeof bits);
        return bits_to_float(bits, *from_type);
    };
    auto store = [&](uint8_t *p, float x) {
        if (*to_type == DType::Float32) {
            std::memcpy(p, &x, sizeof x);
        } else {
            const uint16_t bits = float_to_bits(x, *to_type);
            std::memcpy(p, &bits, sizeof bits);
        }
    };
    std::vector<int64_t> rows = from.shape;
    rows[last] = 1;
    for_each_index(rows, [&](const std::vector<int64_t> &i) {
        const uint8_t *source = from.at(i);
        uint8_t *target = to.at(i);
        if (same && from_step == 1 && to_step == 1) {
            std::memcpy(target, source, size_t(length) * bytes);
            return;
        }
        for (int64_t e = 0; e < length; e++) {
            const uint8_t *x = source + e * from_step * int64_t(bytes);
            uint8_t *y = target + e * to_step * int64_t(to.bytes());
            if (same) std::memcpy(y, x, bytes);
            else store(y, load(x));
        }
    });
}

CallShape shape_of(const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask,
                   const DLTensor *lse) {
    const bool mqa = k.ndim == 3;
    return CallShape{q.shape[0],     q.shape[1],   mqa ? 1 : k.shape[1],    q.shape[2],
                     k.shape[mqa ? 1 : 2],         q.shape[3],              v.shape[v.ndim - 1],
                     q.dtype.code,   q.dtype.bits, k.ndim, mask != nullptr, lse != nullptr};
}

RingPlan plan_ring(MPI_Comm comm, const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask,
                   const DLTensor &out, const DLTensor *lse, const Options &options, Layout layout,
                   const std::function<void()> &placement_checks, const std::function<View()> &host_mask) {
    // Each rank's shard on its own, then the shapes of all of them.
    RingPlan plan;
    MPI_Comm_rank(comm, &plan.rank);
    MPI_Comm_size(comm, &plan.ranks);
    const int rank = plan.rank, ranks = plan.ranks;
    collectively(comm, [&] {
        check_forward(q, k, v, mask, out, lse, options);
        placement_checks();
        const int64_t n = q.shape[2], m = k.shape[k.ndim - 2];
        if (layout == Layout::ZigZag && (n % 2 != 0 || m % 2 != 0)) {
            fail("ring_forward: the zig-zag layout holds two equal chunks per rank: n and m must be even, got n=" +
                 std::to_string(n) + ", m=" + std::to_string(m));
        }
        plan.query_chunks = chunks_of(n * ranks, rank, ranks, layout);
    });
    const CallShape mine = plan.shape = shape_of(q, k, v, mask, lse);
    std::vector<CallShape> all(static_cast<size_t>(ranks));
    check_mpi(MPI_Allgather(&mine, CallShape::kFields, MPI_INT64_T, all.data(), CallShape::kFields, MPI_INT64_T,
                            comm),
              "MPI_Allgather");
    const int64_t total_n = plan.total_n = mine.n * ranks, total_m = plan.total_m = mine.m * ranks;
    // Causal: key position j is masked for query position i when j > i + shift.
    const int64_t shift = plan.shift = options.causal && options.causal_align == CausalAlign::BottomRight ? total_m - total_n : 0;
    collectively(comm, [&] {
        const auto *first = reinterpret_cast<const int64_t *>(&all[0]), *own = reinterpret_cast<const int64_t *>(&mine);
        for (int f = 0; f < CallShape::kFields; f++) {
            if (own[f] != first[f]) {
                fail(std::string("ring_forward: this rank's ") + CallShape::kNames[f] + " is " +
                     std::to_string(own[f]) +
                     ", rank 0's " + std::to_string(first[f]) + ": every rank's shard must have the same shapes");
            }
        }
        const bool dropout = options.training && options.dropout > 0.0f;
        if (dropout && shift != 0) {
            fail("ring_forward: bottom-right causal with dropout needs as many queries as keys (the whole "
                 "sequence has " + std::to_string(total_n) + " and " + std::to_string(total_m) + ")");
        }
        if (options.query_offset + total_n > INT32_MAX || options.key_offset + total_m > INT32_MAX) {
            fail("ring_forward: the whole sequence's positions pass 2147483647");
        }
    });

    // A row may have every key masked when its diagonal is before its batch's
    // first unmasked key (without a mask: the first key).
    int64_t &first_unmasked = plan.first_unmasked = options.key_offset;
    if (options.causal && mask) {
        const View m_view = host_mask();
        std::vector<int64_t> firsts(size_t(mine.b), INT64_MAX), global(size_t(mine.b));
        const auto key_chunks = chunks_of(total_m, rank, ranks, layout);
        for (int64_t b = 0; b < mine.b; b++) {
            int64_t at = 0;
            for (const Chunk &c : key_chunks) {
                for (int64_t j = 0; j < c.count; j++) {
                    if (*m_view.at({b, at + j}) != 0) firsts[size_t(b)] = std::min(firsts[size_t(b)], c.start + j);
                }
                at += c.count;
            }
        }
        check_mpi(MPI_Allreduce(firsts.data(), global.data(), int(mine.b), MPI_INT64_T, MPI_MIN, comm),
                  "MPI_Allreduce");
        for (int64_t f : global) {
            first_unmasked = f == INT64_MAX ? INT64_MAX : std::max(first_unmasked, options.key_offset + f);
        }
    }
    return plan;
}

Shard shard_in(uint8_t *buffer, const CallShape &shape, const DLTensor &k, const DLTensor &v, const DLTensor *mask,
               DLDevice device) {
    const int64_t b = shape.b, hk = shape.kv_heads, m = shape.m;
    const size_t k_bytes = size_t(b * hk * m * shape.d) * element_bytes(k);
    const size_t v_bytes = size_t(b * hk * m * shape.dv) * element_bytes(v);
    Shard s;
    s.keys = View({b, hk, m, shape.d}, k.dtype, buffer);
    s.values = View({b, hk, m, shape.dv}, v.dtype, buffer + k_bytes);
    if (mask) s.mask = View({b, m}, mask->dtype, buffer + k_bytes + v_bytes);
    s.bytes = k_bytes + v_bytes + (mask ? size_t(b * m) : 0);
    s.keys.device = s.values.device = s.mask.device = device;
    return s;
}

void forward_pair(const View &q, const Shard &shard, const Pair &pair, const View &out, const View &lse,
                  const Options &options) {
    const bool masked = !shard.mask.shape.empty();
    const View q_rows = q.slice(2, pair.local_row, pair.rows), k_rows = shard.keys.slice(2, pair.local_key, pair.keys),
               v_rows = shard.values.slice(2, pair.local_key, pair.keys),
               mask_rows = masked ? shard.mask.slice(1, pair.local_key, pair.keys) : View();
    const DLTensor tq = q_rows.dl(), tk = k_rows.dl(), tv = v_rows.dl(), tmask = mask_rows.dl(), tout = out.dl(),
                   tlse = lse.dl();
    forward(tq, tk, tv, masked ? &tmask : nullptr, tout, &tlse, options);
}

}  // namespace attend::dist::detail

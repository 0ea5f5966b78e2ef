// What the host ring (ring.cpp) and the NCCL ring (ring_nccl.cpp) share:
// views of tensors, the ring's communicator, and the plan every rank agrees on
// before a ring starts (its checks, shapes and causal skipping), with the
// chunk pairs it computes.
#pragma once

#include <functional>
#include <string>
#include <vector>

#include "attend/dist.hpp"

namespace attend::dist::detail {

[[noreturn]] void fail(const std::string &message);

// An MPI call that failed (the ring's communicator returns errors) is an attend::Error.
void check_mpi(int code, const char *what);

size_t element_bytes(const DLTensor &t);
bool on_host(const DLTensor &t);

// A view of a tensor that owns its shape and strides (in elements).
struct View {
    void *data = nullptr;  // the first element
    DLDataType dtype{};
    DLDevice device{kDLCPU, 0};
    std::vector<int64_t> shape, strides;

    View() = default;
    explicit View(const DLTensor &t) : dtype(t.dtype), device(t.device), shape(t.shape, t.shape + t.ndim) {
        data = static_cast<uint8_t *>(t.data) + t.byte_offset;
        strides.resize(shape.size());
        int64_t stride = 1;
        for (int i = t.ndim - 1; i >= 0; i--) {
            strides[size_t(i)] = t.strides ? t.strides[i] : stride;
            stride *= shape[size_t(i)];
        }
    }
    // A dense C-order view of `storage`.
    View(std::vector<int64_t> dims, DLDataType type, void *storage)
        : data(storage), dtype(type), shape(std::move(dims)) {
        strides.resize(shape.size());
        int64_t stride = 1;
        for (int i = int(shape.size()) - 1; i >= 0; i--) {
            strides[size_t(i)] = stride;
            stride *= shape[size_t(i)];
        }
    }
    int64_t numel() const {
        int64_t count = 1;
        for (int64_t s : shape) count *= s;
        return count;
    }
    size_t bytes() const { return size_t(dtype.bits * dtype.lanes + 7) / 8; }
    // [start, start + count) of dim `dim`.
    View slice(int dim, int64_t start, int64_t count) const {
        View s = *this;
        s.data = static_cast<uint8_t *>(data) + start * strides[size_t(dim)] * int64_t(bytes());
        s.shape[size_t(dim)] = count;
        return s;
    }
    // As a 4-D [b, 1, m, e] view when it is a 3-D [b, m, e] one (multi-query).
    View as_4d() const {
        if (shape.size() != 3) return *this;
        View s = *this;
        s.shape = {shape[0], 1, shape[1], shape[2]};
        s.strides = {strides[0], 0, strides[1], strides[2]};
        return s;
    }
    // A DLTensor over the view (valid while the view lives).
    DLTensor dl() const {
        DLTensor t{};
        t.data = data;
        t.device = device;
        t.ndim = int(shape.size());
        t.dtype = dtype;
        t.shape = const_cast<int64_t *>(shape.data());
        t.strides = const_cast<int64_t *>(strides.data());
        return t;
    }
    uint8_t *at(const std::vector<int64_t> &index) const {
        int64_t offset = 0;
        for (size_t i = 0; i < index.size(); i++) offset += index[i] * strides[i];
        return static_cast<uint8_t *>(data) + offset * int64_t(bytes());
    }
};

// Calls visit(index) for every index of `shape` (C order).
template <class Visit>
void for_each_index(const std::vector<int64_t> &shape, Visit visit) {
    for (int64_t s : shape) {
        if (s == 0) return;
    }
    std::vector<int64_t> index(shape.size(), 0);
    for (;;) {
        visit(index);
        int d = int(shape.size()) - 1;
        while (d >= 0 && ++index[size_t(d)] == shape[size_t(d)]) index[size_t(d--)] = 0;
        if (d < 0) return;
    }
}

// to = from, converting between float32, float16 and bfloat16 (or copying the
// bytes of any other equal types); host memory.
void convert(const View &from, const View &to);

// The ring's own communicator (errors returned, not fatal), freed with it.
struct RingComm {
    MPI_Comm comm = MPI_COMM_NULL;
    explicit RingComm(MPI_Comm parent) {
        check_mpi(MPI_Comm_dup(parent, &comm), "MPI_Comm_dup");
        MPI_Comm_set_errhandler(comm, MPI_ERRORS_RETURN);
    }
    ~RingComm() { MPI_Comm_free(&comm); }
    RingComm(const RingComm &) = delete;
    RingComm &operator=(const RingComm &) = delete;
};

// One rank's call: the shapes every rank must share, in one array.
struct CallShape {
    int64_t b, h, kv_heads, n, m, d, dv, dtype_code, dtype_bits, k_dims, has_mask, has_lse;
    static constexpr int kFields = 12;
    static constexpr const char *kNames[kFields] = {"b", "h", "kv heads", "n", "m", "d", "dv", "dtype code",
                                                   "dtype bits", "k dims", "mask", "lse"};
};

CallShape shape_of(const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask,
                   const DLTensor *lse);

// What every rank agreed on before a ring starts.
struct RingPlan {
    int rank = 0, ranks = 1;
    CallShape shape{};
    std::vector<Chunk> query_chunks;  // this rank's
    int64_t total_n = 0, total_m = 0;  // the whole sequence's queries and keys
    int64_t shift = 0;                 // causal: key position j is masked for query position i when j > i + shift
    // Causal: the latest first unmasked key over the batches (INT64_MAX: a batch
    // has none). Rows before it may have every key masked.
    int64_t first_unmasked = 0;
};

// The checks and agreements of a ring call, collective over comm: each rank's
// own checks (forward()'s, then placement_checks: where its tensors must be),
// then the shapes of all ranks, then with causal and a mask the first unmasked
// key of each batch (host_mask: this rank's mask in host memory).
RingPlan plan_ring(MPI_Comm comm, const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask,
                   const DLTensor &out, const DLTensor *lse, const Options &options, Layout layout,
                   const std::function<void()> &placement_checks, const std::function<View()> &host_mask);

// One (query chunk, key chunk) pair a ring step computes: the chunk's rows of
// this rank's q ([local_row, local_row + rows)), the keys of the shard held
// ([local_key, local_key + keys)), and forward()'s options at their positions.
struct Pair {
    size_t query_chunk = 0;
    int64_t local_row = 0, rows = 0, local_key = 0, keys = 0;
    Options options;
};

// Calls visit(pair) for each pair this rank computes against the shard of
// `owner`. Causal skips a key chunk wholly above a query chunk's diagonal,
// unless a row of the chunk may have every key masked: such a row weighs every
// key uniformly, beyond the diagonal too, as the original module does.
template <class Visit>
void for_each_pair(const RingPlan &plan, const Options &options, Layout layout, int owner, Visit visit) {
    const auto key_chunks = chunks_of(plan.total_m, owner, plan.ranks, layout);
    int64_t local_row = 0;
    for (size_t qc = 0; qc < plan.query_chunks.size(); qc++) {
        const int64_t row_position = options.query_offset + plan.query_chunks[qc].start;
        const int64_t rows = plan.query_chunks[qc].count;
        int64_t local_key = 0;
        for (const Chunk &kc : key_chunks) {
            const int64_t key_position = options.key_offset + kc.start;
            const bool above_diagonal = key_position > row_position + rows - 1 + plan.shift;
            const bool no_row_all_masked =
                plan.first_unmasked != INT64_MAX && row_position + plan.shift >= plan.first_unmasked;
            if (!(options.causal && above_diagonal && no_row_all_masked)) {
                Pair pair{qc, local_row, rows, local_key, kc.count, options};
                pair.options.causal_align = CausalAlign::TopLeft;  // the diagonal by global positions
                pair.options.query_offset = row_position + std::max<int64_t>(plan.shift, 0);
                pair.options.key_offset = key_position - std::min<int64_t>(plan.shift, 0);
                visit(pair);
            }
            local_key += kc.count;
        }
        local_row += rows;
    }
}

// A shard as it travels: k [b, hk, m, d], v [b, hk, m, dv] and the mask [b, m]
// packed dense, one after the other, in `buffer` (host or device memory).
struct Shard {
    View keys, values, mask;  // mask: empty without one
    size_t bytes = 0;         // of the three
};
Shard shard_in(uint8_t *buffer, const CallShape &shape, const DLTensor &k, const DLTensor &v, const DLTensor *mask,
               DLDevice device);

// One pair's forward(): q's rows of the pair's query chunk against the pair's
// keys of the shard, into out [b, h, rows, dv] and lse [b, h, rows].
void forward_pair(const View &q, const Shard &shard, const Pair &pair, const View &out, const View &lse,
                  const Options &options);

}  // namespace attend::dist::detail

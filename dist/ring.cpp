// Ring attention over MPI (include/attend/dist.hpp): the layouts and their
// shard/unshard copies, the collective agreement on errors, and ring_forward.
#include "attend/dist.hpp"

#include <algorithm>
#include <chrono>
#include <climits>
#include <cstring>
#include <memory>
#include <string>

#include "attend/dlpack_types.hpp"
#include "attend/half.hpp"

namespace attend::dist {
namespace {

[[noreturn]] void fail(const std::string &message) { throw std::invalid_argument("attend: " + message); }

// An MPI call that failed (the ring's communicator returns errors) is an attend::Error.
void check_mpi(int code, const char *what) {
    if (code == MPI_SUCCESS) return;
    char text[MPI_MAX_ERROR_STRING];
    int length = 0;
    MPI_Error_string(code, text, &length);
    throw Error(std::string("attend: ") + what + " failed: " + std::string(text, size_t(length)));
}

size_t element_bytes(const DLTensor &t) { return size_t(t.dtype.bits * t.dtype.lanes + 7) / 8; }

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
// bytes of any other equal types), row by row along the last dim (a memcpy
// where both are dense there and of one type).
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

bool on_host(const DLTensor &t) { return t.device.device_type == kDLCPU || t.device.device_type == kDLCUDAHost; }

// The sequence chunks of whole and local in step: calls copy(whole's view, local's view) per chunk.
template <class Copy>
void for_each_chunk(const DLTensor &whole, int sequence_dim, int rank, int ranks, Layout layout, const DLTensor &local,
                    const char *operation, Copy copy) {
    if (sequence_dim < 0 || sequence_dim >= whole.ndim || whole.ndim != local.ndim) {
        fail(std::string(operation) + ": sequence_dim " + std::to_string(sequence_dim) + " of tensors of " +
             std::to_string(whole.ndim) + " and " + std::to_string(local.ndim) + " dims");
    }
    if (!on_host(whole) || !on_host(local)) fail(std::string(operation) + ": host tensors only");
    if (element_bytes(whole) != element_bytes(local)) fail(std::string(operation) + ": the dtypes differ");
    const auto chunks = chunks_of(whole.shape[sequence_dim], rank, ranks, layout);
    int64_t local_length = 0;
    for (const Chunk &c : chunks) local_length += c.count;
    for (int i = 0; i < whole.ndim; i++) {
        const int64_t expected = i == sequence_dim ? local_length : whole.shape[i];
        if (local.shape[i] != expected) {
            fail(std::string(operation) + ": local's dim " + std::to_string(i) + " is " +
                 std::to_string(local.shape[i]) +
                 ", expected " + std::to_string(expected) + " (rank " + std::to_string(rank) + " of " +
                 std::to_string(ranks) + ")");
        }
    }
    const View w(whole), l(local);
    int64_t at = 0;
    for (const Chunk &c : chunks) {
        copy(w.slice(sequence_dim, c.start, c.count), l.slice(sequence_dim, at, c.count));
        at += c.count;
    }
}

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

// Sends and receives of one buffer, in messages of at most 1 GiB (MPI counts are int).
constexpr size_t kMaxMessage = size_t(1) << 30;

void post(std::vector<MPI_Request> &requests, const uint8_t *send, uint8_t *receive, size_t bytes, int to, int from,
          MPI_Comm comm) {
    int tag = 0;
    for (size_t at = 0; at < bytes; at += kMaxMessage, tag++) {
        const int count = int(std::min(kMaxMessage, bytes - at));
        requests.emplace_back();
        check_mpi(MPI_Isend(send + at, count, MPI_BYTE, to, tag, comm, &requests.back()), "MPI_Isend");
        requests.emplace_back();
        check_mpi(MPI_Irecv(receive + at, count, MPI_BYTE, from, tag, comm, &requests.back()), "MPI_Irecv");
    }
}

// One rank's call: the shapes every rank must share, in one array.
struct CallShape {
    int64_t b, h, kv_heads, n, m, d, dv, dtype_code, dtype_bits, k_dims, has_mask, has_lse;
    static constexpr int kFields = 12;
    static constexpr const char *kNames[kFields] = {"b", "h", "kv heads", "n", "m", "d", "dv", "dtype code",
                                                   "dtype bits", "k dims", "mask", "lse"};
};

CallShape shape_of(const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask,
                   const DLTensor *lse) {
    const bool mqa = k.ndim == 3;
    return CallShape{q.shape[0],     q.shape[1],   mqa ? 1 : k.shape[1],    q.shape[2],
                     k.shape[mqa ? 1 : 2],         q.shape[3],              v.shape[v.ndim - 1],
                     q.dtype.code,   q.dtype.bits, k.ndim, mask != nullptr, lse != nullptr};
}

}  // namespace

std::vector<Chunk> chunks_of(int64_t length, int rank, int ranks, Layout layout) {
    if (ranks < 1 || rank < 0 || rank >= ranks) {
        fail("rank " + std::to_string(rank) + " of " + std::to_string(ranks) + ": expected 0 <= rank < ranks");
    }
    const int64_t parts = layout == Layout::ZigZag ? 2 * int64_t(ranks) : ranks;
    if (length < 0 || length % parts != 0) {
        fail("a sequence of " + std::to_string(length) + " positions does not divide into " + std::to_string(parts) +
             " equal chunks (" + (layout == Layout::ZigZag ? "zig-zag: 2 per rank" : "contiguous: 1 per rank") + ")");
    }
    const int64_t size = length / parts;
    if (layout == Layout::Contiguous) return {{rank * size, size}};
    return {{rank * size, size}, {(parts - 1 - rank) * size, size}};
}

void shard(const DLTensor &whole, int sequence_dim, int rank, int ranks, Layout layout, const DLTensor &local) {
    for_each_chunk(whole, sequence_dim, rank, ranks, layout, local, "shard",
                   [](const View &w, const View &l) { convert(w, l); });
}

void unshard(const DLTensor &local, int sequence_dim, int rank, int ranks, Layout layout, const DLTensor &whole) {
    for_each_chunk(whole, sequence_dim, rank, ranks, layout, local, "unshard",
                   [](const View &w, const View &l) { convert(l, w); });
}

void collectively(MPI_Comm comm, const std::function<void()> &step) {
    int rank = 0;
    MPI_Comm_rank(comm, &rank);
    int kind = 0;  // 0: fine, 1: invalid_argument, 2: any other failure
    std::string message;
    try {
        step();
    } catch (const std::invalid_argument &e) {
        kind = 1;
        message = e.what();
    } catch (const std::exception &e) {
        kind = 2;
        message = e.what();
    }
    const int mine = kind ? rank : INT_MAX;
    int lowest = INT_MAX;
    check_mpi(MPI_Allreduce(&mine, &lowest, 1, MPI_INT, MPI_MIN, comm), "MPI_Allreduce");
    if (lowest == INT_MAX) return;
    int header[2] = {kind, int(message.size())};
    check_mpi(MPI_Bcast(header, 2, MPI_INT, lowest, comm), "MPI_Bcast");
    message.resize(size_t(header[1]));
    check_mpi(MPI_Bcast(message.data(), header[1], MPI_CHAR, lowest, comm), "MPI_Bcast");
    const std::string prefix = "attend: ";
    if (message.compare(0, prefix.size(), prefix) == 0) message.erase(0, prefix.size());
    const std::string what = prefix + "rank " + std::to_string(lowest) + ": " + message;
    if (header[0] == 1) throw std::invalid_argument(what);
    throw Error(what);
}

void ring_forward(const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask, const DLTensor &out,
                  const DLTensor *lse, MPI_Comm parent, const Options &options, Layout layout, RingStats *stats) {
    const RingComm ring(parent);
    int rank = 0, ranks = 1;
    MPI_Comm_rank(ring.comm, &rank);
    MPI_Comm_size(ring.comm, &ranks);

    // Each rank's shard on its own, then the shapes of all of them.
    std::vector<Chunk> query_chunks;
    collectively(ring.comm, [&] {
        check_forward(q, k, v, mask, out, lse, options);
        for (const DLTensor *t : {&q, &k, &v, mask, &out, lse}) {
            if (t && !on_host(*t)) fail("ring_forward: host tensors only");
        }
        const int64_t n = q.shape[2], m = k.shape[k.ndim - 2];
        if (layout == Layout::ZigZag && (n % 2 != 0 || m % 2 != 0)) {
            fail("ring_forward: the zig-zag layout holds two equal chunks per rank: n and m must be even, got n=" +
                 std::to_string(n) + ", m=" + std::to_string(m));
        }
        query_chunks = chunks_of(n * ranks, rank, ranks, layout);
    });
    const CallShape mine = shape_of(q, k, v, mask, lse);
    std::vector<CallShape> all(static_cast<size_t>(ranks));
    check_mpi(MPI_Allgather(&mine, CallShape::kFields, MPI_INT64_T, all.data(), CallShape::kFields, MPI_INT64_T,
                            ring.comm),
              "MPI_Allgather");
    const int64_t total_n = mine.n * ranks, total_m = mine.m * ranks;
    // Causal: key position j is masked for query position i when j > i + shift.
    const int64_t shift = options.causal && options.causal_align == CausalAlign::BottomRight ? total_m - total_n : 0;
    collectively(ring.comm, [&] {
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

    // Causal: a key chunk wholly above the diagonal of a query chunk is skipped,
    // unless a row of it has every key masked (a padding mask up to its
    // diagonal): such a row weighs every key uniformly, beyond the diagonal too.
    // A row is so when its diagonal is before its batch's first unmasked key.
    int64_t first_unmasked = options.key_offset;  // the latest over the batches
    if (options.causal && mask) {
        const View m_view(*mask);
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
        check_mpi(MPI_Allreduce(firsts.data(), global.data(), int(mine.b), MPI_INT64_T, MPI_MIN, ring.comm),
                  "MPI_Allreduce");
        for (int64_t f : global) {
            first_unmasked = f == INT64_MAX ? INT64_MAX : std::max(first_unmasked, options.key_offset + f);
        }
    }

    // This rank's keys, values and mask, packed dense: what travels. Only the kv heads.
    const int64_t b = mine.b, hk = mine.kv_heads, m = mine.m, d = mine.d, dv = mine.dv;
    const size_t element = element_bytes(q);
    const size_t k_bytes = size_t(b * hk * m * d) * element, v_bytes = size_t(b * hk * m * dv) * element;
    const size_t mask_bytes = mask ? size_t(b * m) : 0;
    std::vector<uint8_t> buffers[2];
    for (auto &buffer : buffers) buffer.resize(k_bytes + v_bytes + mask_bytes);
    convert(View(k).as_4d(), View({b, hk, m, d}, k.dtype, buffers[0].data()));
    convert(View(v).as_4d(), View({b, hk, m, dv}, v.dtype, buffers[0].data() + k_bytes));
    if (mask) convert(View(*mask), View({b, m}, mask->dtype, buffers[0].data() + k_bytes + v_bytes));

    // Per query chunk: the merged attention so far (float32) and its key count.
    const DType dtype = *dlpack::dtype_of(q.dtype);
    const DLDataType f32{kDLFloat, 32, 1};
    struct Merged {
        std::vector<float> out, lse;
        int64_t keys = 0;
    };
    std::vector<Merged> merged(query_chunks.size());
    const int64_t chunk_rows = query_chunks.front().count;
    for (Merged &mc : merged) {
        mc.out.resize(size_t(b * mine.h * chunk_rows * dv));
        mc.lse.resize(size_t(b * mine.h * chunk_rows));
    }
    std::vector<uint8_t> part_storage(size_t(b * mine.h * chunk_rows * dv) * element);
    std::vector<float> part_f32(dtype == DType::Float32 ? 0 : size_t(b * mine.h * chunk_rows * dv)),
        part_lse(size_t(b * mine.h * chunk_rows));
    const View q_view(q);

    // Query chunk qc against the key chunks of the shard of `owner`, in `buffer`.
    auto attend_shard = [&](const uint8_t *buffer, int owner) {
        const View keys({b, hk, m, d}, k.dtype, const_cast<uint8_t *>(buffer)),
            values({b, hk, m, dv}, v.dtype, const_cast<uint8_t *>(buffer + k_bytes)),
            key_mask = mask ? View({b, m}, mask->dtype, const_cast<uint8_t *>(buffer + k_bytes + v_bytes)) : View();
        const auto key_chunks = chunks_of(total_m, owner, ranks, layout);
        int64_t local_row = 0;
        for (size_t qc = 0; qc < query_chunks.size(); qc++) {
            const int64_t row_position = options.query_offset + query_chunks[qc].start, rows = query_chunks[qc].count;
            int64_t local_key = 0;
            for (const Chunk &kc : key_chunks) {
                const int64_t key_position = options.key_offset + kc.start;
                const bool above_diagonal = key_position > row_position + rows - 1 + shift;
                const bool no_row_all_masked = first_unmasked != INT64_MAX && row_position + shift >= first_unmasked;
                if (!(options.causal && above_diagonal && no_row_all_masked)) {
                    Options o = options;
                    o.causal_align = CausalAlign::TopLeft;  // the diagonal by global positions
                    o.query_offset = row_position + std::max<int64_t>(shift, 0);
                    o.key_offset = key_position - std::min<int64_t>(shift, 0);
                    Merged &mc = merged[qc];
                    const bool first_part = mc.keys == 0;
                    const std::vector<int64_t> out_shape{b, mine.h, rows, dv}, lse_shape{b, mine.h, rows};
                    const View part_out = first_part && dtype == DType::Float32
                                              ? View(out_shape, f32, mc.out.data())
                                              : View(out_shape, q.dtype, part_storage.data());
                    const View lse_out(lse_shape, f32, first_part ? mc.lse.data() : part_lse.data());
                    const View q_rows = q_view.slice(2, local_row, rows), k_rows = keys.slice(2, local_key, kc.count),
                               v_rows = values.slice(2, local_key, kc.count);
                    const View mask_rows = mask ? key_mask.slice(1, local_key, kc.count) : View();
                    const DLTensor tq = q_rows.dl(), tk = k_rows.dl(), tv = v_rows.dl(), tmask = mask_rows.dl(),
                                   tout = part_out.dl(), tlse = lse_out.dl();
                    forward(tq, tk, tv, mask ? &tmask : nullptr, tout, &tlse, o);
                    const View merged_out(out_shape, f32, mc.out.data()), merged_lse(lse_shape, f32, mc.lse.data());
                    if (first_part) {
                        if (dtype != DType::Float32) convert(part_out, merged_out);
                    } else {
                        const View part_float =
                            dtype == DType::Float32 ? part_out : View(out_shape, f32, part_f32.data());
                        if (dtype != DType::Float32) convert(part_out, part_float);
                        const DLTensor a = merged_out.dl(), la = merged_lse.dl(), p = part_float.dl(),
                                       lp = lse_out.dl();
                        attend::merge(a, la, mc.keys, p, lp, kc.count, a, la);
                    }
                    mc.keys += kc.count;
                }
                local_key += kc.count;
            }
            local_row += rows;
        }
    };

    // Step s: this rank holds the shard of rank - s; it sends it on to rank + 1
    // while it attends to it, and receives rank - s - 1's from rank - 1.
    std::exception_ptr failure;
    RingStats steps;
    using Clock = std::chrono::steady_clock;
    auto ms_since = [](Clock::time_point start) {
        return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    };
    for (int step = 0; step < ranks; step++) {
        const int owner = (rank - step + ranks) % ranks;
        uint8_t *current = buffers[step % 2].data(), *next = buffers[(step + 1) % 2].data();
        std::vector<MPI_Request> requests;
        if (step + 1 < ranks) {
            post(requests, current, next, buffers[0].size(), (rank + 1) % ranks, (rank - 1 + ranks) % ranks, ring.comm);
            steps.bytes_sent += int64_t(buffers[0].size());
        }
        const auto compute_start = Clock::now();
        if (!failure) {
            try {
                attend_shard(current, owner);
            } catch (...) {
                failure = std::current_exception();  // keep passing shards on: the others are waiting for them
            }
        }
        steps.compute_ms.push_back(ms_since(compute_start));
        const auto wait_start = Clock::now();
        if (!requests.empty()) {
            check_mpi(MPI_Waitall(int(requests.size()), requests.data(), MPI_STATUSES_IGNORE), "MPI_Waitall");
        }
        steps.wait_ms.push_back(ms_since(wait_start));
    }
    if (stats) *stats = steps;
    collectively(ring.comm, [&] {
        if (failure) std::rethrow_exception(failure);
    });

    // Every rank succeeded: out and lse, chunk by chunk.
    const View out_view(out), lse_view = lse ? View(*lse) : View();
    int64_t local_row = 0;
    for (size_t qc = 0; qc < query_chunks.size(); qc++) {
        const int64_t rows = query_chunks[qc].count;
        convert(View({b, mine.h, rows, dv}, f32, merged[qc].out.data()), out_view.slice(2, local_row, rows));
        if (lse) convert(View({b, mine.h, rows}, f32, merged[qc].lse.data()), lse_view.slice(2, local_row, rows));
        local_row += rows;
    }
}

}  // namespace attend::dist

// Ring attention over MPI (include/attend/dist.hpp): the layouts and their
// shard/unshard copies, the collective agreement on errors, and ring_forward.
#include "attend/dist.hpp"

#include "ring_support.hpp"

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

using namespace detail;

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
    const RingPlan plan = plan_ring(
        ring.comm, q, k, v, mask, out, lse, options, layout,
        [&] {
            for (const DLTensor *t : {&q, &k, &v, mask, &out, lse}) {
                if (t && !on_host(*t)) fail("ring_forward: host tensors only (CUDA tensors: the NCCL overload)");
            }
        },
        [&] { return View(*mask); });
    const int rank = plan.rank, ranks = plan.ranks;
    const CallShape &mine = plan.shape;
    const std::vector<Chunk> &query_chunks = plan.query_chunks;

    // This rank's keys, values and mask, packed dense: what travels. Only the kv heads.
    const int64_t b = mine.b, dv = mine.dv;
    const DLDevice host{kDLCPU, 0};
    std::vector<uint8_t> buffers[2];
    for (auto &buffer : buffers) buffer.resize(shard_in(nullptr, mine, k, v, mask, host).bytes);
    const Shard own = shard_in(buffers[0].data(), mine, k, v, mask, host);
    convert(View(k).as_4d(), own.keys);
    convert(View(v).as_4d(), own.values);
    if (mask) convert(View(*mask), own.mask);

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
    std::vector<uint8_t> part_storage(size_t(b * mine.h * chunk_rows * dv) * element_bytes(q));
    std::vector<float> part_f32(dtype == DType::Float32 ? 0 : size_t(b * mine.h * chunk_rows * dv)),
        part_lse(size_t(b * mine.h * chunk_rows));
    const View q_view(q);

    // Query chunk qc against the key chunks of the shard of `owner`, in `buffer`.
    auto attend_shard = [&](uint8_t *buffer, int owner) {
        const Shard shard = shard_in(buffer, mine, k, v, mask, host);
        for_each_pair(plan, options, layout, owner, [&](const Pair &pair) {
            Merged &mc = merged[pair.query_chunk];
            const bool first_part = mc.keys == 0;
            const std::vector<int64_t> out_shape{b, mine.h, pair.rows, dv}, lse_shape{b, mine.h, pair.rows};
            const View part_out = first_part && dtype == DType::Float32 ? View(out_shape, f32, mc.out.data())
                                                                        : View(out_shape, q.dtype, part_storage.data());
            const View lse_out(lse_shape, f32, first_part ? mc.lse.data() : part_lse.data());
            forward_pair(q_view, shard, pair, part_out, lse_out, pair.options);
            const View merged_out(out_shape, f32, mc.out.data()), merged_lse(lse_shape, f32, mc.lse.data());
            if (first_part) {
                if (dtype != DType::Float32) convert(part_out, merged_out);
            } else {
                const View part_float = dtype == DType::Float32 ? part_out : View(out_shape, f32, part_f32.data());
                if (dtype != DType::Float32) convert(part_out, part_float);
                const DLTensor a = merged_out.dl(), la = merged_lse.dl(), p = part_float.dl(), lp = lse_out.dl();
                attend::merge(a, la, mc.keys, p, lp, pair.keys, a, la);
            }
            mc.keys += pair.keys;
        });
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

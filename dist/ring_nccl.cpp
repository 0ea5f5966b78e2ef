// Ring attention over NCCL (include/attend/dist.hpp): the host ring's plan and
// chunk pairs (ring_support.hpp) on CUDA tensors. A step's shard transfer runs
// on a stream of the ring's own while the kernels run on the caller's; the
// merges and the final write run on the device (nccl_kernels.cu).
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <string>

#include "attend/dist.hpp"
#include "attend/dlpack_types.hpp"
#include "nccl_kernels.hpp"
#include "ring_support.hpp"

namespace attend::dist {
namespace {

using namespace detail;

void check_cuda(cudaError_t code, const char *what) {
    if (code != cudaSuccess) throw Error(std::string("attend: ") + what + " failed: " + cudaGetErrorString(code));
}

void check_nccl(ncclResult_t code, const char *what) {
    if (code != ncclSuccess) throw Error(std::string("attend: ") + what + " failed: " + ncclGetErrorString(code));
}

// Device memory, freed with it.
struct DeviceBuffer {
    uint8_t *data = nullptr;
    explicit DeviceBuffer(size_t bytes) {
        if (bytes) check_cuda(cudaMalloc(reinterpret_cast<void **>(&data), bytes), "cudaMalloc");
    }
    ~DeviceBuffer() { cudaFree(data); }
    DeviceBuffer(DeviceBuffer &&other) noexcept : data(other.data) { other.data = nullptr; }
    DeviceBuffer(const DeviceBuffer &) = delete;
    DeviceBuffer &operator=(const DeviceBuffer &) = delete;
};

struct Stream {
    cudaStream_t stream = nullptr;
    Stream() { check_cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate"); }
    ~Stream() { cudaStreamDestroy(stream); }
    Stream(const Stream &) = delete;
    Stream &operator=(const Stream &) = delete;
};

struct Event {
    cudaEvent_t event = nullptr;
    Event() { check_cuda(cudaEventCreate(&event), "cudaEventCreate"); }
    ~Event() { cudaEventDestroy(event); }
    Event(Event &&other) noexcept : event(other.event) { other.event = nullptr; }
    Event(const Event &) = delete;
    Event &operator=(const Event &) = delete;
};

// Whether t's elements are dense in C order.
bool dense(const DLTensor &t) {
    if (!t.strides) return true;
    int64_t stride = 1;
    for (int i = t.ndim - 1; i >= 0; i--) {
        if (t.shape[i] != 1 && t.strides[i] != stride) return false;
        stride *= t.shape[i];
    }
    return true;
}

const void *first_element(const DLTensor &t) { return static_cast<const uint8_t *>(t.data) + t.byte_offset; }

ElementCode element_code(DType dtype) {
    return dtype == DType::Float32 ? kFloat32 : dtype == DType::Float16 ? kFloat16 : kBFloat16;
}

}  // namespace

void ring_forward(const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask, const DLTensor &out,
                  const DLTensor *lse, MPI_Comm parent, ncclComm_t nccl, cudaStream_t stream, const Options &options,
                  Layout layout, RingStats *stats) {
    const RingComm ring(parent);
    std::vector<uint8_t> host_mask;
    const RingPlan plan = plan_ring(
        ring.comm, q, k, v, mask, out, lse, options, layout,
        [&] {
            for (const DLTensor *t : {&q, &k, &v, mask, &out, lse}) {
                if (t && (t->device.device_type != kDLCUDA || t->device.device_id != q.device.device_id)) {
                    fail("ring_forward (NCCL): every tensor on one CUDA device, q's (cuda:" +
                         std::to_string(q.device.device_id) + ")");
                }
            }
            int device = -1;
            check_cuda(cudaGetDevice(&device), "cudaGetDevice");
            if (device != q.device.device_id) {
                fail("ring_forward (NCCL): the current CUDA device is " + std::to_string(device) +
                     ", the tensors are on " + std::to_string(q.device.device_id));
            }
            for (const DLTensor *t : {&k, &v, mask}) {
                if (t && !dense(*t)) fail("ring_forward (NCCL): k, v and mask must be dense in C order (they travel)");
            }
            int nccl_ranks = 0, nccl_rank = 0, ranks = 0, rank = 0;
            check_nccl(ncclCommCount(nccl, &nccl_ranks), "ncclCommCount");
            check_nccl(ncclCommUserRank(nccl, &nccl_rank), "ncclCommUserRank");
            MPI_Comm_size(ring.comm, &ranks);
            MPI_Comm_rank(ring.comm, &rank);
            if (nccl_ranks != ranks || nccl_rank != rank) {
                fail("ring_forward (NCCL): the NCCL communicator's rank " + std::to_string(nccl_rank) + " of " +
                     std::to_string(nccl_ranks) + " is not the MPI one's (" + std::to_string(rank) + " of " +
                     std::to_string(ranks) + ")");
            }
        },
        [&] {
            host_mask.resize(size_t(mask->shape[0] * mask->shape[1]));
            check_cuda(cudaMemcpy(host_mask.data(), first_element(*mask), host_mask.size(), cudaMemcpyDeviceToHost),
                       "copying the mask to the host");
            View view({mask->shape[0], mask->shape[1]}, mask->dtype, host_mask.data());
            return view;
        });
    const int rank = plan.rank, ranks = plan.ranks;
    const CallShape &mine = plan.shape;
    const int64_t b = mine.b, h = mine.h, dv = mine.dv;
    const DType dtype = *dlpack::dtype_of(q.dtype);
    const size_t element = element_bytes(q);

    // Two shard buffers (double-buffered), this rank's own packed into the first
    // (k, v and mask are dense: one copy each).
    const size_t shard_bytes = shard_in(nullptr, mine, k, v, mask, q.device).bytes;
    DeviceBuffer buffers[2] = {DeviceBuffer(shard_bytes), DeviceBuffer(shard_bytes)};
    const Shard own = shard_in(buffers[0].data, mine, k, v, mask, q.device);
    for (auto [from, to] : {std::pair<const DLTensor *, const View *>{&k, &own.keys}, {&v, &own.values},
                            {mask, &own.mask}}) {
        if (!from) continue;
        const size_t bytes = size_t(to->numel()) * to->bytes();
        check_cuda(cudaMemcpyAsync(to->data, first_element(*from), bytes, cudaMemcpyDeviceToDevice, stream),
                   "packing the shard");
    }

    // Per query chunk: the merged attention so far (float32, on the device) and its key count.
    const int64_t chunk_rows = plan.query_chunks.front().count;
    struct Merged {
        DeviceBuffer out, lse;
        int64_t keys = 0;
    };
    std::vector<Merged> merged;
    for (size_t qc = 0; qc < plan.query_chunks.size(); qc++) {
        merged.push_back({DeviceBuffer(size_t(b * h * chunk_rows * dv) * sizeof(float)),
                          DeviceBuffer(size_t(b * h * chunk_rows) * sizeof(float)), 0});
    }
    DeviceBuffer part(size_t(b * h * chunk_rows * dv) * element), part_lse(size_t(b * h * chunk_rows) * sizeof(float));
    const DLDataType f32{kDLFloat, 32, 1};
    const View q_view(q);

    auto attend_shard = [&](uint8_t *buffer, int owner) {
        const Shard shard = shard_in(buffer, mine, k, v, mask, q.device);
        for_each_pair(plan, options, layout, owner, [&](const Pair &pair) {
            Merged &mc = merged[pair.query_chunk];
            const bool first_part = mc.keys == 0, into_merged = first_part && dtype == DType::Float32;
            const std::vector<int64_t> out_shape{b, h, pair.rows, dv}, lse_shape{b, h, pair.rows};
            View part_out = into_merged ? View(out_shape, f32, mc.out.data) : View(out_shape, q.dtype, part.data);
            View lse_out(lse_shape, f32, into_merged ? mc.lse.data : part_lse.data);
            part_out.device = lse_out.device = q.device;
            Options o = pair.options;
            o.cuda_stream = stream;
            forward_pair(q_view, shard, pair, part_out, lse_out, o);
            if (!into_merged) {
                check_cuda(merge_on_device(element_code(dtype), reinterpret_cast<float *>(mc.out.data),
                                           reinterpret_cast<float *>(mc.lse.data), mc.keys, part.data,
                                           reinterpret_cast<const float *>(part_lse.data), pair.keys,
                                           b * h * pair.rows, dv, first_part, stream),
                           "merging on the device");
            }
            mc.keys += pair.keys;
        });
    };

    // Step s: the shard of rank - s is in `current`; the ring's stream sends it to
    // rank + 1 and receives the next into `next` while `stream` computes with it.
    // The transfer starts once `current` is complete and `next`'s last readers
    // (the previous step's kernels) are done; the next step's kernels wait for it.
    const Stream transfers;
    std::vector<Event> started, computed, transferred;
    for (int step = 0; step < ranks; step++) started.emplace_back(), computed.emplace_back(), transferred.emplace_back();
    std::exception_ptr failure;
    int64_t bytes_sent = 0;
    for (int step = 0; step < ranks; step++) {
        const int owner = (rank - step + ranks) % ranks;
        uint8_t *current = buffers[step % 2].data, *next = buffers[(step + 1) % 2].data;
        const bool pass_on = step + 1 < ranks;
        check_cuda(cudaEventRecord(started[size_t(step)].event, stream), "cudaEventRecord");
        if (pass_on) {
            check_cuda(cudaStreamWaitEvent(transfers.stream, started[size_t(step)].event, 0), "cudaStreamWaitEvent");
            check_nccl(ncclGroupStart(), "ncclGroupStart");
            check_nccl(ncclSend(current, shard_bytes, ncclUint8, (rank + 1) % ranks, nccl, transfers.stream), "ncclSend");
            check_nccl(ncclRecv(next, shard_bytes, ncclUint8, (rank - 1 + ranks) % ranks, nccl, transfers.stream),
                       "ncclRecv");
            check_nccl(ncclGroupEnd(), "ncclGroupEnd");
            bytes_sent += int64_t(shard_bytes);
        }
        if (!failure) {
            try {
                attend_shard(current, owner);
            } catch (...) {
                failure = std::current_exception();  // keep passing shards on: the others are waiting for them
            }
        }
        check_cuda(cudaEventRecord(computed[size_t(step)].event, stream), "cudaEventRecord");
        check_cuda(cudaEventRecord(transferred[size_t(step)].event, transfers.stream), "cudaEventRecord");
        if (pass_on) {
            check_cuda(cudaStreamWaitEvent(stream, transferred[size_t(step)].event, 0), "cudaStreamWaitEvent");
        }
    }
    check_cuda(cudaStreamSynchronize(transfers.stream), "the shard transfers");
    check_cuda(cudaStreamSynchronize(stream), "the ring's kernels");
    collectively(ring.comm, [&] {
        if (failure) std::rethrow_exception(failure);
    });
    if (stats) {
        RingStats steps;
        steps.bytes_sent = bytes_sent;
        for (int step = 0; step < ranks; step++) {
            float compute = 0, after = 0;
            check_cuda(cudaEventElapsedTime(&compute, started[size_t(step)].event, computed[size_t(step)].event),
                       "cudaEventElapsedTime");
            check_cuda(cudaEventElapsedTime(&after, computed[size_t(step)].event, transferred[size_t(step)].event),
                       "cudaEventElapsedTime");
            steps.compute_ms.push_back(compute);
            steps.wait_ms.push_back(std::max(0.0f, after));
        }
        *stats = steps;
    }

    // Every rank succeeded: out and lse, chunk by chunk, on `stream`.
    const View out_view(out), lse_view = lse ? View(*lse) : View();
    int64_t local_row = 0;
    for (size_t qc = 0; qc < plan.query_chunks.size(); qc++) {
        const int64_t rows = plan.query_chunks[qc].count;
        const View out_rows = out_view.slice(2, local_row, rows);
        const View lse_rows = lse ? lse_view.slice(2, local_row, rows) : View();
        check_cuda(write_on_device(element_code(dtype), reinterpret_cast<const float *>(merged[qc].out.data),
                                   reinterpret_cast<const float *>(merged[qc].lse.data), out_rows.data,
                                   out_rows.strides.data(), lse ? static_cast<float *>(lse_rows.data) : nullptr,
                                   lse ? lse_rows.strides.data() : nullptr, b, h, rows, dv, stream),
                   "writing out on the device");
        local_row += rows;
    }
}

}  // namespace attend::dist

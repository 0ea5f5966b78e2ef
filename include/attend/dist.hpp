// Attention over a sequence sharded across MPI ranks: ring attention. Each rank
// holds its shard of the queries and of the keys, values and padding mask; the
// key shards travel around the ring of ranks, each rank computing its queries
// against the shard it holds at that step while the next one is in flight, and
// merging the partial attentions by their log-sum-exp (attend::merge). The
// result on every rank is its rows of attention over the whole sequence: the
// same as one forward() over all of it, to the merge's rounding.
//
// The library attend_dist (CMake: find_package(Attend COMPONENTS dist), target
// attend::dist) is built when MPI is found. The caller owns MPI_Init.
#pragma once

// The C API only: Open MPI's and MPICH's mpi.h would otherwise declare their
// removed C++ bindings, which need a library of their own.
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <cstdint>
#include <exception>
#include <functional>
#include <vector>

#include "attend/attend.hpp"

namespace attend::dist {

// How a sequence of L positions is spread over P ranks.
enum class Layout {
    Contiguous,  // rank r holds positions [r·L/P, (r+1)·L/P)
    // 2P chunks of L/(2P) positions: rank r holds chunks r and 2P-1-r, in that
    // order. With causal attention every rank then has the same work.
    ZigZag,
};

// A run of positions a rank holds: global positions [start, start + count).
struct Chunk {
    int64_t start = 0, count = 0;
};

// The chunks of a sequence of `length` positions that `rank` of `ranks` holds,
// in the order its shard stores them. Throws std::invalid_argument unless
// length divides into P (Contiguous) or 2P (ZigZag) equal chunks.
ATTEND_API std::vector<Chunk> chunks_of(int64_t length, int rank, int ranks, Layout layout);

// Copies rank `rank`'s shard of `whole` into `local` (shard), or `local` into
// its place in `whole` (unshard). Dim `sequence_dim` is the sequence (2 for q,
// k, v, out [b, h, n, d], 1 for 3-D k, v [b, m, d] and the mask [b, m], 2 for
// lse [b, h, n]); the other dims are equal, and so are the dtypes. Host memory.
ATTEND_API void shard(const DLTensor &whole, int sequence_dim, int rank, int ranks, Layout layout,
                      const DLTensor &local);
ATTEND_API void unshard(const DLTensor &local, int sequence_dim, int rank, int ranks, Layout layout,
                        const DLTensor &whole);

// Runs `step` on every rank of `comm`, then agrees: if it threw on any rank,
// every rank throws, the lowest failing rank's exception as
// std::invalid_argument or attend::Error ("attend: rank R: ..."), so that no rank
// goes on alone. Collective: every rank of comm must call it.
ATTEND_API void collectively(MPI_Comm comm, const std::function<void()> &step);

// What one ring_forward call did on this rank, step by step (for benchmarks).
struct RingStats {
    std::vector<double> compute_ms;  // this rank's kernel calls and merges in each step
    std::vector<double> wait_ms;     // waiting, after the step's compute, for its transfer: the part not hidden
    int64_t bytes_sent = 0;          // k, v and mask shards sent on to the next rank
};

// Ring attention. Every rank passes its shard, in `layout`, of the queries
// q [b, h, n, d], keys k and values v ([b, hk, m, d] / [b, hk, m, dv], or
// [b, m, d] for multi-query), the padding mask [b, m] (nullptr: none), out
// [b, h, n, dv] and lse [b, h, n] (nullptr: not wanted), each rank's shapes the
// same; n and m are the rank's counts (the whole sequence: P·n queries and P·m
// keys). Only the kv heads travel. Options as forward()'s: causal (both
// alignments; BottomRight with dropout only when the whole sequence has as
// many queries as keys), dropout and its seed (the mask of one forward() over
// the whole sequence), query_offset and key_offset (the whole sequence's own
// positions). Host tensors. Collective: errors are agreed as collectively()
// does, and out and lse are written only when every rank succeeded. stats, when
// given, is filled with this rank's steps.
ATTEND_API void ring_forward(const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask,
                             const DLTensor &out, const DLTensor *lse, MPI_Comm comm, const Options &options = {},
                             Layout layout = Layout::Contiguous, RingStats *stats = nullptr);

#if defined(ATTEND_DIST_NCCL) && ATTEND_DIST_NCCL
}  // namespace attend::dist
// As nccl.h and the CUDA runtime declare them (no include needed here).
typedef struct ncclComm *ncclComm_t;
typedef struct CUstream_st *cudaStream_t;
namespace attend::dist {

// The same over CUDA tensors (built when the CUDA toolkit's NCCL is found;
// ATTEND_DIST_NCCL is then 1): every tensor on the rank's current CUDA device,
// k, v and the mask dense in C order (they travel as they are). The shards go
// around the ring by ncclSend/ncclRecv on `nccl` (the same ranks as `comm`, in
// the same order; create it as nccl-tests do, its unique id broadcast over
// MPI) on a stream of the ring's own, while the kernels and the float32 merges
// run on `stream`, which is ordered after the call when it returns. `comm`
// agrees on errors as collectively() does. stats: compute_ms is each step's
// GPU time on `stream`, wait_ms how long after it the step's transfer ended.
ATTEND_API void ring_forward(const DLTensor &q, const DLTensor &k, const DLTensor &v, const DLTensor *mask,
                             const DLTensor &out, const DLTensor *lse, MPI_Comm comm, ncclComm_t nccl,
                             cudaStream_t stream, const Options &options = {}, Layout layout = Layout::Contiguous,
                             RingStats *stats = nullptr);
#endif

}  // namespace attend::dist

// The forward attention of naturalspeech2's `Attend` as one Halide algorithm with
// its schedules (docs/contract.md is what it computes, docs/architecture.md how).
//
// Shapes here are Halide's (innermost first): q(c, i, h, b), k(c, j, hk, b),
// v(c, j, hk, b), mask(j, b); out(c, i, h, b) is a Tuple of the attention and
// the log-sum-exp of row i (see `out` below).
//
// The algorithm is flash attention written with pure Funcs: the keys are split
// into blocks of `key_block`; per query row and block three partials are pure
// (block max, block sum of weights, block weighted sum of v), and a Tuple-valued
// update over the blocks merges them with the log-sum-exp rule. The blocks may be
// cut into chunks whose states are merged by the same rule (a GPU, and the CPU
// decode kernels, run the chunks in parallel). Scores are kept in log2 units (q
// is scaled once by scale * log2(e)) so the softmax uses 2^x.
//
// A task is the rows of one head (tiles of query_tile rows; on a CPU, a call of
// a few rows per head runs tiles of one register tile's height), or with decode=true
// the rows of every head of one kv head's group in one tile, so that decoding
// (a few queries over a long KV cache) reads k and v once per group.
#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "Halide.h"
#include "attend/kernel_abi.hpp"
#include "kernel_exprs.hpp"

namespace {

using namespace Halide;
using namespace attend::kernel_exprs;

class Attention : public Generator<Attention> {
public:
    // Head dim of the variant: q, k, v all have it, and the running state is one
    // Tuple of head_dim + 2 values per query row. 0 builds the generic variant
    // (any d and dv; state per (column, row), which repeats the exps).
    GeneratorParam<int> head_dim{"head_dim", 64};

    // Schedule knobs (CPU): rows per tile (one task of the parallel loop), keys per
    // block, SIMD width (0: the target's natural width), and the register tiles
    // of the two matrix products, in vectors of rows by columns.
    GeneratorParam<int> query_tile{"query_tile", 48};
    GeneratorParam<int> key_block{"key_block", 64};
    GeneratorParam<int> vector_width{"vector_width", 0};
    GeneratorParam<int> score_row_vectors{"score_row_vectors", 3};
    GeneratorParam<int> score_cols{"score_cols", 4};
    GeneratorParam<int> pv_row_vectors{"pv_row_vectors", 3};
    GeneratorParam<int> pv_cols{"pv_cols", 4};
    // CPU, with a head_dim: each run of tiles copies v, widened to float32, into
    // panels of one SIMD vector of columns, keys consecutive within a panel, which
    // the P·V register tiles read with unit stride (the copy is made once per run
    // and read by all of its tiles; see schedule_cpu). It pays with AVX2's tiles
    // in tuning/cpu.json (32 rows, P·V 2 x 4); with 48 rows and 3 x 4 it did not.
    GeneratorParam<bool> v_panels{"v_panels", false};

    // Schedule knob (GPU targets; query_tile and key_block above set the tiles):
    // true puts the rows of a tile on the lanes of one warp, so the per-row state
    // lives in registers (CUDA only); false puts them on threads, the portable
    // structure (OpenCL), whose block-level state lives in shared memory.
    GeneratorParam<bool> gpu_lanes{"gpu_lanes", false};
    // GPU: unroll factor of the loop over the head dim in the scores (loop
    // overhead against register pressure).
    GeneratorParam<int> gpu_unroll{"gpu_unroll", 1};
    // GPU, lanes only: true keeps each row's scaled q in registers for the whole
    // tile (the score loop is then fully unrolled over d), so the scores read only
    // k from shared memory.
    GeneratorParam<bool> gpu_q_registers{"gpu_q_registers", false};

    // Decoding (few query rows over many keys): a task's rows are the query rows
    // of every head of a kv head's group (head by head), all in one tile, so the
    // group reads k and v once, and the chunks of keys (key_splits) run in
    // parallel. CPU only, with a head_dim; query_tile is not used.
    GeneratorParam<bool> decode{"decode", false};
    // Decoding: keys per register tile of the scores, and SIMD vectors of
    // columns per register tile of P·V (at most the row: 16 holds a d=128 row
    // in AVX2's 16 registers, 4-7 % faster than 8 there and 4-10 % with SSE).
    GeneratorParam<int> decode_score_keys{"decode_score_keys", 4};
    GeneratorParam<int> decode_pv_vectors{"decode_pv_vectors", 16};

    // The element type of q, k, v and out: float32, float16 or bfloat16. Every
    // sum accumulates in float32; out is rounded once, when it is written.
    GeneratorParam<Type> element_type{"element_type", Float(32)};

    Input<Buffer<void, 4>> q{"q"};  // element_type (set in configure)
    Input<Buffer<void, 4>> k{"k"};
    Input<Buffer<void, 4>> v{"v"};
    Input<Buffer<uint8_t, 2>> mask{"mask"};  // read only when has_mask
    Input<float> scale{"scale"};
    Input<bool> causal{"causal"};
    Input<bool> has_mask{"has_mask"};
    Input<uint32_t> drop_threshold{"drop_threshold"};  // 0: no dropout
    Input<float> keep_scale{"keep_scale"};             // 1 / (1 - p), 0 when p = 1
    Input<uint32_t> seed_lo{"seed_lo"};
    Input<uint32_t> seed_hi{"seed_hi"};
    // Causal masks key j for query i when j > i + causal_offset (0: top-left,
    // m - n: bottom-right).
    Input<int32_t> causal_offset{"causal_offset"};
    // The global positions of the call's first query and key (a shard of a longer
    // sequence): the dropout hash takes row + query_offset and key + key_offset,
    // so the shards of a sequence drop what the whole call would. (Causal gets
    // them through causal_offset.)
    Input<int32_t> query_offset{"query_offset"};
    Input<int32_t> key_offset{"key_offset"};
    // The global indices of the call's first batch and head (the runtime runs a
    // call too large for 32-bit indexing in pieces): the dropout hash's batch
    // and head are b + batch_offset and h + head_offset.
    Input<int32_t> batch_offset{"batch_offset"};
    Input<int32_t> head_offset{"head_offset"};
    // Causal: rows below this may have every key masked (the runtime computes it
    // from the mask and the offset), so their tiles visit every key block.
    Input<int32_t> all_keys_rows{"all_keys_rows"};
    // The key blocks are cut into this many chunks whose partial states are
    // merged at the end (the same log-sum-exp merge): on a GPU the chunks run in
    // parallel, which fills the device when there are few query tiles. 1: one pass.
    Input<int32_t> key_splits{"key_splits"};
    // CPU: the query tiles of a head run as this many tasks of consecutive tiles
    // (at most one per tile), each with its own copy of v's panels. Fewer tasks
    // copy v less and keep a head's k and v in one core's cache; the runtime
    // picks enough for its threads. Other schedules ignore it.
    Input<int32_t> query_splits{"query_splits"};

    // Two values per (c, i, h, b): the attention, and the log-sum-exp of row i,
    // ln sum_j exp(s_ij) over its unmasked keys (before dropout), -inf when every
    // key is masked. The lse does not depend on c: the runtime passes its [b, h, n]
    // buffer with stride 0 in c. (Outputs of one pipeline share one loop nest,
    // and so one computation of the state, only as a Tuple.)
    Output<Buffer<void, 4>> out{"out"};  // {element_type, float32}

    void configure() {
        const Type t = element_type;
        _halide_user_assert(t == Float(32) || t == Float(16) || t == BFloat(16))
            << "element_type must be float32, float16 or bfloat16, got " << t;
        for (auto *input : {&q, &k, &v}) input->set_type(storage_type());
        out.set_type({storage_type(), Float(32)});
    }

    Type storage_type() const { return attend::kernel_exprs::storage_type(get_target(), element_type); }

    void generate() {
        check_kernel_abi(arginfos(), attend::kForwardKernelArgNames);
        _halide_user_assert(!decode || (!generic() && !get_target().has_gpu_feature()))
            << "decode=true needs a head_dim and a CPU target";
        define_algorithm();
        if (using_autoscheduler()) {
            set_estimates();
        } else if (get_target().has_gpu_feature()) {
            schedule_gpu();
        } else if (decode) {
            schedule_cpu_decode();
        } else {
            schedule_cpu();
        }
    }

private:
    Var c{"c"}, i{"i"}, ii{"ii"}, io{"io"}, jj{"jj"}, kb{"kb"}, hq{"hq"}, bb{"bb"}, split{"split"}, e{"e"};
    Func q_scaled{"q_scaled"}, score{"score"}, block_max{"block_max"}, weight{"weight"},
        block_sum{"block_sum"}, block_out{"block_out"}, state{"state"};
    Func masked_score{"masked_score"}, kept_weight{"kept_weight"}, k_block{"k_block"}, v_block{"v_block"};
    Func partial{"partial"}, merged{"merged"}, row_lse{"row_lse"}, v_panel{"v_panel"};
    RDom rc, rj, blocks, splits;

    bool generic() const { return head_dim == 0; }

    int cpu_vector_width() const { return vector_width > 0 ? int(vector_width) : natural_vector_size<float>(); }

    // A CPU call with at most one register tile's rows per head (a few new
    // queries over a KV cache, where the decode kernel's row-by-row passes lose
    // from about 12 rows) runs tiles of that height instead of query_tile rows,
    // most of them discarded; other calls run tiles of query_tile rows. (GPU
    // and decode: query_tile.)
    int short_tile_rows() const {
        const int TQ = query_tile, rows = cpu_vector_width() * std::max<int>(score_row_vectors, pv_row_vectors);
        const bool cpu_tiles = !decode && !get_target().has_gpu_feature() && !using_autoscheduler();
        return cpu_tiles && rows < TQ && TQ % rows == 0 ? rows : TQ;
    }
    Expr tile_rows() const {
        const int TQ = query_tile, rows = short_tile_rows();
        return rows < TQ ? select(q.dim(1).extent() <= rows, rows, TQ) : Expr(TQ);
    }

    // Whether P·V reads v from per-task panels (the CPU's forward kernels with a head_dim).
    bool uses_v_panels() const {
        return v_panels && !generic() && !decode && !get_target().has_gpu_feature() && !using_autoscheduler();
    }

    void define_algorithm() {
        const int BK = key_block;
        Expr TQ = tile_rows();
        Expr N = q.dim(1).extent(), M = k.dim(1).extent();
        Expr H = q.dim(2).extent(), HK = k.dim(2).extent();
        Expr D = generic() ? q.dim(0).extent() : Expr(int(head_dim));
        Expr group = H / HK;  // heads per kv head (grouped- and multi-query: no copy of k, v)
        // A task's rows: the query rows of head hq, or decoding, those of every
        // head of kv head hq's group, head by head.
        Expr task_rows = decode ? N * group : N;
        // Tiles are numbered from the last: slot io holds tile T - 1 - io, so a loop
        // over slots (the GPU's thread blocks, launched in index order) starts with
        // the tiles that have the most causal keys and ends with the shortest,
        // instead of ending with a long tile running alone.
        Expr tiles = decode ? 1 : (task_rows + TQ - 1) / TQ;
        Expr tile_of_slot = tiles - 1 - io;
        Expr task_row = decode ? ii : tile_of_slot * TQ + ii;  // the task's row of slot io, lane ii
        Expr row = task_row, head = hq, kv_head = hq / group;
        if (decode) {
            Expr r = min(task_row, task_rows - 1);  // lanes past the end repeat the last row
            row = r % N;
            head = hq * group + r / N;
            kv_head = hq;
        }
        Expr key = kb * BK + jj;
        Expr key_in = min(key, M - 1);  // loads stay in bounds on a partial last block

        // q transposed (rows innermost) and scaled once: scores come out in log2 units.
        q_scaled(ii, c, io, hq, bb) = widen(q(c, min(row, N - 1), head, bb), element_type) * (scale * float(M_LOG2E));

        // The keys and values of block kb (the GPU stages them in shared memory; k
        // transposed, keys innermost).
        k_block(jj, c, kb, hq, bb) = widen(k(c, key_in, kv_head, bb), element_type);
        v_block(c, jj, kb, hq, bb) = widen(v(c, key_in, kv_head, bb), element_type);

        rc = RDom(0, D, "rc");
        score(ii, jj, kb, io, hq, bb) = 0.0f;
        score(ii, jj, kb, io, hq, bb) += q_scaled(ii, rc, io, hq, bb) * k_block(jj, rc, kb, hq, bb);

        // Masked scores are -FLT_MAX, exactly as the seed's masked_fill: a fully
        // masked row gets uniform weights over all keys.
        Expr allowed = key_allowed(has_mask, mask(key_in, bb), causal, key, row, causal_offset);
        masked_score(ii, jj, kb, io, hq, bb) = select(allowed, score(ii, jj, kb, io, hq, bb), -FLT_MAX);

        rj = RDom(0, BK, "rj");
        block_max(ii, kb, io, hq, bb) = -FLT_MAX;
        block_max(ii, kb, io, hq, bb) = max(block_max(ii, kb, io, hq, bb), masked_score(ii, rj, kb, io, hq, bb));
        // Keys past the end weigh 0 (unlike masked keys, which weigh 1 in a fully masked row).
        // Dropout zeroes weights after the softmax: a weight is kept twice, as
        // it is (the block sum keeps them all) and as dropout leaves it (P·V
        // reads it), so the keep hash is computed once per weight. Unsigned: the
        // positions of padded rows and keys past the end may pass 2^31 - 1
        // (their weights are discarded; the sum must not overflow).
        Expr shifted = masked_score(ii, jj, kb, io, hq, bb) - block_max(ii, kb, io, hq, bb);
        Expr w = select(key < M, exp2_nonpositive(shifted), 0.0f);
        Expr kept = dropout_kept(seed_lo, seed_hi, cast<uint32_t>(bb) + cast<uint32_t>(batch_offset),
                                 cast<uint32_t>(head) + cast<uint32_t>(head_offset),
                                 cast<uint32_t>(row) + cast<uint32_t>(query_offset),
                                 cast<uint32_t>(key) + cast<uint32_t>(key_offset), drop_threshold);
        weight(ii, jj, kb, io, hq, bb) = Tuple(w, select(kept, w, 0.0f));

        block_sum(ii, kb, io, hq, bb) = 0.0f;
        block_sum(ii, kb, io, hq, bb) += weight(ii, rj, kb, io, hq, bb)[0];
        kept_weight(ii, jj, kb, io, hq, bb) = weight(ii, jj, kb, io, hq, bb)[1];

        // v as panels of W columns, v_panel(lane, key, panel, kb): the keys of a
        // block side by side in each panel.
        block_out(ii, c, kb, io, hq, bb) = 0.0f;
        if (uses_v_panels()) {
            const int W = cpu_vector_width();
            _halide_user_assert(int(head_dim) % W == 0)
                << "v_panels: head_dim " << int(head_dim) << " is not a multiple of the vector width " << W;
            v_panel(e, jj, c, kb, hq, bb) = v_block(c * W + e, jj, kb, hq, bb);
            block_out(ii, c, kb, io, hq, bb) +=
                kept_weight(ii, rj, kb, io, hq, bb) * v_panel(c % W, rj, c / W, kb, hq, bb);
        } else {
            block_out(ii, c, kb, io, hq, bb) += kept_weight(ii, rj, kb, io, hq, bb) * v_block(c, rj, kb, hq, bb);
        }

        // Causal: key blocks wholly above the diagonal of a tile are skipped, except
        // in tiles that hold a fully masked row (it needs every key, for the
        // uniform weights): rows below all_keys_rows, which the runtime computes
        // from the mask and causal_offset. The conditions are scalars so that Halide turns the
        // predicate into the loop bound (a condition on loaded data would be
        // relaxed to "every block").
        // (Decoding, a tile may hold any row of each head: its last row is N - 1.)
        Expr num_blocks = (M + BK - 1) / BK;
        Expr last_row = decode ? N - 1 : tile_of_slot * TQ + TQ - 1;
        Expr below_diagonal = clamp((last_row + causal_offset) / BK + 1, 0, num_blocks);
        Expr skip = causal && (decode ? all_keys_rows == 0 : tile_of_slot * TQ >= all_keys_rows);
        // Chunk `split` of the key blocks: blocks is the position inside it.
        Expr chunk = (num_blocks + key_splits - 1) / key_splits;
        blocks = RDom(0, chunk, "blocks");
        Expr block = split * chunk + blocks;
        blocks.where(block < select(skip, below_diagonal, num_blocks));

        Expr mb = block_max(ii, block, io, hq, bb);
        Expr lb = block_sum(ii, block, io, hq, bb);
        splits = RDom(0, key_splits, "splits");

        // Where out's row i of head hq is: lane, slot and task.
        Expr out_row = decode ? (hq % group) * N + i : i;
        Expr in_tile = decode ? out_row : out_row % TQ, slot = decode ? 0 : tiles - 1 - out_row / TQ;
        Expr task = decode ? hq / group : hq;
        if (generic()) {
            // One (max, sum, out) state per output column and row.
            state(c, ii, split, io, hq, bb) = Tuple(-FLT_MAX, 0.0f, 0.0f);
            state(c, ii, split, io, hq, bb) =
                merge_softmax_state(state(c, ii, split, io, hq, bb), mb, lb, {block_out(ii, c, block, io, hq, bb)});
            partial(e, c, ii, split, io, hq, bb) = mux(e, Tuple(state(c, ii, split, io, hq, bb)).as_vector());
            auto part = [&](int element) { return partial(element, c, ii, splits, io, hq, bb); };
            merged(c, ii, io, hq, bb) = Tuple(-FLT_MAX, 0.0f, 0.0f);
            merged(c, ii, io, hq, bb) = merge_softmax_state(merged(c, ii, io, hq, bb), part(0), part(1), {part(2)});
            Tuple st = merged(c, in_tile, slot, hq, bb);
            Tuple row_st = merged(0, ii, io, hq, bb);  // every column has the row's max and sum
            row_lse(ii, io, hq, bb) = log_sum_exp(row_st[0], row_st[1]);
            out(c, i, hq, bb) = Tuple(narrow(st[2] / st[1] * keep_scale, element_type, storage_type()), row_lse(in_tile, slot, hq, bb));
        } else {
            // One state per row: (max, sum, out_0 .. out_{dv-1}).
            const int DV = head_dim;
            std::vector<Expr> init(DV + 2, 0.0f), outs;
            init[0] = -FLT_MAX;
            state(ii, split, io, hq, bb) = Tuple(init);
            for (int column = 0; column < DV; column++) {
                outs.push_back(block_out(ii, column, block, io, hq, bb));
            }
            state(ii, split, io, hq, bb) = merge_softmax_state(state(ii, split, io, hq, bb), mb, lb, outs);
            // A chunk's state as one Func over its elements e (a GPU keeps it in one
            // buffer between its two kernels).
            partial(e, ii, split, io, hq, bb) = mux(e, Tuple(state(ii, split, io, hq, bb)).as_vector());
            auto part = [&](int element) { return partial(element, ii, splits, io, hq, bb); };
            std::vector<Expr> part_outs;
            for (int column = 0; column < DV; column++) part_outs.push_back(part(2 + column));
            merged(ii, io, hq, bb) = Tuple(init);
            merged(ii, io, hq, bb) = merge_softmax_state(merged(ii, io, hq, bb), part(0), part(1), part_outs);
            Tuple st = merged(in_tile, slot, task, bb);
            std::vector<Expr> columns(st.as_vector().begin() + 2, st.as_vector().end());
            Tuple row_st = merged(ii, io, hq, bb);
            row_lse(ii, io, hq, bb) = log_sum_exp(row_st[0], row_st[1]);
            Expr attention = mux(c, columns) / st[1] * keep_scale;
            out(c, i, hq, bb) = Tuple(narrow(attention, element_type, storage_type()), row_lse(in_tile, slot, task, bb));
        }

        // Strides: k and v must be dense in their head dim (the hot loops read them);
        // q, mask and out may have any strides (a dummy mask has strides 0).
        q.dim(0).set_stride(Expr());
        mask.dim(0).set_stride(Expr());
        // Output rows start at 0, so a tile's lane is i % query_tile (the GPU
        // schedule reads the state of its own lane, no shuffles).
        // (The lse buffer, the second, takes the first's mins and extents.)
        for (OutputImageParam buffer : Func(out).output_buffers()) buffer.dim(0).set_stride(Expr());
        const OutputImageParam attention = Func(out).output_buffers()[0];
        attention.dim(1).set_min(0);
        if (!generic()) attention.dim(0).set_bounds(0, int(head_dim));
        if (!generic()) {
            q.dim(0).set_bounds(0, int(head_dim));
            k.dim(0).set_bounds(0, int(head_dim));
            v.dim(0).set_bounds(0, int(head_dim));
        }
    }

    void set_estimates() {
        const int D = generic() ? 64 : int(head_dim);
        q.set_estimates({{0, D}, {0, 1024}, {0, 8}, {0, 2}});
        k.set_estimates({{0, D}, {0, 1024}, {0, 8}, {0, 2}});
        v.set_estimates({{0, D}, {0, 1024}, {0, 8}, {0, 2}});
        mask.set_estimates({{0, 1024}, {0, 2}});
        out.set_estimates({{0, D}, {0, 1024}, {0, 8}, {0, 2}});
        scale.set_estimate(0.125f);
        causal.set_estimate(false);
        has_mask.set_estimate(false);
        drop_threshold.set_estimate(0);
        keep_scale.set_estimate(1.0f);
        seed_lo.set_estimate(0);
        seed_hi.set_estimate(0);
        causal_offset.set_estimate(0);
        query_offset.set_estimate(0);
        key_offset.set_estimate(0);
        all_keys_rows.set_estimate(0);
        key_splits.set_estimate(1);
        query_splits.set_estimate(1);
    }

    // CPU: one task per (head, batch), inside it query_splits runs of consecutive
    // tiles of query rows, in parallel (a nested parallel loop: fused with the
    // head, the run loop's extent, which depends on the tile height, would hide
    // the head's bounds from Halide); a run copies v into panels once, then runs
    // its tiles in turn. In a tile the blocks of keys run in order, each computing its
    // scores, weights and partial products into small buffers, with the rows of
    // the tile on the SIMD lanes.
    void schedule_cpu() {
        const int VW = cpu_vector_width();
        Expr TQ = tile_rows();
        Var task("task"), run("run"), tile("tile");

        Expr tiles = (q.dim(1).extent() + TQ - 1) / TQ;
        Expr runs = clamp(query_splits, 1, tiles);
        Expr tiles_per_run = (tiles + runs - 1) / runs;
        out.split(i, io, ii, TQ, TailStrategy::GuardWithIf)
            .split(io, run, tile, tiles_per_run, TailStrategy::GuardWithIf)
            .reorder(c, ii, tile, run, hq, bb)
            .fuse(hq, bb, task)
            .parallel(task)
            .parallel(run);
        if (!generic()) out.unroll(c);
        // A tile's buffers hold one tile (Halide cannot see that through the tail
        // guard): a constant size keeps them off the heap.
        q_scaled.compute_at(out, tile).bound_storage(io, 1).vectorize(ii, VW);

        // The chunks of keys (one unless the caller asks for more) run in turn.
        merged.compute_at(out, tile).bound_storage(io, 1).vectorize(ii, VW);
        row_lse.compute_at(out, tile).bound_storage(io, 1).vectorize(ii, VW);
        state.compute_at(merged, splits).vectorize(ii, VW);
        if (generic()) {
            merged.update().reorder(ii, c, splits).vectorize(ii, VW);
            state.update().reorder(ii, c, blocks).vectorize(ii, VW);
        } else {
            merged.update().reorder(ii, splits).vectorize(ii, VW);
            state.update().reorder(ii, blocks).vectorize(ii, VW);
        }

        // A matrix product of the block in register tiles: `block` is computed
        // per key block, `sum` (its reduction over r) per tile of row_vectors
        // SIMD vectors of rows by `cols` columns, kept in registers.
        auto register_tiled = [&](Func block, Func sum, Var col, RVar r, int row_vectors, int cols) {
            Var rows_outer("rows_outer"), rows_inner("rows_inner"), cols_outer("cols_outer"), cols_inner("cols_inner");
            block.compute_at(state, blocks)
                .tile(ii, col, rows_outer, cols_outer, rows_inner, cols_inner, VW * row_vectors, cols)
                .vectorize(rows_inner, VW)
                .unroll(rows_inner)
                .unroll(cols_inner)
                .store_in(MemoryType::Stack);
            sum.compute_at(block, rows_outer).vectorize(ii, VW).unroll(ii).unroll(col);
            sum.update().reorder(ii, col, r).vectorize(ii, VW).unroll(ii).unroll(col);
        };
        // Scores, the masks applied as each register tile is stored; without
        // a mask or causal, stored as they are.
        register_tiled(masked_score, score, jj, rc, score_row_vectors, score_cols);
        masked_score.specialize(!causal && !has_mask);

        block_max.compute_at(state, blocks).vectorize(ii, VW);
        block_max.update().reorder(ii, rj).vectorize(ii, VW);
        weight.compute_at(state, blocks).vectorize(ii, VW).store_in(MemoryType::Stack);
        block_sum.compute_at(state, blocks).vectorize(ii, VW);
        block_sum.update().reorder(ii, rj).vectorize(ii, VW);

        // Weights times v.
        register_tiled(block_out.in(), block_out, c, rj, pv_row_vectors, pv_cols);

        // v's panels: copied once per run, for the keys its tiles visit (a
        // panel's keys read from v's rows, written side by side).
        if (uses_v_panels()) {
            v_panel.compute_at(out, run)
                .bound(e, 0, VW)
                .bound(c, 0, int(head_dim) / VW)
                .reorder(e, jj, c, kb)
                .vectorize(e);
        }

        // 16-bit k (and v without panels) are widened once per key block, a
        // vector at a time (each element is then read by every row of the tile),
        // not at every use.
        if (Type(element_type) != Float(32)) {
            k_block.compute_at(state, blocks)
                .reorder_storage(c, jj)
                .reorder(c, jj)
                .vectorize(c, VW, TailStrategy::GuardWithIf)
                .store_in(MemoryType::Stack);
            if (!uses_v_panels()) {
                v_block.compute_at(state, blocks).vectorize(c, VW, TailStrategy::GuardWithIf).store_in(MemoryType::Stack);
            }
        }

        // One key block each (Halide cannot see it through the chunk arithmetic
        // where causal blocks are skipped).
        for (Func f : {masked_score, block_max, weight, block_sum, block_out}) f.bound_extent(kb, 1);
        // A tile's buffers have room for query_tile rows, or one register tile
        // if that is higher (a lower tile is computed as one); a short tile uses
        // part of them. A constant size keeps them on the stack.
        const int tile_room = std::max<int>(query_tile, VW * std::max<int>(score_row_vectors, pv_row_vectors));
        for (Func f : {q_scaled, merged, row_lse, state, masked_score, block_max, weight, block_sum, block_out.in()}) {
            f.bound_storage(ii, tile_room);
        }

        // Dropout costs a hash per weight: only the path with it on pays. Only the
        // weights are specialized (they meet the hash there), so the rest of the
        // kernel is generated once. Specializing `out` generated all of it
        // twice, for the same instructions per call (callgrind) at 2.5x the
        // generator's time.
        weight.specialize(drop_threshold == u32(0));
    }

    // CPU, decoding: one task per (chunk of keys, kv head, batch), with every
    // row of the kv head's group; inside it the blocks of the chunk run in order,
    // each for every row. With few rows the SIMD lanes hold the head dim: the
    // scores as dot products (lanes summed at the end) of a few keys at once,
    // P·V over the columns of v. Then one task per (kv head, batch) merges the
    // chunks, and out is copied from the merged states.
    void schedule_cpu_decode() {
        const int VW = cpu_vector_width();
        const int D = head_dim;
        _halide_user_assert(D % VW == 0) << "decode: head_dim " << D << " is not a multiple of the vector width " << VW;
        Var task("task"), lane("lane");

        partial.compute_root()
            .bound(e, 0, D + 2)
            .reorder(e, ii, split, io, hq, bb)
            .unroll(e)
            .fuse(split, io, task)
            .fuse(task, hq, task)
            .fuse(task, bb, task)
            .parallel(task);
        q_scaled.compute_at(partial, task).reorder_storage(c, ii).reorder(c, ii).vectorize(c, VW);
        state.compute_at(partial, task);
        state.update().reorder(ii, blocks);

        // Scores: per row, `keys` keys at a time, VW partial dot products over the
        // head dim each, then their sums.
        const int keys = decode_score_keys;
        Var jj_outer("jj_outer"), jj_inner("jj_inner");
        RVar rc_outer("rc_outer"), rc_lane("rc_lane");
        score.compute_at(state, blocks);
        Func score_lanes = score.update().split(rc, rc_outer, rc_lane, VW).rfactor(rc_lane, lane);
        score.update()
            .split(jj, jj_outer, jj_inner, keys)
            .reorder(rc_lane, jj_inner, ii, jj_outer)
            .atomic()
            .vectorize(rc_lane)
            .unroll(jj_inner);
        score_lanes.compute_at(score, ii).reorder_storage(lane, jj, ii).vectorize(lane).unroll(jj);
        score_lanes.update().reorder(lane, jj, rc_outer).vectorize(lane).unroll(jj);

        for (Func f : {masked_score, weight}) f.compute_at(state, blocks).vectorize(jj, VW);
        for (Func f : {block_max, block_sum}) f.compute_at(state, blocks);

        // P·V per row in register tiles of `vectors` SIMD vectors of columns.
        const int width = VW * std::min<int>(decode_pv_vectors, D / VW);
        Var c_outer("c_outer"), c_inner("c_inner");
        block_out.in()
            .compute_at(state, blocks)
            .reorder_storage(c, ii)
            .split(c, c_outer, c_inner, width)
            .reorder(c_inner, c_outer, ii)
            .vectorize(c_inner, VW)
            .unroll(c_inner);
        block_out.compute_at(block_out.in(), c_outer).reorder_storage(c, ii).vectorize(c, VW).unroll(c);
        block_out.update().reorder(c, rj).vectorize(c, VW).unroll(c);

        if (Type(element_type) != Float(32)) {
            k_block.compute_at(state, blocks).reorder_storage(c, jj).reorder(c, jj).vectorize(c, VW);
            v_block.compute_at(state, blocks).vectorize(c, VW);
        }
        for (Func f : {score, masked_score, block_max, weight, block_sum, block_out}) f.bound_extent(kb, 1);

        // The chunks merged per (kv head, batch); out copied from them.
        Var merge_task("merge_task");
        merged.compute_root().fuse(hq, bb, merge_task).parallel(merge_task);
        merged.update().reorder(ii, splits);
        row_lse.compute_root();
        out.reorder(c, i, hq, bb).fuse(hq, bb, task).parallel(task).unroll(c);

        weight.specialize(drop_threshold == u32(0));  // only calls with dropout pay for the hash
    }

    // GPU: one thread block per tile of query rows of one (batch, head) and chunk
    // of keys, one row per thread. The key blocks run in order at block level; each is staged in
    // shared memory once by all threads (k transposed, so a row reads its keys
    // with vector loads), then each thread computes its row's block partials in
    // registers and merges them into the row's state. The staging loops are
    // gpu_threads, which makes Halide put a barrier between staging and reading.
    //
    // Everything per block is computed inside the thread loop of the merge on
    // purpose: Halide 21 gives block-level shared buffers a lifetime that ignores
    // the loop over key blocks, so a buffer last read early in the loop body (q
    // read by the scores) would share memory with one written later.
    void schedule_gpu() {
        _halide_user_assert(!generic()) << "GPU kernels need a head_dim (no generic GPU variant)";
        const bool lanes = gpu_lanes;
        _halide_user_assert(!lanes || get_target().has_feature(Target::CUDA))
            << "gpu_lanes=true needs a CUDA target (OpenCL has no gpu_lanes)";
        const bool q_in_registers = gpu_q_registers;
        _halide_user_assert(!q_in_registers || lanes) << "gpu_q_registers=true needs gpu_lanes=true";
        const int TQ = query_tile, BK = key_block, D = head_dim;
        // q, the staged k and v blocks, and on threads the state, per thread block.
        const int shared_bytes =
            int(sizeof(float)) * ((q_in_registers ? 0 : TQ * D) + 2 * BK * D + (lanes ? 0 : TQ * (D + 2)));
        _halide_user_assert(shared_bytes <= 48 * 1024)
            << "this GPU variant needs " << shared_bytes << " bytes of shared memory per block at head_dim " << D
            << "; CUDA launches at most 48 KiB without opting in: use a smaller query_tile or key_block";
        auto rows_on_threads = [&](auto &&stage) {
            if (lanes) {
                stage.gpu_lanes(ii);
            } else {
                stage.gpu_threads(ii);
            }
        };
        // Staging a block: the head dim of each key is spread over the TQ threads
        // (consecutive threads read consecutive elements: coalesced), the rest of
        // it and the keys unrolled, 8 keys at a time, so each key's address is
        // computed once, every load of it is that address plus a constant, and the
        // loads of 8 keys are in flight together (more would cost registers). k's
        // stores (transposed) become 128-bit stores of 4 keys, a 2-way bank conflict;
        // one key per thread and whole rows per store avoids it but costs more
        // stores, and at d=128 63 more registers (ptxas, sm_90).
        auto stage_block = [&](Func f) {
            Var c_outer("c_outer"), c_thread("c_thread"), jj_outer("jj_outer"), jj_inner("jj_inner");
            f.compute_at(state, blocks)
                .store_in(MemoryType::GPUShared)
                .split(c, c_outer, c_thread, TQ, TailStrategy::GuardWithIf)
                .split(jj, jj_outer, jj_inner, std::min(BK, 8))
                .reorder(c_outer, jj_inner, jj_outer, c_thread)  // one thread loop: one barrier after it
                .gpu_threads(c_thread)
                .unroll(c_outer)
                .unroll(jj_inner);
        };

        // Kernel 1: one thread block per (chunk of keys, tile of query rows, head,
        // batch); it leaves its rows' states in global memory.
        Var hb("hb");
        partial.compute_root()
            .bound(e, 0, D + 2)
            .bound(ii, 0, TQ)
            .reorder_storage(ii, e, split, io, hq, bb)  // coalesced: the rows of a tile side by side
            .reorder(e, ii, split, hq, bb, io)  // slots outermost: every head's longest tiles first
            .unroll(e)
            .fuse(hq, bb, hb)
            .gpu_blocks(split, hb, io);
        rows_on_threads(partial);

        // q of the tile: in shared memory transposed (rows innermost: no bank
        // conflicts), or in registers, each lane holding its row.
        q_scaled.compute_at(partial, split).reorder(c, ii);
        if (q_in_registers) {
            q_scaled.store_in(MemoryType::Register).unroll(c);
        } else {
            q_scaled.store_in(MemoryType::GPUShared);
        }
        rows_on_threads(q_scaled);

        // The state of the tile's rows: on lanes, registers striped across the
        // warp; on threads, shared memory.
        const MemoryType per_row = lanes ? MemoryType::Register : MemoryType::GPUShared;
        state.compute_at(partial, split).store_in(per_row);
        for (Var v : {split, io, hq, bb}) state.bound_extent(v, 1);
        rows_on_threads(state);
        state.update().reorder(ii, blocks);
        rows_on_threads(state.update());

        // Kernel 2: per tile of rows, the chunks' states merged in order.
        Func result = out;
        result.split(i, io, ii, TQ, TailStrategy::GuardWithIf).reorder(c, ii, io, hq, bb).gpu_blocks(io, hq, bb);
        rows_on_threads(result);
        result.unroll(c);
        merged.compute_at(out, io).store_in(per_row).bound_storage(io, 1);
        rows_on_threads(merged);
        merged.update().reorder(ii, splits);
        rows_on_threads(merged.update());
        row_lse.compute_at(out, io).store_in(per_row).bound_storage(io, 1);
        rows_on_threads(row_lse);

        stage_block(k_block);
        stage_block(v_block);

        // One row's partials of one block, in registers.
        for (Func f : {masked_score, weight}) {
            f.compute_at(state, ii).store_in(MemoryType::Register).unroll(jj);
        }
        score.compute_at(state, ii).store_in(MemoryType::Register).unroll(jj);
        score.update().reorder(jj, rc).vectorize(jj, 4).unroll(jj);
        if (q_in_registers) {
            score.update().unroll(rc);  // register indices must be constants
        } else if (gpu_unroll > 1) {
            RVar rc_outer("rc_outer"), rc_inner("rc_inner");
            score.update().split(rc, rc_outer, rc_inner, gpu_unroll).unroll(rc_inner);
        }
        for (Func reduction : {block_max, block_sum}) {
            reduction.compute_at(state, ii).store_in(MemoryType::Register);
            reduction.update().unroll(rj);
        }
        block_out.compute_at(state, ii).store_in(MemoryType::Register).unroll(c);
        block_out.update().reorder(c, rj).vectorize(c, 4).unroll(c).unroll(rj);
        // One key block each (Halide cannot see it through the chunk arithmetic).
        for (Func f : {score, masked_score, weight, block_max, block_sum, block_out}) f.bound_extent(kb, 1);

        partial.specialize(drop_threshold == u32(0));
    }
};

}  // namespace

HALIDE_REGISTER_GENERATOR(Attention, attention)

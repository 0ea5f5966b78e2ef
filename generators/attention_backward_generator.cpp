// The backward of the attention (docs/contract.md §1, "Gradients"): dq, dk, dv
// from q, k, v, the mask, the forward's out and lse, and dout, as one Halide
// algorithm with its schedule.
//
// Shapes are Halide's (innermost first): q(c, i, h, b), k and v(c, j, hk, b),
// mask(j, b), out and dout(c, i, h, b), lse(i, h, b); dq like q, dk like k, dv
// like v. Per head h (kv head g = h / (H / HK)), with a_ij = 1 where key j is
// allowed (mask and causal), Z_ij the dropout keep decision and P recomputed
// from the forward's lse:
//
//   P_ij  = a_ij exp(scale q_i·k_j - lse_i)       D_i  = Σ_c dO_ic O_ic
//   dP_ij = dO_i·v_j                              P̃_ij = P_ij Z_ij / (1 - p)
//   dS_ij = P_ij (Z_ij / (1 - p) dP_ij - D_i)
//   dV_j  = Σ_{h in g} Σ_i P̃_ij dO_i    dK_j = scale Σ_{h in g} Σ_i dS_ij q_i    dQ_i = scale Σ_j dS_ij k_j
//
// A row with every key masked (lse = -inf) had uniform weights 1/M over every
// key; the seed's masked_fill blocks the gradient of its scores, so it gives
// dQ_i = 0, nothing to dK, and P̃_ij = Z_ij / (1 - p) / M to dV for every key.
//
// No atomics (the same inputs give bitwise the same gradients for any thread
// count). Per tile of keys of one kv head, reducing over the group's heads and
// the blocks of query rows: P and dS of each pair of blocks, then dK and dV.
// A CPU adds each pair's share of dQ in the same pass, into the share of its
// task (a run of a kv head's key tiles); dQ sums the shares in order. A GPU
// runs dQ as a second pipeline per tile of query rows, reducing over the
// blocks of keys, which recomputes P and dS. Scores are in log2 units, as in
// the forward.
#include <algorithm>
#include <cfloat>
#include <cmath>

#include "Halide.h"
#include "attend/kernel_abi.hpp"
#include "kernel_exprs.hpp"

namespace {

using namespace Halide;
using namespace attend::kernel_exprs;

class AttentionBackward : public Generator<AttentionBackward> {
public:
    // d = dv of the variant; 0 builds the generic variant (any d and dv).
    GeneratorParam<int> head_dim{"head_dim", 64};

    // Schedule knobs. Keys per tile (CPU: on the SIMD lanes; GPU: one thread
    // block, a key per thread) and query rows per block, the pairs of blocks of
    // dK/dV (and, on a CPU, of dQ); a GPU's dQ pass: query rows per thread block
    // (a row per thread) and keys per block. Then (CPU) the SIMD width (0: the
    // target's natural width) and the register tiles of the matrix products, in
    // vectors of lanes by columns: the block's scores, dP, dK and dV (keys on
    // the lanes), and its share of dQ (the head dim on the lanes).
    GeneratorParam<int> key_tile{"key_tile", 48};
    GeneratorParam<int> query_block{"query_block", 64};
    GeneratorParam<int> query_tile{"query_tile", 48};
    GeneratorParam<int> key_block{"key_block", 64};
    GeneratorParam<int> vector_width{"vector_width", 0};
    GeneratorParam<int> tile_vectors{"tile_vectors", 3};
    GeneratorParam<int> tile_cols{"tile_cols", 4};
    GeneratorParam<int> dq_tile_vectors{"dq_tile_vectors", 2};
    GeneratorParam<int> dq_tile_cols{"dq_tile_cols", 4};

    // The element type of q, k, v, out, dout, dq, dk and dv (float32, float16 or
    // bfloat16). Every sum accumulates in float32; gradients are rounded once.
    GeneratorParam<Type> element_type{"element_type", Float(32)};

    Input<Buffer<void, 4>> q{"q"};
    Input<Buffer<void, 4>> k{"k"};
    Input<Buffer<void, 4>> v{"v"};
    Input<Buffer<uint8_t, 2>> mask{"mask"};  // read only when has_mask
    Input<Buffer<void, 4>> out{"out"};       // the forward's attention
    Input<Buffer<float, 3>> lse{"lse"};      // the forward's log-sum-exp (-inf: every key masked)
    Input<Buffer<void, 4>> dout{"dout"};
    Input<float> scale{"scale"};
    Input<bool> causal{"causal"};
    Input<bool> has_mask{"has_mask"};
    Input<uint32_t> drop_threshold{"drop_threshold"};  // 0: no dropout
    Input<float> keep_scale{"keep_scale"};             // 1 / (1 - p), 0 when p = 1
    Input<uint32_t> seed_lo{"seed_lo"};
    Input<uint32_t> seed_hi{"seed_hi"};
    Input<int32_t> causal_offset{"causal_offset"};  // as the forward's
    Input<int32_t> query_offset{"query_offset"};
    Input<int32_t> key_offset{"key_offset"};
    Input<int32_t> batch_offset{"batch_offset"};  // as the forward's
    Input<int32_t> head_offset{"head_offset"};
    // Causal: rows below this may have every key masked (the forward's), so every
    // key tile visits them for dV.
    Input<int32_t> all_keys_rows{"all_keys_rows"};
    // CPU: tasks per kv head, each a run of key tiles with its own float32
    // share of dQ (clamped to 1..tiles). dq's bits depend on it: the runtime
    // derives it from the call's shape alone.
    Input<int32_t> key_splits{"key_splits"};

    Output<Buffer<void, 4>> dq{"dq"};
    Output<Buffer<void, 4>> dk{"dk"};
    Output<Buffer<void, 4>> dv{"dv"};

    void configure() {
        const Type t = element_type;
        _halide_user_assert(t == Float(32) || t == Float(16) || t == BFloat(16))
            << "element_type must be float32, float16 or bfloat16, got " << t;
        for (auto *input : {&q, &k, &v, &out, &dout}) input->set_type(storage_type());
        for (auto *output : {&dq, &dk, &dv}) output->set_type(storage_type());
    }

    Type storage_type() const { return attend::kernel_exprs::storage_type(get_target(), element_type); }

    void generate() {
        check_kernel_abi(arginfos(), attend::kBackwardKernelArgNames);
        define_algorithm();
        if (using_autoscheduler()) {
            set_estimates();
        } else if (get_target().has_gpu_feature()) {
            schedule_gpu();
        } else {
            schedule_cpu();
        }
    }

private:
    Var c{"c"}, i{"i"}, j{"j"}, ii{"ii"}, jj{"jj"}, qb{"qb"}, kb{"kb"}, qt{"qt"}, kt{"kt"}, h{"h"}, g{"g"}, r{"r"},
        bb{"bb"};
    // Per row: lse in log2 units, and D.
    Func row_lse2{"row_lse2"}, row_delta{"row_delta"};
    // dK/dV pipeline (keys on lanes): the tile's k and v transposed, a block's q
    // and dout, its scores and dP, (P̃, dS), the block's products, the sums.
    Func kv_k{"kv_k"}, kv_v{"kv_v"}, kv_q{"kv_q"}, kv_dout{"kv_dout"}, kv_score{"kv_score"}, kv_dp{"kv_dp"},
        kv_weights{"kv_weights"}, dk_block{"dk_block"}, dv_block{"dv_block"}, kv_sum{"kv_sum"};
    // One pass (CPU): k with c innermost, a pair of blocks' share of dQ, the sums
    // (dk and dv per key tile; dq per task, a share per run of tiles), dq.
    Func kv_k_rows{"kv_k_rows"}, dq_part{"dq_part"}, dk_dv_sums{"dk_dv_sums"}, dq_shares{"dq_shares"},
        dq_total{"dq_total"};
    // dQ pipeline (rows on lanes): the tile's q and dout transposed, a block's k
    // and v, its scores and dP, dS, the block's product, the sum.
    Func dq_q{"dq_q"}, dq_dout{"dq_dout"}, dq_k{"dq_k"}, dq_v{"dq_v"}, dq_score{"dq_score"}, dq_dp{"dq_dp"},
        dq_ds{"dq_ds"}, dq_block{"dq_block"}, dq_sum{"dq_sum"};
    RDom rc, rcv, kv_blocks, rq, dq_blocks, rk, rj, key_pairs, row_pairs;

    bool generic() const { return head_dim == 0; }
    // A CPU sums dQ in the dK/dV pass (five products per pair of blocks; a task
    // owns its share of dQ); a GPU's thread blocks cannot share dQ's sums
    // without atomics, so dQ is a pass of its own there (seven products).
    bool one_pass() const { return !get_target().has_gpu_feature(); }

    // P̃ and dS of the pair (row, key) of head hh, batch b, from its score (log2
    // units, unmasked) and dP. Rows and keys past the end give 0.
    Tuple pair_gradients(Expr row, Expr key, Expr hh, Expr b, Expr score_log2, Expr dp) {
        Expr N = q.dim(1).extent(), M = k.dim(1).extent();
        Expr row_in = min(row, N - 1), key_in = min(key, M - 1);
        Expr lse_log2 = row_lse2(row_in, hh, b);
        // lse is -inf exactly when every key of the row is masked (compared as
        // bits: the kernels are compiled assuming no infinities in arithmetic).
        Expr every_key_masked = reinterpret<uint32_t>(lse(row_in, hh, b)) == u32(0xff800000u);
        Expr allowed = key_allowed(has_mask, mask(key_in, b), causal, key, row, causal_offset);
        Expr weight = select(row >= N || key >= M, 0.0f,
                             every_key_masked, 1.0f / cast<float>(M),
                             allowed, exp2_nonpositive(min(score_log2 - lse_log2, 0.0f)), 0.0f);
        Expr kept = dropout_kept(seed_lo, seed_hi, cast<uint32_t>(b) + cast<uint32_t>(batch_offset),
                                 cast<uint32_t>(hh) + cast<uint32_t>(head_offset),
                                 cast<uint32_t>(row) + cast<uint32_t>(query_offset),
                                 cast<uint32_t>(key) + cast<uint32_t>(key_offset), drop_threshold);
        Expr keep = select(kept, keep_scale, 0.0f);
        Expr dscore = select(every_key_masked, 0.0f, weight * (keep * dp - row_delta(row_in, hh, b)));
        return Tuple(weight * keep, dscore);
    }

    void define_algorithm() {
        const int BK = key_tile, BQ = query_block, TQ = query_tile, KB = key_block;
        Expr N = q.dim(1).extent(), M = k.dim(1).extent();
        Expr H = q.dim(2).extent(), HK = k.dim(2).extent();
        Expr group = H / HK;  // heads per kv head
        Expr D = generic() ? q.dim(0).extent() : Expr(int(head_dim));
        Expr DV = generic() ? v.dim(0).extent() : Expr(int(head_dim));
        Expr log2_scale = scale * float(M_LOG2E);
        rc = RDom(0, D, "rc");
        rcv = RDom(0, DV, "rcv");

        row_lse2(i, h, bb) = lse(i, h, bb) * float(M_LOG2E);
        row_delta(i, h, bb) = 0.0f;
        row_delta(i, h, bb) += widen(dout(rcv, i, h, bb), element_type) * widen(out(rcv, i, h, bb), element_type);

        // ---- dK, dV: tile kt of keys of kv head g; query block qb of head
        // g·group + r (r: the head's place in the group, so the kv head of
        // every stage is g itself) ----
        {
            Expr key = kt * BK + jj, row = qb * BQ + ii, head = g * group + r;
            Expr key_in = min(key, M - 1), row_in = min(row, N - 1);
            kv_k(jj, c, kt, g, bb) = widen(k(c, key_in, g, bb), element_type);
            kv_v(jj, c, kt, g, bb) = widen(v(c, key_in, g, bb), element_type);
            kv_q(c, ii, qb, h, bb) = widen(q(min(c, D - 1), row_in, h, bb), element_type);
            kv_dout(c, ii, qb, h, bb) = widen(dout(min(c, DV - 1), row_in, h, bb), element_type);

            kv_score(jj, ii, qb, r, kt, g, bb) = 0.0f;
            kv_score(jj, ii, qb, r, kt, g, bb) += kv_k(jj, rc, kt, g, bb) * kv_q(rc, ii, qb, head, bb);
            kv_dp(jj, ii, qb, r, kt, g, bb) = 0.0f;
            kv_dp(jj, ii, qb, r, kt, g, bb) += kv_v(jj, rcv, kt, g, bb) * kv_dout(rcv, ii, qb, head, bb);
            kv_weights(jj, ii, qb, r, kt, g, bb) = pair_gradients(
                row, key, head, bb, kv_score(jj, ii, qb, r, kt, g, bb) * log2_scale, kv_dp(jj, ii, qb, r, kt, g, bb));

            // One block's products; c runs over max(d, dv) (the columns past one's
            // own are computed from clamped loads and never stored).
            rq = RDom(0, BQ, "rq");
            dk_block(jj, c, qb, r, kt, g, bb) = 0.0f;
            dk_block(jj, c, qb, r, kt, g, bb) += kv_weights(jj, rq, qb, r, kt, g, bb)[1] * kv_q(c, rq, qb, head, bb);
            dv_block(jj, c, qb, r, kt, g, bb) = 0.0f;
            dv_block(jj, c, qb, r, kt, g, bb) += kv_weights(jj, rq, qb, r, kt, g, bb)[0] * kv_dout(c, rq, qb, head, bb);

            // The pairs of blocks: a tile's keys against the blocks of rows of the
            // group's heads. Causal: rows above the diagonal at the tile's first
            // key see none of its keys, so the blocks start at the first row that
            // does; but rows that may have every key masked (the first
            // all_keys_rows) weigh every key, so then they start at 0. (A scalar
            // condition: Halide makes it the loop's start.)
            Expr query_blocks = (N + BQ - 1) / BQ;
            auto first_block = [&](Expr tile) {
                return select(all_keys_rows > 0, 0, clamp(tile * BK - causal_offset, 0, N)) / BQ;
            };
            if (one_pass()) {
                // dQ's share of the pair of blocks: Σ over the tile's keys of dS_ij k_j
                // (k with the head dim innermost, on the lanes).
                rj = RDom(0, BK, "rj");
                kv_k_rows(c, jj, kt, g, bb) = widen(k(clamp(c, 0, D - 1), key_in, g, bb), element_type);
                dq_part(c, ii, qb, r, kt, g, bb) = 0.0f;
                dq_part(c, ii, qb, r, kt, g, bb) +=
                    kv_weights(rj, ii, qb, r, kt, g, bb)[1] * kv_k_rows(c, rj, kt, g, bb);

                // Each task, a split of the key tiles of one kv head (key_splits of
                // them, so that few kv heads still give every thread work), sums dK
                // and dV for its keys and its share of dQ for the rows of each head
                // of the group, every pair of blocks adding its products (the two
                // sums in one loop nest: see the schedule). dQ is the sum of the
                // splits' shares, in order.
                Expr key_tiles = (M + BK - 1) / BK, rows = query_blocks * BQ;
                Expr splits = clamp(key_splits, 1, key_tiles), split_tiles = (key_tiles + splits - 1) / splits;
                auto tile_of = [&](const RDom &pair) { return pair[4] * split_tiles + pair[3]; };
                auto pairs = [&](int block_rows) {
                    RDom pair({{0, block_rows}, {0, group}, {0, query_blocks}, {0, split_tiles}, {0, splits}}, "pair");
                    pair.where(tile_of(pair) < key_tiles && (!causal || pair[2] >= first_block(tile_of(pair))));
                    return pair;
                };
                key_pairs = pairs(BK);
                row_pairs = pairs(BQ);
                Expr tile = tile_of(key_pairs);
                auto key_part = [&](Func block) {
                    return block(key_pairs.x, c, key_pairs.z, key_pairs.y, tile, g, bb);
                };
                dk_dv_sums(jj, c, kt, g, bb) = Tuple(0.0f, 0.0f);
                dk_dv_sums(key_pairs.x, c, tile, g, bb) += Tuple(key_part(dk_block), key_part(dv_block));
                // A split's share of dQ for row i of the group's head r at (split·group + r)·rows + i.
                auto share_row = [&](Expr split, Expr head_in_group, Expr row) {
                    return (split * group + head_in_group) * rows + row;
                };
                Expr row_tile = tile_of(row_pairs);
                dq_shares(c, i, g, bb) = 0.0f;
                dq_shares(c, share_row(row_pairs[4], row_pairs.y, row_pairs.z * BQ + row_pairs.x), g, bb) +=
                    dq_part(c, row_pairs.x, row_pairs.z, row_pairs.y, row_tile, g, bb);
                RDom split(0, splits, "split");
                dq_total(c, i, h, bb) = 0.0f;
                dq_total(c, i, h, bb) += dq_shares(c, share_row(split, h % group, i), h / group, bb);

                dk(c, j, g, bb) = narrow(dk_dv_sums(j % BK, c, j / BK, g, bb)[0] * scale, element_type, storage_type());
                dv(c, j, g, bb) = narrow(dk_dv_sums(j % BK, c, j / BK, g, bb)[1], element_type, storage_type());
                dq(c, i, h, bb) = narrow(dq_total(c, i, h, bb) * scale, element_type, storage_type());
            } else {
                // Over the group's heads and the query blocks.
                kv_blocks = RDom(0, group, 0, query_blocks, "kv_blocks");
                kv_blocks.where(!causal || kv_blocks.y >= first_block(kt));
                auto part = [&](Func block) { return block(jj, c, kv_blocks.y, kv_blocks.x, kt, g, bb); };
                kv_sum(jj, c, kt, g, bb) = Tuple(0.0f, 0.0f);
                kv_sum(jj, c, kt, g, bb) = Tuple(kv_sum(jj, c, kt, g, bb)[0] + part(dk_block),
                                                 kv_sum(jj, c, kt, g, bb)[1] + part(dv_block));
                dk(c, j, g, bb) = narrow(kv_sum(j % BK, c, j / BK, g, bb)[0] * scale, element_type, storage_type());
                dv(c, j, g, bb) = narrow(kv_sum(j % BK, c, j / BK, g, bb)[1], element_type, storage_type());
            }
        }

        // ---- dQ: tile qt of query rows of head h; key block kb ----
        if (!one_pass()) {
            Expr row = qt * TQ + ii, key = kb * KB + jj;
            Expr key_in = min(key, M - 1), row_in = min(row, N - 1);
            dq_q(ii, c, qt, h, bb) = widen(q(c, row_in, h, bb), element_type);
            dq_dout(ii, c, qt, h, bb) = widen(dout(c, row_in, h, bb), element_type);
            dq_k(c, jj, kb, g, bb) = widen(k(c, key_in, g, bb), element_type);
            dq_v(c, jj, kb, g, bb) = widen(v(c, key_in, g, bb), element_type);

            dq_score(ii, jj, kb, qt, h, bb) = 0.0f;
            dq_score(ii, jj, kb, qt, h, bb) += dq_q(ii, rc, qt, h, bb) * dq_k(rc, jj, kb, h / group, bb);
            dq_dp(ii, jj, kb, qt, h, bb) = 0.0f;
            dq_dp(ii, jj, kb, qt, h, bb) += dq_dout(ii, rcv, qt, h, bb) * dq_v(rcv, jj, kb, h / group, bb);
            dq_ds(ii, jj, kb, qt, h, bb) =
                pair_gradients(row, key, h, bb, dq_score(ii, jj, kb, qt, h, bb) * log2_scale, dq_dp(ii, jj, kb, qt, h, bb))[1];

            rk = RDom(0, KB, "rk");
            dq_block(ii, c, kb, qt, h, bb) = 0.0f;
            dq_block(ii, c, kb, qt, h, bb) += dq_ds(ii, rk, kb, qt, h, bb) * dq_k(c, rk, kb, h / group, bb);

            // Causal: blocks wholly above the tile's diagonal have dS = 0 (a row
            // with every key masked has dS = 0 everywhere).
            Expr key_blocks = (M + KB - 1) / KB;
            Expr below_diagonal = clamp((qt * TQ + TQ - 1 + causal_offset) / KB + 1, 0, key_blocks);
            dq_blocks = RDom(0, key_blocks, "dq_blocks");
            dq_blocks.where(!causal || dq_blocks < below_diagonal);
            dq_sum(ii, c, qt, h, bb) = 0.0f;
            dq_sum(ii, c, qt, h, bb) += dq_block(ii, c, dq_blocks, qt, h, bb);
            dq(c, i, h, bb) = narrow(dq_sum(i % TQ, c, i / TQ, h, bb) * scale, element_type, storage_type());
        }

        // Every buffer dense in its innermost dim (the runtime passes dense copies
        // otherwise); rows and keys start at 0.
        for (OutputImageParam buffer : {OutputImageParam(dq), OutputImageParam(dk), OutputImageParam(dv)}) {
            buffer.dim(1).set_min(0);
        }
        if (!generic()) {
            for (auto *input : {&q, &k, &v, &out, &dout}) input->dim(0).set_bounds(0, int(head_dim));
            for (OutputImageParam buffer : {OutputImageParam(dq), OutputImageParam(dk), OutputImageParam(dv)}) {
                buffer.dim(0).set_bounds(0, int(head_dim));
            }
        }
        mask.dim(0).set_stride(Expr());  // a dummy mask has strides 0
    }

    void set_estimates() {
        const int D = generic() ? 64 : int(head_dim);
        for (auto *input : {&q, &k, &v, &out, &dout}) input->set_estimates({{0, D}, {0, 1024}, {0, 8}, {0, 2}});
        mask.set_estimates({{0, 1024}, {0, 2}});
        lse.set_estimates({{0, 1024}, {0, 8}, {0, 2}});
        for (auto *output : {&dq, &dk, &dv}) output->set_estimates({{0, D}, {0, 1024}, {0, 8}, {0, 2}});
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
    }

    // CPU: dK, dV and dQ in one pass (define_algorithm's one_pass() sums).
    void schedule_cpu() {
        const int VW = vector_width > 0 ? int(vector_width) : natural_vector_size<float>();
        // A register tile of keys wider than the tile of keys would start before
        // its first key (Halide shifts a tile inwards), at keys before 0.
        _halide_user_assert(int(key_tile) >= VW * int(tile_vectors))
            << "key_tile (" << int(key_tile) << ") is smaller than one register tile of keys (tile_vectors "
            << int(tile_vectors) << " x " << VW << " lanes)";
        _halide_user_assert(int(query_block) >= std::max<int>(tile_cols, dq_tile_cols))
            << "query_block (" << int(query_block) << ") is smaller than one register tile of rows (tile_cols "
            << int(tile_cols) << ", dq_tile_cols " << int(dq_tile_cols) << ")";

        // D per row: a task per (head, batch); with a head_dim, each row's sum in
        // SIMD lanes over its columns (contiguous in dout and out), then across
        // the lanes. (The rows on the lanes instead gather across rows: 2.6 % of
        // a d=128 call.)
        Var head_task("head_task");
        row_delta.compute_root().fuse(h, bb, head_task).parallel(head_task);
        if (generic() || int(head_dim) % VW != 0) {
            row_delta.vectorize(i, VW, TailStrategy::GuardWithIf);
            row_delta.update().reorder(i, rcv).fuse(h, bb, head_task).parallel(head_task)
                .vectorize(i, VW, TailStrategy::GuardWithIf);
        } else {
            RVar rcv_outer("rcv_outer"), rcv_lane("rcv_lane");
            Var lane("lane");
            Func delta_lanes = row_delta.update().split(rcv, rcv_outer, rcv_lane, VW).rfactor(rcv_lane, lane);
            row_delta.update().fuse(h, bb, head_task).parallel(head_task);
            delta_lanes.compute_at(row_delta, i).vectorize(lane);
            delta_lanes.update().reorder(lane, rcv_outer).vectorize(lane);
        }

        // A matrix product of the block: `block` is computed per block (at
        // `at`), `sum` (its reduction over r) per tile of lanes by `cols`
        // columns, kept in registers.
        auto register_tiled = [&](Func block, Func sum, Var lane, Var col, RVar r, LoopLevel at,
                                  int vectors = 0, int cols = 0) {
            const int lanes_per_tile = VW * (vectors > 0 ? vectors : int(tile_vectors));
            Var lanes_outer("lanes_outer"), cols_outer("cols_outer"), lanes_inner("lanes_inner"), cols_inner("cols_inner");
            block.compute_at(at)
                .tile(lane, col, lanes_outer, cols_outer, lanes_inner, cols_inner, lanes_per_tile,
                      cols > 0 ? cols : int(tile_cols))
                .vectorize(lanes_inner, VW)
                .unroll(lanes_inner)
                .unroll(cols_inner)
                .store_in(MemoryType::Stack);
            sum.compute_at(block, lanes_outer).vectorize(lane, VW).unroll(lane).unroll(col);
            sum.update().reorder(lane, col, r).vectorize(lane, VW).unroll(lane).unroll(col);
        };

        // One task per (run of key tiles, kv head, batch): its tiles in turn, each
        // against every block of rows of the group's heads. Per pair of blocks:
        // the block's q and dout, its scores, dP, (P̃, dS) and products in small
        // buffers (the products in register tiles), added to the task's sums.
        // (The runs are a reduction domain's, so Halide cannot prove that they
        // write apart, which they do: each its own key tiles and share of dQ.)
        dk_dv_sums.compute_root().parallel(bb).parallel(g).vectorize(jj, VW, TailStrategy::GuardWithIf);
        dq_shares.compute_root().parallel(bb).parallel(g).vectorize(c, VW, TailStrategy::GuardWithIf);
        dk_dv_sums.update().reorder(key_pairs.x, c, key_pairs.y, key_pairs.z, key_pairs.w, key_pairs[4], g, bb)
            .parallel(bb).parallel(g).allow_race_conditions().parallel(key_pairs[4]).vectorize(key_pairs.x, VW);
        dq_shares.update().reorder(c, row_pairs.x, row_pairs.y, row_pairs.z, row_pairs.w, row_pairs[4], g, bb)
            .parallel(bb).parallel(g).allow_race_conditions().parallel(row_pairs[4])
            .vectorize(c, VW, TailStrategy::GuardWithIf);
        dq_shares.update().compute_with(dk_dv_sums.update(), row_pairs.y);  // one loop nest down to the pair
        dq_total.compute_at(dq, i).vectorize(c, VW, TailStrategy::GuardWithIf);
        dq_total.update().vectorize(c, VW, TailStrategy::GuardWithIf);
        Var task("task");
        for (Func output : {Func(dk), Func(dv), Func(dq)}) {
            const std::vector<Var> dims = output.args();  // (c, row, head, batch)
            output.fuse(dims[2], dims[3], task).parallel(task).vectorize(c, VW, TailStrategy::GuardWithIf);
        }

        const LoopLevel per_key_tile(dk_dv_sums, key_pairs.w), per_pair(dk_dv_sums, key_pairs.y);
        for (Func f : {kv_k, kv_v}) f.compute_at(per_key_tile).vectorize(jj, VW);
        if (Type(element_type) != Float(32)) {  // widened once per tile (each element is read by every row)
            kv_k_rows.compute_at(per_key_tile).vectorize(c, VW, TailStrategy::GuardWithIf);
        }
        for (Func f : {kv_q, kv_dout}) {
            f.compute_at(per_pair).bound_extent(qb, 1).bound_extent(h, 1).store_in(MemoryType::Stack)
                .vectorize(c, VW, TailStrategy::GuardWithIf);
        }
        // (P̃, dS) stored per block, each register tile of scores computed as it is stored.
        register_tiled(kv_weights, kv_score, jj, ii, rc, per_pair);
        kv_weights.specialize(drop_threshold == u32(0));  // only calls with dropout pay for the hash
        register_tiled(kv_dp.in(), kv_dp, jj, ii, rcv, per_pair);
        register_tiled(dk_block.in(), dk_block, jj, c, rq, per_pair);
        register_tiled(dv_block.in(), dv_block, jj, c, rq, per_pair);
        register_tiled(dq_part.in(), dq_part, c, ii, rj, per_pair, dq_tile_vectors, dq_tile_cols);
        for (Func f : {kv_weights, kv_dp.in(), dk_block.in(), dv_block.in(), dq_part.in()}) {
            f.bound_extent(qb, 1).bound_extent(r, 1).bound_extent(kt, 1).bound_extent(g, 1);
        }
    }

    // GPU (CUDA and OpenCL alike): dK/dV one thread block per (tile of keys,
    // kv head, batch), a key per thread, its (dk, dv) row summed in shared
    // memory over the blocks of query rows, whose q and dout are staged in
    // shared memory by all threads; each thread keeps its key's (P̃, dS) for
    // the block in registers. dQ one thread block per (tile of rows, head,
    // batch), a row per thread, like the forward's `threads` structure: the
    // blocks of k and v staged in shared memory, the row's dS for a block in
    // registers, its dq row in shared memory, its q and dout read from global
    // memory (cached). D per row is a kernel of its own.
    void schedule_gpu() {
        _halide_user_assert(!generic()) << "GPU kernels need a head_dim (no generic GPU variant)";
        const int BK = key_tile, BQ = query_block, TQ = query_tile, KB = key_block, D = head_dim;
        const int kv_shared = int(sizeof(float)) * (2 * BK * D + 2 * BQ * D);
        const int dq_shared = int(sizeof(float)) * (TQ * D + 2 * KB * D);
        _halide_user_assert(kv_shared <= 48 * 1024 && dq_shared <= 48 * 1024)
            << "this GPU backward needs " << kv_shared << " (dk, dv) and " << dq_shared
            << " (dq) bytes of shared memory per block at head_dim " << D
            << "; CUDA launches at most 48 KiB without opting in: use a smaller key_tile, query_block, query_tile "
               "or key_block";

        Var i_outer("i_outer"), i_inner("i_inner");
        row_delta.compute_root()
            .split(i, i_outer, i_inner, 64, TailStrategy::GuardWithIf)
            .gpu_blocks(i_outer, h, bb)
            .gpu_threads(i_inner);
        row_delta.update()
            .split(i, i_outer, i_inner, 64, TailStrategy::GuardWithIf)
            .reorder(rcv, i_inner, i_outer, h, bb)
            .gpu_blocks(i_outer, h, bb)
            .gpu_threads(i_inner);

        // Staging a block of `f` (c, rows) in shared memory: the head dim spread
        // over `threads` threads (consecutive threads, consecutive elements).
        auto stage = [&](Func f, Var rows, LoopLevel at, int threads) {
            Var c_outer("c_outer"), c_thread("c_thread");
            f.compute_at(at)
                .store_in(MemoryType::GPUShared)
                .split(c, c_outer, c_thread, threads, TailStrategy::GuardWithIf)
                .reorder(c_outer, rows, c_thread)  // one thread loop: one barrier after it
                .gpu_threads(c_thread)
                .unroll(c_outer);
        };

        // ---- dK, dV ----
        Func kv_result = kv_sum.in();  // dk and dv read it: one kernel per output copies it
        kv_result.compute_root().bound(jj, 0, BK).bound(c, 0, D).reorder(c, jj, kt, g, bb).gpu_blocks(kt, g, bb)
            .gpu_threads(jj);
        for (Func output : {Func(dk), Func(dv)}) output.gpu_blocks(j, g, bb).gpu_threads(c);
        kv_sum.compute_at(kv_result, kt).store_in(MemoryType::GPUShared).reorder(c, jj).gpu_threads(jj);
        kv_sum.update().reorder(c, jj, kv_blocks.x, kv_blocks.y).gpu_threads(jj);
        stage(kv_q, ii, LoopLevel(kv_sum, kv_blocks.x), BK);
        stage(kv_dout, ii, LoopLevel(kv_sum, kv_blocks.x), BK);
        // A thread's key against the block's rows, in registers.
        const LoopLevel per_key(kv_sum, jj);
        kv_weights.compute_at(per_key).store_in(MemoryType::Register).unroll(ii);
        for (auto [product, r] : {std::pair{kv_score, rc}, {kv_dp, rcv}}) {
            product.compute_at(per_key).store_in(MemoryType::Register).unroll(ii);
            product.update().reorder(ii, r.x).unroll(ii);
        }
        for (Func block : {dk_block, dv_block}) {
            block.compute_at(kv_sum, c).store_in(MemoryType::Register);
            block.update().unroll(rq);
        }

        // ---- dQ ----
        dq.split(i, qt, ii, TQ, TailStrategy::GuardWithIf).reorder(c, ii, qt, h, bb).gpu_blocks(qt, h, bb)
            .gpu_threads(ii).unroll(c);
        dq_sum.compute_at(dq, qt).store_in(MemoryType::GPUShared).reorder(c, ii).gpu_threads(ii);
        dq_sum.update().reorder(c, ii, dq_blocks).gpu_threads(ii);
        stage(dq_k, jj, LoopLevel(dq_sum, dq_blocks.x), TQ);
        stage(dq_v, jj, LoopLevel(dq_sum, dq_blocks.x), TQ);
        const LoopLevel per_row(dq_sum, ii);
        dq_ds.compute_at(per_row).store_in(MemoryType::Register).unroll(jj);
        for (auto [product, r] : {std::pair{dq_score, rc}, {dq_dp, rcv}}) {
            product.compute_at(per_row).store_in(MemoryType::Register).unroll(jj);
            product.update().reorder(jj, r.x).unroll(jj);
        }
        dq_block.compute_at(dq_sum, c).store_in(MemoryType::Register);
        dq_block.update().unroll(rk);
    }
};

}  // namespace

HALIDE_REGISTER_GENERATOR(AttentionBackward, attention_backward)

// Calls too large for the kernels' 32-bit indexing run as kernel calls on
// pieces of their tensors (runtime/pieces.cpp). With the limit lowered
// (attend::testing::set_max_kernel_view_elements), small calls run in every
// kind of piece: batches, groups of heads, heads of one group, rows, keys.
// Unless the keys are cut, each row sees its keys in one kernel call as in the
// whole call, so out, lse and the gradients are bitwise the whole call's
// (dropout included: the pieces' batch and head offsets). Cut keys are merged
// by their log-sum-exp, within the merge bound of the oracle.
#include <cstring>

#include "backward_support.hpp"
#include "low_precision.hpp"

using namespace attend;
using namespace attend::test;

namespace {

// The limit, lowered for a scope.
struct ViewLimit {
    int64_t previous;
    explicit ViewLimit(int64_t elements) : previous(testing::set_max_kernel_view_elements(elements)) {}
    ~ViewLimit() { testing::set_max_kernel_view_elements(previous); }
    ViewLimit(const ViewLimit &) = delete;
    ViewLimit &operator=(const ViewLimit &) = delete;
};

// b = 3 batches, h = 4 heads over 2 kv heads, n = 37 rows, m = 53 keys: in units
// of d elements, q holds 148 per batch, 74 per group of heads, 37 per head; k
// 106 per batch and 53 per kv head.
ProblemSpec spec_for(int64_t d) {
    ProblemSpec spec = spec_of(3, 4, 37, 53, d);
    spec.kv_heads = 2;
    return spec;
}

struct Cut {
    const char *what;
    int64_t limit_in_d;  // the limit in units of d elements
    bool keys_cut;
};
const Cut kCuts[] = {
    {"batches (2 + 1)", 2 * 148, false},
    {"groups of heads", 100, false},
    {"heads of a group", 60, false},
    {"rows (19 + 18) and keys (27 + 26)", 30, true},
    {"3 rows and 3 keys", 3, true},
};

// Batch 0: a random mask; batch 1: its first 20 keys masked (rows fully masked
// in some key pieces only); batch 2: every key masked (the mean of v over all
// keys, which the merge must keep).
Tensor<uint8_t> mask_with_masked_rows(int64_t m) {
    auto mask = random_mask(3, m, 0.6, 5);
    for (int64_t j = 0; j < m; j++) {
        mask.at({1, j}) = j >= 20;
        mask.at({2, j}) = 0;
    }
    return mask;
}

struct Case {
    const char *what;
    Options options;
    bool mask;
};

std::vector<Case> cases() {
    Case top_left{"mask, causal, dropout 0.3, query_offset 5", {}, true};
    top_left.options.causal = true;
    top_left.options.training = true;
    top_left.options.dropout = 0.3f;
    top_left.options.seed = 0xfeedbeef12ull;
    top_left.options.query_offset = 5;
    Case bottom_right{"bottom-right causal, dropout 0.2", {}, false};
    bottom_right.options.causal = true;
    bottom_right.options.causal_align = CausalAlign::BottomRight;
    bottom_right.options.training = true;
    bottom_right.options.dropout = 0.2f;
    Case plain{"no mask, causal or dropout", {}, false};
    return {top_left, bottom_right, plain};
}

bool same_bits(const std::vector<float> &a, const std::vector<float> &b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
}

}  // namespace

TEST_CASE("a call in pieces (batches, groups of heads, heads, rows, keys) equals the whole call: every float32 "
          "CPU kernel, with masks, causal and dropout") {
    for (const KernelInfo &kernel : available_kernels()) {
        if (kernel.operation != Operation::Forward || kernel.device != Device::CPU ||
            kernel.dtype != DType::Float32 || kernel.max_rows > 0) {
            continue;
        }
        const int64_t d = kernel.head_dim ? kernel.head_dim : 48;
        for (const Case &c : cases()) {
            Problem whole = make_problem(spec_for(d), c.options);
            whole.options.kernel = kernel.name;
            if (c.mask) whole.mask = mask_with_masked_rows(whole.shape.m);
            const Expected expected = whole.expected();
            Problem reference_run = whole;
            reference_run.run();
            for (const Cut &cut : kCuts) {
                Problem pieces = whole;
                {
                    ViewLimit limit(cut.limit_in_d * d);
                    pieces.run();
                }
                INFO(kernel.name << ", " << std::string(c.what) << ", pieces of " << std::string(cut.what));
                if (!cut.keys_cut) {
                    CHECK(same_bits(pieces.out.dense(), reference_run.out.dense()));
                    CHECK(same_bits(pieces.lse->dense(), reference_run.lse->dense()));
                } else {
                    const int key_pieces = cut.limit_in_d == 3 ? 18 : 2;
                    const double tolerance = merge_tolerance(whole, expected, key_pieces);
                    const auto compared = compare(pieces.out.dense(), expected);
                    INFO("max error " << compared.max_error << ", tolerance " << tolerance);
                    CHECK(compared.not_finite == 0);
                    CHECK(compared.max_error <= tolerance);
                    check_lse(pieces, expected.lse);
                }
            }
        }
    }
}

TEST_CASE("decoding in pieces of keys: merged within the bound of the oracle") {
    for (const KernelInfo &kernel : available_kernels()) {
        if (kernel.operation != Operation::Forward || kernel.max_rows == 0 || kernel.dtype != DType::Float32) continue;
        const int64_t d = kernel.head_dim;
        ProblemSpec spec = spec_of(2, 4, 1, 300, d);  // one new query per head, 2 heads per kv head
        spec.kv_heads = 2;
        spec.mask = true;
        Options options;
        options.causal = true;
        options.causal_align = CausalAlign::BottomRight;
        Problem p = make_problem(spec, options);
        p.options.kernel = kernel.name;
        const Expected expected = p.expected();
        for (int64_t keys_per_piece : {100, 7}) {
            std::fill(p.out.storage.begin(), p.out.storage.end(), NAN);
            ViewLimit limit(keys_per_piece * d);  // a kv head's k: 300 d
            p.run();
            const int pieces = int((300 + keys_per_piece - 1) / keys_per_piece);
            const double tolerance = merge_tolerance(p, expected, pieces);
            const auto compared = compare(p.out.dense(), expected);
            INFO(kernel.name << ", " << pieces << " key pieces: max error " << compared.max_error << ", tolerance "
                             << tolerance);
            CHECK(compared.not_finite == 0);
            CHECK(compared.max_error <= tolerance);
            check_lse(p, expected.lse);
        }
    }
}

TEST_CASE("16-bit calls in pieces: heads bitwise, keys within the rounding of each piece's out") {
    for (DType dtype : built_16bit_dtypes()) {
        const int64_t d = built_head_dims().front();
        Case c = cases().front();
        Problem whole = make_problem(spec_for(d), c.options);
        whole.mask = mask_with_masked_rows(whole.shape.m);
        round_inputs(whole, dtype);
        const Expected expected = whole.expected();
        LowPrecisionRun reference_run(whole, dtype);
        reference_run.run();
        LowPrecisionRun heads(whole, dtype), keys(whole, dtype);
        {
            ViewLimit limit(60 * d);
            heads.run();
        }
        {
            ViewLimit limit(30 * d);
            keys.run();
        }
        INFO(to_string(dtype));
        CHECK(heads.out.storage == reference_run.out.storage);
        CHECK(same_bits(heads.lse.dense(), reference_run.lse.dense()));
        // Each key piece's out is rounded to the dtype before the merge (u·max|v|),
        // and the merged out once more (u·|out| <= u·max|v|).
        double max_v = 0;
        for (float x : whole.v.dense()) max_v = std::max(max_v, double(std::fabs(x)));
        const double tolerance = merge_tolerance(whole, expected, 2) + 2.0 * unit_roundoff(dtype) * max_v;
        const auto compared = compare(keys.out_values(), expected);
        INFO("max error " << compared.max_error << ", tolerance " << tolerance);
        CHECK(compared.not_finite == 0);
        CHECK(compared.max_error <= tolerance);
    }
}

TEST_CASE("the backward in pieces of batches and groups of heads: bitwise the whole call's gradients") {
    for (const KernelInfo &kernel : available_kernels()) {
        if (kernel.operation != Operation::Backward || kernel.device != Device::CPU ||
            kernel.dtype != DType::Float32) {
            continue;
        }
        const int64_t d = kernel.head_dim ? kernel.head_dim : 48;
        Options options = cases().front().options;
        options.kernel = kernel.name;
        Backward whole(spec_for(d), options);
        whole.run(options);
        for (int64_t limit_in_d : {2 * 148, 100}) {
            Backward pieces = whole;
            for (Tensor<float> *g : {&pieces.dq, &pieces.dk, &pieces.dv}) {
                std::fill(g->storage.begin(), g->storage.end(), NAN);
            }
            {
                ViewLimit limit(limit_in_d * d);
                pieces.run(options);
            }
            INFO(kernel.name << ", limit " << limit_in_d << " d");
            CHECK(same_bits(pieces.dq.dense(), whole.dq.dense()));
            CHECK(same_bits(pieces.dk.dense(), whole.dk.dense()));
            CHECK(same_bits(pieces.dv.dense(), whole.dv.dense()));
        }
        // A group's heads sum into their kv head's dk and dv: the backward does not cut them.
        Backward too_small = whole;
        for (Tensor<float> *g : {&too_small.dq, &too_small.dk, &too_small.dv}) {
            std::fill(g->storage.begin(), g->storage.end(), NAN);
        }
        ViewLimit limit(60 * d);
        const std::string message = rejection_of([&] { too_small.run(options); });
        INFO(kernel.name << ": " << message);
        CHECK(message.find("q: ") != std::string::npos);
        CHECK(message.find("pieces of whole batches and groups of heads") != std::string::npos);
        for (const Tensor<float> *g : {&too_small.dq, &too_small.dk, &too_small.dv}) {
            CHECK(std::all_of(g->storage.begin(), g->storage.end(), [](float x) { return std::isnan(x); }));
        }
    }
}

TEST_CASE("a limit below one row of one head: an error naming the tensor, out untouched") {
    const int64_t d = built_head_dims().front();
    Problem p = make_problem(spec_for(d));
    ViewLimit limit(d - 1);
    const std::string message = rejection_of([&] { p.run(); });
    CHECK(message.find("q: ") != std::string::npos);
    CHECK(message.find("one row of one head") != std::string::npos);
    for (float x : p.out.storage) CHECK(std::isnan(x));
    CHECK_THROWS_AS(testing::set_max_kernel_view_elements(0), std::invalid_argument);
    CHECK_THROWS_AS(testing::set_max_kernel_view_elements(int64_t(1) << 31), std::invalid_argument);
}

TEST_CASE("a dim of size 1 may have a stride past 32 bits: it is never stepped") {
    const int64_t d = built_head_dims().front();
    ProblemSpec spec = spec_of(1, 2, 9, 11, d);
    spec.mask = true;
    Problem dense = make_problem(spec);
    dense.run();
    Problem strided = make_problem(spec);
    for (Tensor<float> *t : {&strided.q, &strided.k, &strided.v, &strided.out}) t->strides[0] = int64_t(1) << 40;
    strided.run();
    CHECK(same_bits(strided.out.dense(), dense.out.dense()));
    CHECK(same_bits(strided.lse->dense(), dense.lse->dense()));
}

// The log-sum-exp output and attend::merge: lse against the oracle's (including
// -inf for fully masked rows), attention over all keys equal to the merge of
// attentions over a split of the keys into parts, and shards of a sequence at
// their global positions (Options::query_offset, key_offset).
#include <functional>
#include <numeric>

#include "support.hpp"

using namespace attend;
using namespace attend::test;

namespace {

// Keys [begin, end) of a tensor [b, hk, m, e] (or a mask [b, m]), as a dense copy.
template <class T>
Tensor<T> key_slice(const Tensor<T> &t, int64_t begin, int64_t end) {
    const int key_dim = t.shape.size() == 2 ? 1 : 2;
    auto shape = t.shape;
    shape[size_t(key_dim)] = end - begin;
    auto part = make_tensor<T>(shape, t.dtype);
    auto dense = t.dense();
    const int64_t inner = t.shape.size() == 2 ? 1 : t.shape[3];
    const int64_t outer = t.numel() / (t.shape[size_t(key_dim)] * inner);
    for (int64_t o = 0; o < outer; o++) {
        for (int64_t j = begin; j < end; j++) {
            for (int64_t e = 0; e < inner; e++) {
                part.storage[size_t((o * (end - begin) + j - begin) * inner + e)] =
                    dense[size_t((o * t.shape[size_t(key_dim)] + j) * inner + e)];
            }
        }
    }
    return part;
}

// Cuts [0, m) into `parts` non-empty ranges of random lengths.
std::vector<int64_t> random_cuts(int64_t m, int parts, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<int64_t> inner(size_t(m - 1));
    std::iota(inner.begin(), inner.end(), 1);
    std::shuffle(inner.begin(), inner.end(), rng);
    std::vector<int64_t> cuts(inner.begin(), inner.begin() + (parts - 1));
    cuts.push_back(0);
    cuts.push_back(m);
    std::sort(cuts.begin(), cuts.end());
    return cuts;
}

// Batch 0: a random mask. Batch 1: the keys of the first part all masked (its rows
// are fully masked there but not overall). Batch 2: every key masked (uniform
// weights over all keys, which only the key counts can give).
Tensor<uint8_t> mask_for_merge(int64_t m, int64_t first_part_end) {
    auto mask = random_mask(3, m, 0.6, 11);
    for (int64_t j = 0; j < m; j++) {
        mask.at({1, j}) = j >= first_part_end;
        mask.at({2, j}) = 0;
    }
    return mask;
}

void check_merge(int parts, bool with_mask, bool in_place) {
    ProblemSpec spec = spec_of(3, 2, 37, 300, 64);
    auto whole = make_problem(spec);
    auto cuts = random_cuts(spec.m, parts, 100 + uint32_t(parts));
    if (with_mask) whole.mask = mask_for_merge(spec.m, cuts[1]);
    auto expected = whole.expected();

    // Part 0 accumulates the others, one merge at a time.
    auto run_part = [&](size_t part) {
        Problem p = make_problem(spec);
        p.shape.m = cuts[part + 1] - cuts[part];
        p.q = whole.q;
        p.k = key_slice(whole.k, cuts[part], cuts[part + 1]);
        p.v = key_slice(whole.v, cuts[part], cuts[part + 1]);
        if (with_mask) p.mask = key_slice(*whole.mask, cuts[part], cuts[part + 1]);
        p.run();
        return p;
    };
    Problem acc = run_part(0);
    int64_t acc_keys = cuts[1];
    for (size_t part = 1; part + 1 < cuts.size(); part++) {
        Problem next = run_part(part);
        DLTensor oa = acc.out.dl(), la = acc.lse->dl(), ob = next.out.dl(), lb = next.lse->dl();
        const int64_t keys = cuts[part + 1] - cuts[part];
        if (in_place) {
            merge(oa, la, acc_keys, ob, lb, keys, oa, la);
        } else {
            auto out = nan_tensor(acc.out.shape), lse = nan_tensor(acc.lse->shape);
            DLTensor o = out.dl(), l = lse.dl();
            merge(oa, la, acc_keys, ob, lb, keys, o, l);
            acc.out = out;
            acc.lse = lse;
        }
        acc_keys += keys;
    }
    CHECK(acc_keys == spec.m);

    const double tolerance = merge_tolerance(whole, expected, parts);
    auto c = compare(acc.out.dense(), expected);
    INFO(parts << " parts, mask " << with_mask << ", in place " << in_place << ": max error " << c.max_error
               << ", tolerance " << tolerance);
    CHECK(c.not_finite == 0);
    CHECK(c.max_error <= tolerance);
    whole.lse = acc.lse;
    check_lse(whole, expected.lse);
}

// Shards of the keys with their global positions (Options::key_offset), merged,
// against the oracle of the whole call: `whole` is the whole call's options, run
// by `kernel` at `isa`. A bottom-right call's shards run TopLeft with
// query_offset + M - N (the documented way), so that case has no dropout.
void check_shards(const KernelInfo &kernel, CpuIsa isa, const Options &whole_options, int parts) {
    const int64_t d = kernel.head_dim ? kernel.head_dim : 48;
    ProblemSpec spec = spec_of(3, 2, 37, 300, d);
    auto whole = make_problem(spec, whole_options);
    auto cuts = random_cuts(spec.m, parts, 200 + uint32_t(parts));
    whole.mask = mask_for_merge(spec.m, cuts[1]);
    auto expected = whole.expected();

    Problem acc;
    int64_t acc_keys = 0;
    for (size_t part = 0; part + 1 < cuts.size(); part++) {
        Problem p = make_problem(spec, whole_options);
        p.options.kernel = kernel.name;
        p.options.cpu_isa = isa;
        p.options.key_offset = whole_options.key_offset + cuts[part];
        if (whole_options.causal_align == CausalAlign::BottomRight) {
            p.options.causal_align = CausalAlign::TopLeft;
            p.options.query_offset = whole_options.query_offset + spec.m - spec.n;
        }
        p.shape.m = cuts[part + 1] - cuts[part];
        p.q = whole.q;
        p.k = key_slice(whole.k, cuts[part], cuts[part + 1]);
        p.v = key_slice(whole.v, cuts[part], cuts[part + 1]);
        p.mask = key_slice(*whole.mask, cuts[part], cuts[part + 1]);
        p.run();
        if (part == 0) {
            acc = p;
        } else {
            DLTensor oa = acc.out.dl(), la = acc.lse->dl(), ob = p.out.dl(), lb = p.lse->dl();
            merge(oa, la, acc_keys, ob, lb, p.shape.m, oa, la);
        }
        acc_keys += p.shape.m;
    }
    const double tolerance = merge_tolerance(whole, expected, parts);
    auto c = compare(acc.out.dense(), expected);
    INFO(kernel.name << " " << to_string(isa) << ", " << parts << " parts, causal " << whole_options.causal
                     << (whole_options.causal_align == CausalAlign::BottomRight ? " bottom-right" : "")
                     << ", dropout " << whole_options.dropout << ", query_offset " << whole_options.query_offset
                     << ": max error " << c.max_error << ", tolerance " << tolerance);
    CHECK(c.not_finite == 0);
    CHECK(c.max_error <= tolerance);
    whole.lse = acc.lse;
    check_lse(whole, expected.lse);
}

}  // namespace

TEST_CASE("shards of the keys at their global positions (key_offset), merged, equal the whole call: every "
          "float32 CPU kernel, with a mask, causal and dropout") {
    for (const auto &kernel : available_kernels()) {
        if (kernel.operation != Operation::Forward || kernel.device != Device::CPU || kernel.dtype != DType::Float32) {
            continue;
        }
        for (CpuIsa isa : supported_cpu_isas()) {
            Options dropout;  // top-left causal and dropout, the whole call itself a shard of the queries
            dropout.causal = true;
            dropout.training = true;
            dropout.dropout = 0.3f;
            dropout.seed = 0x1234567890ull;
            dropout.query_offset = 5;
            check_shards(kernel, isa, dropout, 3);
            Options bottom_right;  // n < m: its diagonal cuts every shard differently
            bottom_right.causal = true;
            bottom_right.causal_align = CausalAlign::BottomRight;
            check_shards(kernel, isa, bottom_right, 4);
        }
    }
}

TEST_CASE("query_offset and key_offset: the dropout mask is a function of the global positions") {
    // Rows 10.. of a call equal a call over those rows with query_offset 10; keys likewise.
    auto spec = spec_of(1, 2, 30, 50, 64);
    Options options;
    options.training = true;
    options.dropout = 0.5f;
    options.seed = 77;
    auto whole = make_problem(spec, options);
    whole.run();
    auto tail = make_problem(spec_of(1, 2, 20, 50, 64), options);
    tail.options.query_offset = 10;
    for (int64_t h = 0; h < 2; h++)
        for (int64_t i = 0; i < 20; i++)
            for (int64_t c = 0; c < 64; c++) tail.q.at({0, h, i, c}) = whole.q.at({0, h, i + 10, c});
    tail.k = whole.k;
    tail.v = whole.v;
    tail.run();
    // The same rows over the same keys: equal within rounding (a different mask
    // would move them by about |v|).
    const double tolerance = fp32_tolerance(whole);
    double largest = 0;
    for (int64_t h = 0; h < 2; h++)
        for (int64_t i = 0; i < 20; i++)
            for (int64_t c = 0; c < 64; c++) {
                largest = std::max(largest, double(std::fabs(tail.out.at({0, h, i, c}) - whole.out.at({0, h, i + 10, c}))));
            }
    CHECK(largest <= tolerance);
    // Another offset draws another mask.
    auto shifted = make_problem(spec, options);
    shifted.options.key_offset = 1;
    shifted.run();
    CHECK(shifted.out.storage != whole.out.storage);
}

TEST_CASE("offsets at the 32-bit limit: a shard at query_offset 2^31 - 1 - n and key_offset 2^31 - 1 - m matches "
          "the oracle, causal, both alignments, with dropout") {
    for (const auto &kernel : available_kernels()) {
        if (kernel.operation != Operation::Forward || kernel.device != Device::CPU || kernel.dtype != DType::Float32) {
            continue;
        }
        for (CausalAlign align : {CausalAlign::TopLeft, CausalAlign::BottomRight}) {
            const int64_t d = kernel.head_dim ? kernel.head_dim : 48;
            Options options;
            options.causal = true;
            options.causal_align = align;
            options.training = true;
            options.dropout = 0.25f;
            options.kernel = kernel.name;
            auto spec = spec_of(1, 2, 37, 50, d);
            options.query_offset = 2147483647 - spec.n;
            options.key_offset = 2147483647 - spec.m - (align == CausalAlign::TopLeft ? 20 : 0);
            auto p = make_problem(spec, options);
            INFO(kernel.name << (align == CausalAlign::TopLeft ? " top-left" : " bottom-right"));
            check_against_reference(p, p.expected());
        }
    }
}

TEST_CASE("lse is -inf exactly for rows with every key masked, finite for the others") {
    auto spec = spec_of(2, 2, 50, 70, 64);
    Options options;
    options.causal = true;
    options.causal_align = CausalAlign::BottomRight;  // m > n: every row sees some keys
    auto p = make_problem(spec, options);
    p.mask = random_mask(2, 70, 0.5, 3);
    for (int64_t j = 0; j < 70; j++) p.mask->at({1, j}) = 0;  // batch 1: all masked
    auto expected = p.expected();
    check_against_reference(p, expected);
    for (int64_t h = 0; h < 2; h++) {
        for (int64_t i = 0; i < 50; i++) {
            CHECK(std::isfinite(p.lse->at({0, h, i})));
            CHECK(p.lse->at({1, h, i}) == -INFINITY);
        }
    }
}

TEST_CASE("asking for lse changes nothing in out, and dropout does not change lse") {
    auto spec = spec_of(1, 3, 77, 90, 64);
    spec.mask = true;
    auto with = make_problem(spec), without = make_problem(spec);
    without.lse.reset();
    with.run();
    without.run();
    CHECK(with.out.storage == without.out.storage);

    Options dropout;
    dropout.training = true;
    dropout.dropout = 0.3f;
    dropout.seed = 9;
    auto dropped = make_problem(spec, dropout);
    dropped.run();
    auto expected = with.expected();
    check_lse(dropped, expected.lse);  // the oracle's lse ignores dropout too
}

TEST_CASE("lse through Halide buffers, with strides") {
    auto p = make_problem(spec_of(2, 2, 33, 40, 32));
    auto expected = p.expected();
    Halide::Runtime::Buffer<float> q(p.q.storage.data(), 32, 33, 2, 2), k(p.k.storage.data(), 32, 40, 2, 2),
        v(p.v.storage.data(), 32, 40, 2, 2), out(32, 33, 2, 2);
    // lse (n, h, b) inside a larger buffer: every other element.
    std::vector<float> storage(size_t(2 * 33 * 2 * 2), NAN);
    halide_dimension_t dims[3] = {{0, 33, 2}, {0, 2, 66}, {0, 2, 132}};
    Halide::Runtime::Buffer<float> lse(storage.data(), 3, dims);
    forward(q, k, v, Halide::Runtime::Buffer<const void>(), out, lse);
    p.lse = nan_tensor({2, 2, 33});
    for (int64_t b = 0; b < 2; b++)
        for (int64_t h = 0; h < 2; h++)
            for (int64_t i = 0; i < 33; i++) p.lse->at({b, h, i}) = lse(int(i), int(h), int(b));
    check_lse(p, expected.lse);
    for (size_t e = 1; e < storage.size(); e += 2) CHECK(std::isnan(storage[e]));  // the gaps are untouched
}

TEST_CASE("attention over all keys equals the merge of attentions over a split of the keys") {
    for (int parts : {2, 8}) {
        for (bool with_mask : {false, true}) check_merge(parts, with_mask, false);
    }
    check_merge(8, true, true);  // accumulating in place
}

TEST_CASE("merge rejects bad arguments by name and leaves out and lse untouched") {
    auto a = nan_tensor({1, 2, 3, 4}), b = nan_tensor({1, 2, 3, 4}), out = nan_tensor({1, 2, 3, 4});
    auto la = nan_tensor({1, 2, 3}), lb = nan_tensor({1, 2, 3}), lse = nan_tensor({1, 2, 3});
    for (auto *t : {&a, &b, &la, &lb}) std::fill(t->storage.begin(), t->storage.end(), 0.5f);
    auto wrong_shape = nan_tensor({1, 2, 3, 5}), wrong_lse = nan_tensor({1, 2, 4});
    auto ints = make_tensor<int32_t>({1, 2, 3}, DLDataType{kDLInt, 32, 1});
    struct Case {
        const char *what;
        std::function<void()> call;
        const char *message;
    };
    DLTensor oa = a.dl(), ob = b.dl(), o = out.dl(), dla = la.dl(), dlb = lb.dl(), l = lse.dl();
    DLTensor on_gpu = b.dl();
    on_gpu.device = {kDLCUDA, 0};
    DLTensor inside_out = out.dl();  // lse over out's memory
    inside_out.ndim = 3;
    const Case cases[] = {
        {"keys_a 0", [&] { merge(oa, dla, 0, ob, dlb, 4, o, l); }, "keys_a: expected the number of keys"},
        {"keys_b negative", [&] { merge(oa, dla, 4, ob, dlb, -1, o, l); }, "keys_b: expected the number of keys"},
        {"out_b shape", [&] { DLTensor w = wrong_shape.dl(); merge(oa, dla, 4, w, dlb, 4, o, l); },
         "out_b: expected shape [1, 2, 3, 4]"},
        {"lse_b shape", [&] { DLTensor w = wrong_lse.dl(); merge(oa, dla, 4, ob, w, 4, o, l); },
         "lse_b: expected shape [1, 2, 3]"},
        {"lse_a dtype", [&] { DLTensor w = ints.dl(); merge(oa, w, 4, ob, dlb, 4, o, l); },
         "lse_a: expected dtype float32, got int32"},
        {"out_b rank", [&] { merge(oa, dla, 4, dlb, dlb, 4, o, l); }, "out_b: expected 4 dims"},
        {"device", [&] { merge(oa, dla, 4, on_gpu, dlb, 4, o, l); }, "out_b: is on cuda:0; merge runs on host"},
        {"lse over out's memory", [&] { merge(oa, dla, 4, ob, dlb, 4, o, inside_out); },
         "lse: overlaps the memory of out"},
        {"out overlapping out_a without being it", [&] {
             DLTensor shifted = a.dl();
             shifted.byte_offset = sizeof(float);  // never dereferenced: validation rejects it first
             merge(oa, dla, 4, ob, dlb, 4, shifted, l);
         },
         "out: overlaps the memory of out_a; it may be out_a itself"},
    };
    for (const auto &c : cases) {
        INFO(std::string(c.what));
        CHECK_THROWS_WITH_AS(c.call(), doctest::Contains(c.message), std::invalid_argument);
        for (float x : out.storage) CHECK(std::isnan(x));
        for (float x : lse.storage) CHECK(std::isnan(x));
    }
    // A good call afterwards works; equal lse weighs both parts by half.
    merge(oa, dla, 4, ob, dlb, 4, o, l);
    for (float x : out.storage) CHECK(x == 0.5f);
    for (float x : lse.storage) CHECK(x == doctest::Approx(0.5 + std::log(2.0)).epsilon(1e-6));
}

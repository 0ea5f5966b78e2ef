// Ring attention over MPI (attend::dist), run by ctest under mpirun with 1 to 4
// ranks. Every rank builds the same whole problem (the same seeds), runs the
// ring on its shard, and checks its rows against the oracle of the whole call
// within the merge bound (each of its query chunks merges at most 2P parts).
#define DOCTEST_CONFIG_IMPLEMENT
#include "attend/dist.hpp"
#if ATTEND_DIST_NCCL
#include <cuda_runtime_api.h>
#include <nccl.h>
#endif
#include "low_precision.hpp"

using namespace attend;
using namespace attend::test;
using dist::Layout;

namespace {

int rank_of() {
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    return rank;
}

int ranks_of() {
    int ranks = 1;
    MPI_Comm_size(MPI_COMM_WORLD, &ranks);
    return ranks;
}

const char *name_of(Layout layout) { return layout == Layout::ZigZag ? "zig-zag" : "contiguous"; }

// A tensor's shard for this rank: its shape with the sequence dim's length divided by P, NaN-filled.
template <class T>
Tensor<T> local_like(const Tensor<T> &whole, int sequence_dim) {
    auto shape = whole.shape;
    shape[size_t(sequence_dim)] /= ranks_of();
    auto t = make_tensor<T>(shape, whole.dtype);
    if constexpr (std::is_same_v<T, float>) std::fill(t.storage.begin(), t.storage.end(), NAN);
    return t;
}

template <class T>
Tensor<T> shard_of(Tensor<T> whole, int sequence_dim, Layout layout) {
    auto local = local_like(whole, sequence_dim);
    DLTensor w = whole.dl(), l = local.dl();
    dist::shard(w, sequence_dim, rank_of(), ranks_of(), layout, l);
    return local;
}

// This rank's rows of a whole [b, h, n, e] (or [b, h, n]) result, C order.
std::vector<float> my_rows(const Tensor<float> &whole, Layout layout) { return shard_of(whole, 2, layout).dense(); }

// This rank's contiguous shards of a problem's q, k, v (4-D) and an out to write.
struct Shards {
    Tensor<float> q, k, v, out;
};
Shards contiguous_shards(const Problem &whole) {
    return {shard_of(whole.q, 2, Layout::Contiguous), shard_of(whole.k, 2, Layout::Contiguous),
            shard_of(whole.v, 2, Layout::Contiguous), local_like(whole.out, 2)};
}

Tensor<float> as_tensor(std::vector<int64_t> shape, const std::vector<double> &values) {
    auto t = make_tensor<float>(std::move(shape), float32_type());
    for (size_t i = 0; i < values.size(); i++) t.storage[i] = float(values[i]);
    return t;
}

struct RingCase {
    const char *what;
    ProblemSpec spec;
    Options options;
    bool masked_rows = false;  // batch 1: the first keys masked; batch 2: every key masked
};

std::vector<RingCase> ring_cases() {
    const int64_t P = ranks_of();
    std::vector<RingCase> cases;
    ProblemSpec spec = spec_of(3, 4, 6 * P, 10 * P, 32);  // n, m: 6 and 10 per rank (zig-zag: chunks of 3 and 5)
    spec.kv_heads = 2;
    cases.push_back({"grouped-query, no mask", spec, {}});
    RingCase causal{"causal, mask with fully masked rows", spec, {}, true};
    causal.spec.n = causal.spec.m = 8 * P;
    causal.options.causal = true;
    cases.push_back(causal);
    RingCase dropout = causal;
    dropout.what = "causal, mask, dropout 0.2, offsets";
    dropout.options.training = true;
    dropout.options.dropout = 0.2f;
    dropout.options.seed = 77;
    dropout.options.query_offset = 12;
    dropout.options.key_offset = 12;
    cases.push_back(dropout);
    RingCase bottom_right{"bottom-right causal, n < m", spec, {}};
    bottom_right.options.causal = true;
    bottom_right.options.causal_align = CausalAlign::BottomRight;
    cases.push_back(bottom_right);
    RingCase multi_query{"multi-query [b, m, d] k and v, mask", spec, {}, true};
    multi_query.spec.kv_heads = 0;
    cases.push_back(multi_query);
    RingCase other_dv{"dv != d (the generic kernel), causal", spec, {}};
    other_dv.spec.dv = 48;
    other_dv.spec.n = other_dv.spec.m = 8 * P;
    other_dv.options.causal = true;
    cases.push_back(other_dv);
    return cases;
}

Tensor<uint8_t> mask_with_masked_rows(int64_t m) {
    auto mask = random_mask(3, m, 0.7, 9);
    for (int64_t j = 0; j < m; j++) {
        mask.at({1, j}) = j >= m / 2;  // under causal, its first half of rows has every key masked
        mask.at({2, j}) = 0;
    }
    return mask;
}

// This rank's rows of a ring's out (and lse, when given) against the oracle's
// rows of the whole call: within the merge bound of 2P parts, plus for 16 bits
// each part's rounding before its merge and the result's (2u·max|v|).
void check_my_rows(const std::vector<float> &got, const Tensor<float> *lse, const Problem &whole,
                   const Expected &expected, Layout layout, DType dtype, const std::string &what) {
    const auto &s = whole.shape;
    const auto want = my_rows(as_tensor({s.b, s.h, s.n, s.dv}, expected), layout);
    double max_v = 0;
    for (float x : whole.v.storage) max_v = std::max(max_v, double(std::fabs(x)));
    const double rounding = dtype == DType::Float32 ? 0.0 : 2.0 * unit_roundoff(dtype) * max_v;
    const double tolerance = merge_tolerance(whole, expected, 2 * ranks_of()) + rounding;
    const auto compared = compare(got, std::vector<double>(want.begin(), want.end()));
    INFO("rank " << rank_of() << " of " << ranks_of() << ", " << what << ", " << std::string(name_of(layout))
                 << ", " << to_string(dtype) << ": max error " << compared.max_error << ", tolerance " << tolerance);
    CHECK(compared.not_finite == 0);
    CHECK(compared.max_error <= tolerance);
    if (lse) {
        const auto want_lse = my_rows(as_tensor({s.b, s.h, s.n}, expected.lse), layout);
        Problem local = whole;
        local.lse = *lse;
        check_lse(local, std::vector<double>(want_lse.begin(), want_lse.end()));
    }
}

}  // namespace

TEST_CASE("chunks_of: contiguous and zig-zag layouts") {
    CHECK(dist::chunks_of(12, 1, 3, Layout::Contiguous).front().start == 4);
    const auto zigzag = dist::chunks_of(12, 1, 3, Layout::ZigZag);  // chunks of 2: rank 1 holds 1 and 4
    REQUIRE(zigzag.size() == 2);
    CHECK(zigzag[0].start == 2);
    CHECK(zigzag[1].start == 8);
    CHECK(zigzag[1].count == 2);
    CHECK_THROWS_WITH_AS(dist::chunks_of(10, 0, 3, Layout::Contiguous), doctest::Contains("10 positions"),
                         std::invalid_argument);
    CHECK_THROWS_AS(dist::chunks_of(12, 3, 3, Layout::ZigZag), std::invalid_argument);
}

TEST_CASE("ring_forward equals one forward over the whole sequence: both layouts, causal, masks, dropout, "
          "grouped and multi-query") {
    for (const RingCase &c : ring_cases()) {
        for (Layout layout : {Layout::Contiguous, Layout::ZigZag}) {
            Problem whole = make_problem(c.spec, c.options);
            whole.mask = c.masked_rows ? mask_with_masked_rows(c.spec.m) : random_mask(3, c.spec.m, 0.8, 4);
            const Expected expected = whole.expected();
            const int kv_dim = whole.k.shape.size() == 3 ? 1 : 2;
            auto q = shard_of(whole.q, 2, layout), k = shard_of(whole.k, kv_dim, layout),
                 v = shard_of(whole.v, kv_dim, layout);
            auto mask = shard_of(*whole.mask, 1, layout);
            auto out = local_like(whole.out, 2);
            auto lse = local_like(*whole.lse, 2);
            DLTensor tq = q.dl(), tk = k.dl(), tv = v.dl(), tmask = mask.dl(), tout = out.dl(), tlse = lse.dl();
            dist::ring_forward(tq, tk, tv, &tmask, tout, &tlse, MPI_COMM_WORLD, c.options, layout);

            check_my_rows(out.dense(), &lse, whole, expected, layout, DType::Float32, c.what);
        }
    }
}

TEST_CASE("ring_forward in 16 bits: within the merge bound and each part's rounding") {
    for (DType dtype : built_16bit_dtypes()) {
        RingCase c = ring_cases()[2];  // causal, mask with fully masked rows, dropout
        Problem whole = make_problem(c.spec, c.options);
        whole.mask = mask_with_masked_rows(c.spec.m);
        round_inputs(whole, dtype);
        const Expected expected = whole.expected();
        auto q = shard_of(to_dtype(whole.q, dtype), 2, Layout::ZigZag),
             k = shard_of(to_dtype(whole.k, dtype), 2, Layout::ZigZag),
             v = shard_of(to_dtype(whole.v, dtype), 2, Layout::ZigZag);
        auto mask = shard_of(*whole.mask, 1, Layout::ZigZag);
        auto out = local_like(to_dtype(whole.out, dtype), 2);
        DLTensor tq = q.dl(), tk = k.dl(), tv = v.dl(), tmask = mask.dl(), tout = out.dl();
        dist::ring_forward(tq, tk, tv, &tmask, tout, nullptr, MPI_COMM_WORLD, c.options, Layout::ZigZag);
        std::vector<float> got;
        for (uint16_t bits : out.dense()) got.push_back(bits_to_float(bits, dtype));
        check_my_rows(got, nullptr, whole, expected, Layout::ZigZag, dtype, c.what);
    }
}

TEST_CASE("a bad shard on one rank: every rank throws its message, nothing written") {
    const int P = ranks_of();
    if (P < 2) return;
    ProblemSpec spec = spec_of(1, 2, 4 * P, 4 * P, 32);
    Problem whole = make_problem(spec);
    auto [q, k, v, out] = contiguous_shards(whole);
    DLTensor tq = q.dl(), tk = k.dl(), tv = v.dl(), tout = out.dl();
    if (rank_of() == 1) tout.shape[3] = 5;  // rank 1's out has the wrong dv
    std::string message = rejection_of([&] { dist::ring_forward(tq, tk, tv, nullptr, tout, nullptr, MPI_COMM_WORLD); });
    INFO("rank " << rank_of() << ": " << message);
    CHECK(message.find("rank 1: out:") != std::string::npos);
    for (float x : out.storage) CHECK(std::isnan(x));

    // Shards of different shapes on different ranks: rank 0's have twice the queries.
    const Problem longer = make_problem(spec_of(1, 2, 8 * P, 4 * P, 32));
    auto q_short = rank_of() == 0 ? shard_of(longer.q, 2, Layout::Contiguous) : q;
    auto out_short = local_like(rank_of() == 0 ? longer.out : whole.out, 2);
    DLTensor sq = q_short.dl(), sout = out_short.dl();
    message = rejection_of([&] { dist::ring_forward(sq, tk, tv, nullptr, sout, nullptr, MPI_COMM_WORLD); });
    INFO("rank " << rank_of() << ": " << message);
    CHECK(message.find("every rank's shard must have the same shapes") != std::string::npos);

    // Zig-zag needs two equal chunks per rank.
    ProblemSpec odd = spec_of(1, 2, 3 * P, 3 * P, 32);
    auto odd_shards = contiguous_shards(make_problem(odd));
    DLTensor a = odd_shards.q.dl(), b = odd_shards.k.dl(), c = odd_shards.v.dl(), d = odd_shards.out.dl();
    CHECK_THROWS_WITH_AS(dist::ring_forward(a, b, c, nullptr, d, nullptr, MPI_COMM_WORLD, {}, Layout::ZigZag),
                         doctest::Contains("n and m must be even"), std::invalid_argument);
}

#if ATTEND_DIST_NCCL
namespace {

// A host tensor's copy in device memory, and its DLTensor there.
struct OnDevice {
    void *data = nullptr;
    std::vector<int64_t> shape, strides;
    DLDataType dtype{};
    template <class T>
    explicit OnDevice(const Tensor<T> &host) : shape(host.shape), strides(host.strides), dtype(host.dtype) {
        REQUIRE(cudaMalloc(&data, host.storage.size() * sizeof(T)) == cudaSuccess);
        REQUIRE(cudaMemcpy(data, host.storage.data(), host.storage.size() * sizeof(T), cudaMemcpyHostToDevice) ==
                cudaSuccess);
    }
    ~OnDevice() { cudaFree(data); }
    OnDevice(const OnDevice &) = delete;
    OnDevice &operator=(const OnDevice &) = delete;
    DLTensor dl() {
        DLTensor t{};
        t.data = data;
        t.device = {kDLCUDA, rank_of()};
        t.ndim = int(shape.size());
        t.dtype = dtype;
        t.shape = shape.data();
        t.strides = strides.data();
        return t;
    }
    template <class T>
    void copy_to(Tensor<T> &host) const {
        REQUIRE(cudaMemcpy(host.storage.data(), data, host.storage.size() * sizeof(T), cudaMemcpyDeviceToHost) ==
                cudaSuccess);
    }
};

}  // namespace

TEST_CASE("the NCCL ring on CUDA tensors: causal, a mask with fully masked rows, dropout, zig-zag (one GPU a "
          "rank: skipped without)") {
    int devices = 0;
    if (cudaGetDeviceCount(&devices) != cudaSuccess) devices = 0;
    int fewest = 0;
    MPI_Allreduce(&devices, &fewest, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD);
    if (fewest < ranks_of()) {
        MESSAGE("skipped: " << fewest << " CUDA devices for " << ranks_of() << " ranks (NCCL needs one a rank)");
        return;
    }
    REQUIRE(cudaSetDevice(rank_of()) == cudaSuccess);
    ncclUniqueId id{};
    if (rank_of() == 0) REQUIRE(ncclGetUniqueId(&id) == ncclSuccess);
    MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);
    ncclComm_t nccl = nullptr;
    REQUIRE(ncclCommInitRank(&nccl, ranks_of(), id, rank_of()) == ncclSuccess);
    cudaStream_t stream = nullptr;
    REQUIRE(cudaStreamCreate(&stream) == cudaSuccess);
    const Layout layout = Layout::ZigZag;
    std::vector<DType> dtypes{DType::Float32};
    for (DType dtype : built_16bit_dtypes()) dtypes.push_back(dtype);
    for (DType dtype : dtypes) {
        RingCase c = ring_cases()[2];  // causal, mask with fully masked rows, dropout, offsets
        Problem whole = make_problem(c.spec, c.options);
        whole.mask = mask_with_masked_rows(c.spec.m);
        if (dtype != DType::Float32) round_inputs(whole, dtype);
        const Expected expected = whole.expected();
        auto mask_shard = shard_of(*whole.mask, 1, layout);
        auto lse_shard = local_like(*whole.lse, 2);
        OnDevice mask(mask_shard), lse(lse_shard);
        std::vector<float> got;
        auto run = [&](auto q_host, auto k_host, auto v_host, auto out_host) {
            OnDevice q(q_host), k(k_host), v(v_host), out(out_host);
            DLTensor tq = q.dl(), tk = k.dl(), tv = v.dl(), tmask = mask.dl(), tout = out.dl(), tlse = lse.dl();
            dist::ring_forward(tq, tk, tv, &tmask, tout, &tlse, MPI_COMM_WORLD, nccl, stream, c.options, layout);
            REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
            out.copy_to(out_host);
            lse.copy_to(lse_shard);
            return out_host;
        };
        if (dtype == DType::Float32) {
            got = run(shard_of(whole.q, 2, layout), shard_of(whole.k, 2, layout), shard_of(whole.v, 2, layout),
                      local_like(whole.out, 2))
                      .dense();
        } else {
            for (uint16_t bits : run(shard_of(to_dtype(whole.q, dtype), 2, layout),
                                     shard_of(to_dtype(whole.k, dtype), 2, layout),
                                     shard_of(to_dtype(whole.v, dtype), 2, layout),
                                     local_like(to_dtype(whole.out, dtype), 2))
                                     .dense()) {
                got.push_back(bits_to_float(bits, dtype));
            }
        }
        check_my_rows(got, &lse_shard, whole, expected, layout, dtype, std::string("NCCL, ") + c.what);
    }
    cudaStreamDestroy(stream);
    ncclCommDestroy(nccl);
}
#endif

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    doctest::Context context(argc, argv);
    const int failed = context.run();
    int any = 0;
    MPI_Allreduce(&failed, &any, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    MPI_Finalize();
    return any ? 1 : 0;
}

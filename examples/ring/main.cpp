// Ring attention over MPI: every rank makes the same sequence (the same seed),
// keeps its zig-zag shard, runs attend::dist::ring_forward with causal
// attention, and compares its rows with one forward() over the whole sequence.
// mpirun -np 4 ./ring
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include <attend/dist.hpp>

namespace {

DLTensor tensor(std::vector<float> &data, std::vector<int64_t> &shape) {
    DLTensor t{};
    t.data = data.data();
    t.device = {kDLCPU, 0};
    t.ndim = int(shape.size());
    t.dtype = {kDLFloat, 32, 1};
    t.shape = shape.data();
    return t;
}

}  // namespace

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank = 0, ranks = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &ranks);
    const auto layout = attend::dist::Layout::ZigZag;
    const int64_t b = 1, h = 8, length = 256 * ranks, d = 64, local = length / ranks;

    std::vector<int64_t> whole_shape{b, h, length, d}, local_shape{b, h, local, d};
    std::vector<float> q(size_t(b * h * length * d)), k(q.size()), v(q.size()), whole_out(q.size());
    std::mt19937 rng(1);
    std::normal_distribution<float> normal;
    for (auto *x : {&q, &k, &v}) {
        for (float &e : *x) e = normal(rng);
    }
    attend::Options options;
    options.causal = true;
    int status = 0;
    try {
        // This rank's shards, and its rows of the ring's result.
        std::vector<float> q_local(size_t(b * h * local * d)), k_local(q_local.size()), v_local(q_local.size()),
            out_local(q_local.size()), expected(q_local.size());
        DLTensor tq = tensor(q, whole_shape), tk = tensor(k, whole_shape), tv = tensor(v, whole_shape),
                 tq_local = tensor(q_local, local_shape), tk_local = tensor(k_local, local_shape),
                 tv_local = tensor(v_local, local_shape), tout_local = tensor(out_local, local_shape);
        attend::dist::shard(tq, 2, rank, ranks, layout, tq_local);
        attend::dist::shard(tk, 2, rank, ranks, layout, tk_local);
        attend::dist::shard(tv, 2, rank, ranks, layout, tv_local);
        attend::dist::ring_forward(tq_local, tk_local, tv_local, nullptr, tout_local, nullptr, MPI_COMM_WORLD, options,
                                   layout);

        // The same rows of one forward() over the whole sequence.
        DLTensor twhole_out = tensor(whole_out, whole_shape), texpected = tensor(expected, local_shape);
        attend::forward(tq, tk, tv, nullptr, twhole_out, options);
        attend::dist::shard(twhole_out, 2, rank, ranks, layout, texpected);
        double largest = 0;
        for (size_t i = 0; i < out_local.size(); i++) {
            largest = std::max(largest, double(std::fabs(out_local[i] - expected[i])));
        }
        double overall = 0;
        MPI_Reduce(&largest, &overall, 1, MPI_DOUBLE, MPI_MAX, 0, MPI_COMM_WORLD);
        if (rank == 0) {
            std::printf("ring attention on %d ranks (zig-zag, causal, %lld positions): largest difference from one "
                        "forward() %.3g\n", ranks, static_cast<long long>(length), overall);
            status = overall < 1e-4 ? 0 : 1;
        }
    } catch (const std::exception &e) {
        std::fprintf(stderr, "rank %d: %s\n", rank, e.what());
        status = 1;
    }
    MPI_Finalize();
    return status;
}

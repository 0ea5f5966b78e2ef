// Attend's CPU benchmark: GFLOP/s of the kernels on naturalspeech2-like shapes
// (b·h = 16, n = m in {256, 1024, 4096}, d in {64, 128}, causal and not), each
// also as a fraction of this machine's FMA peak, measured in the same run by
// fma_peak (bench/fma_peak.c, built beside this program), with the same thread
// count.
//
//   attend_bench [--peak-command "..."] [Google Benchmark flags]
// Report medians on a shared machine: --benchmark_repetitions=5
// --benchmark_report_aggregates_only=true.
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <benchmark/benchmark.h>

#include "attend/attend.hpp"
#include "attend/dlpack_types.hpp"
#include "timing.hpp"

namespace {

double g_peak_gflops = 0;  // 0: not measured

struct Inputs {
    std::vector<int64_t> q_shape, kv_shape, mask_shape;
    std::vector<float> q, k, v, out;
    std::vector<uint8_t> mask;
};

DLTensor dl(void *data, std::vector<int64_t> &shape, DLDataType type) {
    DLTensor t{};
    t.data = data;
    t.device = {kDLCPU, 0};
    t.ndim = int(shape.size());
    t.shape = shape.data();
    t.dtype = type;
    return t;
}

// args: n (= m), d, causal, mask
void BM_attention(benchmark::State &state) {
    const int64_t b = 2, h = 8, n = state.range(0), m = n, d = state.range(1);
    const bool causal = state.range(2) != 0, with_mask = state.range(3) != 0;
    Inputs in;
    in.q_shape = {b, h, n, d};
    in.kv_shape = {b, h, m, d};
    in.mask_shape = {b, m};
    std::mt19937 rng(1);
    std::normal_distribution<float> normal;
    for (auto *x : {&in.q, &in.k, &in.v}) {
        x->resize(size_t(b * h * n * d));
        for (auto &e : *x) e = normal(rng);
    }
    in.out.resize(in.q.size());
    in.mask.assign(size_t(b * m), 1);
    for (int64_t j = m * 9 / 10; j < m; j++) in.mask[size_t(m + j)] = 0;  // batch 1 padded
    const DLDataType f32{kDLFloat, 32, 1};
    DLTensor q = dl(in.q.data(), in.q_shape, f32), k = dl(in.k.data(), in.kv_shape, f32),
             v = dl(in.v.data(), in.kv_shape, f32), out = dl(in.out.data(), in.q_shape, f32),
             mask = dl(in.mask.data(), in.mask_shape, attend::dlpack::kBool);
    attend::Options options;
    options.causal = causal;
    const auto call = [&] { attend::forward(q, k, v, with_mask ? &mask : nullptr, out, options); };
    double seconds = 0;
    for (auto _ : state) {
        const double elapsed = attend::timing::milliseconds(call) * 1e-3;  // seconds
        state.SetIterationTime(elapsed);
        seconds += elapsed;
    }
    const double gflops = attend::flop_count(b, h, n, m, d, d, causal) * double(state.iterations()) / seconds * 1e-9;
    state.counters["GFLOP/s"] = gflops;
    if (g_peak_gflops > 0) state.counters["of_peak"] = gflops / g_peak_gflops;
    state.SetLabel(attend::select_kernel(attend::Device::CPU, attend::DType::Float32, d, d, {})->name);
}

BENCHMARK(BM_attention)
    ->ArgNames({"n", "d", "causal", "mask"})
    ->ArgsProduct({{256, 1024, 4096}, {64, 128}, {0, 1}, {0}})
    ->Args({1024, 64, 0, 1})
    ->Args({1024, 64, 1, 1})
    ->Unit(benchmark::kMillisecond)
    ->UseManualTime();

// Runs fma_peak and reads "<threads> <isa> <GFLOP/s>".
double measure_peak(const std::string &command) {
    FILE *pipe = popen(command.c_str(), "r");
    if (!pipe) return 0;
    int threads = 0;
    char isa[32] = {};
    double gflops = 0;
    int fields = std::fscanf(pipe, "%d %31s %lf", &threads, isa, &gflops);
    pclose(pipe);
    if (fields != 3) return 0;
    std::fprintf(stderr, "fma_peak: %d threads, %s, %.1f GFLOP/s\n", threads, isa, gflops);
    return gflops;
}

}  // namespace

int main(int argc, char **argv) {
    std::string peak_command = ATTEND_FMA_PEAK_COMMAND;
    std::vector<char *> args;
    for (int i = 0; i < argc; i++) {
        if (std::strcmp(argv[i], "--peak-command") == 0 && i + 1 < argc) {
            peak_command = argv[++i];
        } else {
            args.push_back(argv[i]);
        }
    }
    int count = int(args.size());
    benchmark::Initialize(&count, args.data());
    if (!peak_command.empty()) g_peak_gflops = measure_peak(peak_command);
    if (g_peak_gflops <= 0) std::fprintf(stderr, "fma_peak unavailable: no peak_fraction column\n");
    benchmark::AddCustomContext("fma_peak_gflops", std::to_string(g_peak_gflops));
    benchmark::RunSpecifiedBenchmarks();
    benchmark::Shutdown();
    return 0;
}

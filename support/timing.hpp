// Timing for the CLI, the benchmarks and the tuner's probe: one clock, one
// warm-up rule, one median. (Not part of libattend.)
#pragma once

#include <algorithm>
#include <chrono>
#include <vector>

namespace attend::timing {

// Milliseconds that one call of `call` takes.
template <class F>
double milliseconds(F &&call) {
    const auto start = std::chrono::steady_clock::now();
    call();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

// Milliseconds of each of `repeats` calls, after one untimed warm-up call (it
// pays for first-touch page faults, thread pool start-up and kernel loading).
template <class F>
std::vector<double> time_calls(F &&call, int repeats) {
    call();
    std::vector<double> ms;
    for (int r = 0; r < repeats; r++) ms.push_back(milliseconds(call));
    return ms;
}

// A GPU's milliseconds per call, `repeats` samples. After a first call (which
// loads the kernels), calls run for kGpuWarmUpMs, as GPUs raise their clocks under
// load; each sample is then a batch of calls filling about kGpuSampleMs with one
// wait at its end (launches overlap the kernels, as in an application that does
// not wait after every call).
constexpr double kGpuWarmUpMs = 200, kGpuSampleMs = 20;
template <class Call, class Wait>
std::vector<double> time_gpu_calls(Call &&call, Wait &&wait, int repeats, int &calls_per_sample) {
    using Clock = std::chrono::steady_clock;
    auto ms_since = [](Clock::time_point start) {
        return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
    };
    call();  // the first call also loads the kernels (the driver compiles their PTX)
    wait();
    const auto warm_up = Clock::now();
    int warm_up_calls = 0;
    do {
        call();
        wait();
        warm_up_calls++;
    } while (ms_since(warm_up) < kGpuWarmUpMs);
    const double per_call = ms_since(warm_up) / warm_up_calls;
    const int batch = int(std::clamp(kGpuSampleMs / std::max(per_call, 1e-3), 1.0, 1000.0));
    calls_per_sample = batch;
    std::vector<double> ms;
    for (int r = 0; r < repeats; r++) {
        const auto start = Clock::now();
        for (int c = 0; c < batch; c++) call();
        wait();
        ms.push_back(ms_since(start) / batch);
    }
    return ms;
}

// The median (mean of the middle two for an even count); 0 for no samples.
inline double median(std::vector<double> samples) {
    if (samples.empty()) return 0.0;
    std::sort(samples.begin(), samples.end());
    const size_t mid = samples.size() / 2;
    return samples.size() % 2 ? samples[mid] : 0.5 * (samples[mid - 1] + samples[mid]);
}

}  // namespace attend::timing

// ThreadSanitizer's negative control (built under ATTEND_SANITIZE=thread only):
// the caller writes out while a call writes it, a race of the caller's making
// with nothing between the two that orders them, so TSan reports it whichever
// write comes first. ctest passes this program only if that report names
// libattend's code: a clean TSan run of the suite then means the kernels and
// their Halide runtime were watched, not skipped as uninstrumented code.
#include <algorithm>
#include <thread>
#include <vector>

#include "attend/attend.hpp"

int main() {
    int64_t shape[4] = {1, 2, 64, 32};
    std::vector<float> q(64 * 64, 0.5f), k(64 * 64, 0.25f), v(64 * 64, 1.0f), out(64 * 64);
    auto tensor = [&](std::vector<float> &data) {
        DLTensor t{};
        t.data = data.data();
        t.device = {kDLCPU, 0};
        t.ndim = 4;
        t.dtype = {kDLFloat, 32, 1};
        t.shape = shape;
        return t;
    };
    auto call = [&] { attend::forward(tensor(q), tensor(k), tensor(v), nullptr, tensor(out), attend::Options{}); };
    std::thread caller(call);
    std::fill(out.begin(), out.end(), 0.0f);  // during the call: the race
    caller.join();
    return 0;
}

// The GPU kernels of one device (--device=opencl or --device=cuda) against the
// double-precision oracle and against the CPU kernel. Where the device is not
// there (no driver, no GPU, no OpenCL platform) the program exits 77, which
// ctest reports as skipped, not passed.
#define DOCTEST_CONFIG_IMPLEMENT
#include <dlfcn.h>
#include <sys/resource.h>

#include <cstring>
#include <iostream>

#include <HalideRuntime.h>

#include "backward_support.hpp"
#include "low_precision.hpp"

using namespace attend;
using namespace attend::test;

namespace {

Device g_device = Device::OpenCL;

// The kernels of the device under test that run (d, dv): every variant built for
// d == dv, else the one select_kernel picks (a larger head dim, padded).
std::vector<std::string> kernels_for(int64_t d, int64_t dv) {
    std::vector<std::string> names;
    for (const auto &k : available_kernels()) {
        if (k.operation == Operation::Forward && k.device == g_device && k.dtype == DType::Float32 && k.head_dim == d && d == dv) {
            names.push_back(k.name);
        }
    }
    if (names.empty()) {
        auto chosen = select_kernel(g_device, DType::Float32, d, dv, {});
        REQUIRE(chosen);
        names.push_back(chosen->name);
    }
    return names;
}

std::string describe(const ProblemSpec &s, const Options &o) {
    std::ostringstream text;
    text << "b=" << s.b << " h=" << s.h << " kv_heads=" << s.kv_heads << " n=" << s.n << " m=" << s.m << " d=" << s.d
         << " dv=" << s.dv << " mask=" << s.mask << " causal=" << o.causal
         << (o.causal_align == CausalAlign::BottomRight ? " bottom-right" : "");
    return text.str();
}

// Every kernel of the device that runs the problem, against the oracle.
void check_gpu(const ProblemSpec &spec, Options options = {}) {
    auto expected = make_problem(spec, options).expected();
    for (const auto &name : kernels_for(spec.d, spec.dv)) {
        INFO(name << " " << describe(spec, options));
        auto p = make_problem(spec, options);
        p.options.device = g_device;
        p.options.kernel = name;
        check_against_reference(p, expected);
    }
}

const int64_t kSizes[] = {1, 7, 33, 100, 257};


}  // namespace

TEST_CASE("the device has a kernel for each specialised head dim, and select_kernel picks one") {
    for (DType dtype : built_dtypes()) {
        for (int64_t d : built_head_dims()) {
            auto chosen = select_kernel(g_device, dtype, d, d, {});
            REQUIRE(chosen);
            CHECK(chosen->device == g_device);
            CHECK(chosen->head_dim == d);
        }
    }
    // Other head dims run in the next larger kernel (64 for (40, 24) in the default
    // build); beyond the largest there is none.
    auto dims = built_head_dims();
    std::sort(dims.begin(), dims.end());
    auto larger = std::lower_bound(dims.begin(), dims.end(), 40);
    if (larger != dims.end()) CHECK(select_kernel(g_device, DType::Float32, 40, 24, {})->head_dim == *larger);
    std::string why;
    CHECK_FALSE(select_kernel(g_device, DType::Float32, dims.back() * 2, dims.back() * 2, {}, &why));
    CHECK(why.find("d=" + std::to_string(dims.back() * 2)) != std::string::npos);
}

TEST_CASE("sizes that are not multiples of the tiles") {
    const int64_t largest_pairs_at = built_among({64})[0];
    for (int64_t d : built_head_dims()) {
        for (int64_t n : kSizes) {
            for (int64_t m : kSizes) {
                if (n * m >= 257 * 100 && d != largest_pairs_at) continue;  // the largest pairs at one head dim
                ProblemSpec spec = spec_of(2, 2, n, m, d);
                spec.seed = uint32_t(n * 131 + m * 7 + d);
                check_gpu(spec);
            }
        }
    }
}

TEST_CASE("padding mask, causal, both, and bottom-right causal") {
    for (int64_t d : built_among({64, 128})) {
        for (auto [n, m] : {std::pair<int64_t, int64_t>{65, 65}, {63, 200}, {200, 63}, {1, 300}, {7, 130}}) {
            ProblemSpec spec = spec_of(2, 2, n, m, d);
            spec.mask = true;
            check_gpu(spec);
            Options causal;
            causal.causal = true;
            check_gpu(spec, causal);
            Options bottom_right = causal;
            bottom_right.causal_align = CausalAlign::BottomRight;
            check_gpu(spec, bottom_right);
            spec.mask = false;
            check_gpu(spec, causal);
            check_gpu(spec, bottom_right);
        }
    }
}

TEST_CASE("fully masked rows get the mean of v, with and without causal") {
    ProblemSpec spec = spec_of(2, 2, 40, 70, 64);
    spec.mask = true;
    spec.mask_keep = 0.0;  // every key masked
    check_gpu(spec);
    Options causal;
    causal.causal = true;
    check_gpu(spec, causal);
}

TEST_CASE("multi-query, grouped-query, d != dv and other head dims (padded), any strides") {
    ProblemSpec spec = spec_of(2, 4, 50, 90, 64);
    spec.kv_heads = 0;  // multi-query
    check_gpu(spec);
    spec.kv_heads = 2;  // grouped-query
    check_gpu(spec);
    const auto dims = built_head_dims();
    const int64_t largest = *std::max_element(dims.begin(), dims.end());
    for (auto [d, dv] : {std::pair<int64_t, int64_t>{64, 32}, {40, 24}, {16, 16}, {100, 128}}) {
        if (std::max(d, dv) > largest) continue;  // no kernel that large in this build
        spec.d = d;
        spec.dv = dv;
        check_gpu(spec);
    }
    spec.d = spec.dv = 64;
    spec.q_order = {0, 2, 1, 3};  // [b, n, h, d] memory
    spec.out_order = {0, 2, 1, 3};
    spec.kv_order = {2, 0, 1, 3};
    check_gpu(spec);
}

TEST_CASE("keys in parallel chunks: any number of chunks gives the one-pass result") {
    // Chunks past the causal diagonal are empty, and a fully masked row's chunks
    // each hold part of its uniform weights: both must merge exactly.
    for (int splits : {1, 2, 3, 8, 64}) {
        ProblemSpec spec = spec_of(2, 2, 70, 300, 64);
        spec.mask = true;
        spec.mask_keep = 0.5;
        Options options;
        options.key_splits = splits;
        check_gpu(spec, options);
        options.causal = true;
        check_gpu(spec, options);
        spec.mask_keep = 0.0;
        check_gpu(spec, options);
    }
}

TEST_CASE("dropout: the same weights are dropped as on the CPU, and the result matches the oracle") {
    // With v the identity (m == dv), out[i][j] is the weight of key j: zero exactly
    // where the key was dropped, so the zero patterns are the dropout masks.
    ProblemSpec spec = spec_of(2, 3, 70, 64, 64);
    Options options;
    options.training = true;
    options.dropout = 0.3f;
    options.seed = 0x1234567890abcdefULL;
    for (bool causal : {false, true}) {
        options.causal = causal;
        auto gpu = make_problem(spec, options);
        std::fill(gpu.v.storage.begin(), gpu.v.storage.end(), 0.0f);
        for (int64_t b = 0; b < spec.b; b++)
            for (int64_t h = 0; h < spec.h; h++)
                for (int64_t j = 0; j < spec.m; j++) gpu.v.at({b, h, j, j}) = 1.0f;
        auto cpu = gpu;
        cpu.options.device = Device::CPU;
        gpu.options.device = g_device;
        auto expected = gpu.expected();
        check_against_reference(gpu, expected);
        cpu.run();
        auto on_gpu = gpu.out.dense(), on_cpu = cpu.out.dense();
        int64_t dropped = 0, differing = 0;
        for (size_t e = 0; e < on_gpu.size(); e++) {
            dropped += on_gpu[e] == 0.0f;
            differing += (on_gpu[e] == 0.0f) != (on_cpu[e] == 0.0f);
        }
        INFO("causal=" << causal << " dropped " << dropped << " of " << on_gpu.size());
        CHECK(differing == 0);
        CHECK(dropped > int64_t(on_gpu.size()) / 4);  // p = 0.3 (causal: plus the masked keys)
    }
}

TEST_CASE("a shard of a sequence at its global positions (query_offset, key_offset): causal, a mask, dropout") {
    // The oracle takes the same offsets; the CPU tests merge such shards into the whole call.
    Options options;
    options.causal = true;
    options.training = true;
    options.dropout = 0.25f;
    options.seed = 99;
    options.query_offset = 70;
    options.key_offset = 40;
    for (int64_t d : built_head_dims()) {
        ProblemSpec spec = spec_of(2, 2, 33, 100, d);
        spec.mask = true;
        check_gpu(spec, options);
    }
}

TEST_CASE("a call in pieces (host tensors): groups of heads, and keys merged on the host, against the oracle") {
    // runtime/pieces.cpp with the 32-bit limit lowered (in units of d: q holds 66
    // per group of 2 heads, k 100 per kv head): each piece a kernel call on the device.
    Options options;
    options.causal = true;
    options.training = true;
    options.dropout = 0.25f;
    options.seed = 5;
    for (int64_t d : built_head_dims()) {
        ProblemSpec spec = spec_of(2, 4, 33, 100, d);
        spec.kv_heads = 2;
        spec.mask = true;
        const Expected expected = make_problem(spec, options).expected();
        for (auto [limit_in_d, key_pieces] : {std::pair<int64_t, int>{100, 1}, {40, 3}}) {
            Problem p = make_problem(spec, options);
            p.options.device = g_device;
            const int64_t previous = testing::set_max_kernel_view_elements(limit_in_d * d);
            p.run();
            testing::set_max_kernel_view_elements(previous);
            const double tolerance = merge_tolerance(p, expected, key_pieces);
            const auto compared = compare(p.out.dense(), expected);
            INFO("d=" << d << ", limit " << limit_in_d << " d: max error " << compared.max_error << ", tolerance "
                      << tolerance);
            CHECK(compared.not_finite == 0);
            CHECK(compared.max_error <= tolerance);
            check_lse(p, expected.lse);
        }
    }
}

TEST_CASE("float16 and bfloat16: against the reference and the float32 kernel") {
    ProblemSpec plain = spec_of(2, 2, 65, 130, 64), masked = spec_of(1, 4, 70, 90, 32), padded = spec_of(2, 1, 33, 50, 24);
    masked.mask = true;
    masked.kv_heads = 2;
    Options causal;
    causal.causal = true;
    if (built_16bit_dtypes().empty()) {
        MESSAGE(std::string("this build has no 16-bit kernels (ATTEND_DTYPES)"));
        return;
    }
    for (DType dtype : built_16bit_dtypes()) {
        for (const auto &call : {std::pair{plain, Options{}}, {masked, causal}, {padded, Options{}}}) {
            const ProblemSpec &spec = call.first;
            const Options &options = call.second;  // (INFO captures them: no structured binding before C++20)
            INFO(std::string(to_string(dtype)) << " " << describe(spec, options));
            auto p = make_problem(spec, options);
            round_inputs(p, dtype);
            auto expected = p.expected();
            p.run();  // the float32 CPU kernel on the same inputs
            LowPrecisionRun run(p, dtype);
            run.options.device = g_device;
            run.run();
            check_low_precision(p, run, expected, p.out.dense());
        }
    }
}

TEST_CASE("backward: every float32 backward kernel of the device against the oracle's gradients (the CPU's cases)") {
    bool any = false;
    for (const KernelInfo &kernel : available_kernels()) {
        if (kernel.operation != Operation::Backward || kernel.device != g_device || kernel.dtype != DType::Float32) continue;
        any = true;
        for (const BackwardCase &c : backward_cases(kernel.head_dim)) {
            INFO(kernel.name << ": " << c.name);
            Options options = c.options;
            options.device = g_device;
            options.kernel = kernel.name;
            Backward b(c.spec, options);
            b.run(options);
            check_float32(b);
        }
    }
    CHECK(any);
    // d != dv, padded into the smallest kernel that holds both.
    ProblemSpec s = spec_of(1, 2, 40, 50, 24);
    s.dv = 20;
    Options options;
    options.device = g_device;
    options.causal = true;
    Backward b(s, options);
    b.run(options);
    check_float32(b);
}

TEST_CASE("backward: float16 and bfloat16 on the device against the oracle") {
    for (DType dtype : built_16bit_dtypes()) {
        const BackwardCase c = backward_cases(built_head_dims().at(0)).at(4);  // bottom-right causal, dropout
        INFO(std::string(to_string(dtype)) << ": " << c.name);
        Options options = c.options;
        options.device = g_device;
        Backward b(c.spec, options, {}, dtype);
        check_16bit(b, dtype, options);
    }
}

TEST_CASE("Halide buffers with a device allocation stay on the device") {
    const int d = 64, n = 45, m = 80, h = 2, b = 1;
    auto p = make_problem(spec_of(b, h, n, m, d), {});
    auto expected = p.expected();
    auto to_halide = [](Tensor<float> &t) {
        std::vector<int> shape(t.shape.rbegin(), t.shape.rend());
        Halide::Runtime::Buffer<float> buffer(shape);
        auto dense = t.dense();
        std::copy(dense.begin(), dense.end(), buffer.data());
        buffer.set_host_dirty();
        REQUIRE(buffer.copy_to_device(device_interface(g_device)) == 0);
        return buffer;
    };
    auto q = to_halide(p.q), k = to_halide(p.k), v = to_halide(p.v);
    Halide::Runtime::Buffer<void> out = to_halide(p.out), lse = to_halide(*p.lse);
    std::fill(static_cast<float *>(out.data()), static_cast<float *>(out.data()) + out.number_of_elements(), NAN);
    Options options;
    options.device = g_device;
    forward(q, k, v, Halide::Runtime::Buffer<const void>(), out, lse, options);
    // The results are on the device, the host copies stale.
    CHECK(out.raw_buffer()->device_dirty());
    CHECK(lse.raw_buffer()->device_dirty());
    REQUIRE(out.copy_to_host() == 0);
    REQUIRE(lse.copy_to_host() == 0);
    std::vector<float> got(static_cast<float *>(out.data()), static_cast<float *>(out.data()) + out.number_of_elements());
    auto c = compare(got, expected);
    CHECK(c.not_finite == 0);
    CHECK(c.max_error <= fp32_tolerance(p));
    std::copy_n(static_cast<float *>(lse.data()), lse.number_of_elements(), p.lse->storage.begin());
    check_lse(p, expected.lse);
}

// The CUDA driver calls a caller makes (what the CUDA runtime API and PyTorch do
// underneath): memory in the device's primary context, and a stream of its own.
struct CallerCuda {
    using CUdeviceptr = unsigned long long;
    void *library = dlopen("libcuda.so.1", RTLD_NOW);
    template <class F>
    F get(const char *name) {
        void *symbol = library ? dlsym(library, name) : nullptr;
        REQUIRE_MESSAGE(symbol, "libcuda has no " << std::string(name));
        return reinterpret_cast<F>(symbol);
    }

    // Makes device 0's primary context current on this thread, as the CUDA
    // runtime API does: the context attend uses too.
    void use_primary_context() {
        int device = 0;
        void *context = nullptr;
        REQUIRE(get<int (*)(int *, int)>("cuDeviceGet")(&device, 0) == 0);
        REQUIRE(get<int (*)(void **, int)>("cuDevicePrimaryCtxRetain")(&context, device) == 0);
        REQUIRE(get<int (*)(void *)>("cuCtxSetCurrent")(context) == 0);
    }

    // A dense device copy of a test tensor, seen as a kDLCUDA DLTensor; its
    // allocation goes to *at.
    template <class Tensor>
    DLTensor upload(Tensor &tensor, CUdeviceptr *at) {
        auto dense = tensor.dense();
        const size_t bytes = dense.size() * sizeof(dense[0]);
        REQUIRE(get<int (*)(CUdeviceptr *, size_t)>("cuMemAlloc_v2")(at, bytes) == 0);
        REQUIRE(get<int (*)(CUdeviceptr, const void *, size_t)>("cuMemcpyHtoD_v2")(*at, dense.data(), bytes) == 0);
        DLTensor dl = tensor.dl();
        dl.strides = nullptr;  // the device copy is dense
        dl.byte_offset = 0;
        dl.data = reinterpret_cast<void *>(*at);
        dl.device = {kDLCUDA, 0};
        return dl;
    }
};

TEST_CASE("CUDA: device pointers of the caller's primary context, ordered on the caller's stream") {
    if (g_device != Device::CUDA) return;
    CallerCuda cuda;
    using CUdeviceptr = CallerCuda::CUdeviceptr;
    auto cuMemFree = cuda.get<int (*)(CUdeviceptr)>("cuMemFree_v2");
    auto cuMemcpyDtoH = cuda.get<int (*)(void *, CUdeviceptr, size_t)>("cuMemcpyDtoH_v2");
    auto cuStreamCreate = cuda.get<int (*)(void **, unsigned)>("cuStreamCreate");
    auto cuStreamSynchronize = cuda.get<int (*)(void *)>("cuStreamSynchronize");
    auto cuStreamDestroy = cuda.get<int (*)(void *)>("cuStreamDestroy_v2");
    void *stream = nullptr;
    cuda.use_primary_context();
    REQUIRE(cuStreamCreate(&stream, 1 /* non-blocking: not ordered with the default stream */) == 0);

    ProblemSpec spec = spec_of(2, 4, 300, 257, 64);
    spec.kv_heads = 2;
    spec.mask = true;
    Options options;
    options.causal = true;
    auto p = make_problem(spec, options);
    auto expected = p.expected();
    CUdeviceptr allocations[6] = {};
    DLTensor q = cuda.upload(p.q, &allocations[0]), k = cuda.upload(p.k, &allocations[1]),
             v = cuda.upload(p.v, &allocations[2]), mask = cuda.upload(*p.mask, &allocations[3]),
             out = cuda.upload(p.out, &allocations[4]), lse = cuda.upload(*p.lse, &allocations[5]);
    options.cuda_stream = stream;
    forward(q, k, v, &mask, out, &lse, options);  // device selected by where the tensors are
    REQUIRE(cuStreamSynchronize(stream) == 0);
    std::vector<float> got(size_t(p.out.numel()));
    REQUIRE(cuMemcpyDtoH(got.data(), allocations[4], got.size() * sizeof(float)) == 0);
    auto c = compare(got, expected);
    CHECK(c.not_finite == 0);
    CHECK(c.max_error <= fp32_tolerance(p));
    REQUIRE(cuMemcpyDtoH(p.lse->storage.data(), allocations[5], p.lse->storage.size() * sizeof(float)) == 0);
    check_lse(p, expected.lse);

    // Asking for the CPU with tensors on the GPU is an error naming the option.
    options.device = Device::CPU;
    CHECK_THROWS_WITH_AS(forward(q, k, v, &mask, out, options), doctest::Contains("options.device"),
                         std::invalid_argument);
    for (CUdeviceptr at : allocations) cuMemFree(at);
    cuStreamDestroy(stream);
}

TEST_CASE("CUDA: device out of memory: attend::Error, out untouched, the device and the CPU work afterwards") {
    if (g_device != Device::CUDA) return;
    CallerCuda cuda;
    using CUdeviceptr = CallerCuda::CUdeviceptr;
    auto cuMemAlloc = cuda.get<int (*)(CUdeviceptr *, size_t)>("cuMemAlloc_v2");
    auto cuMemFree = cuda.get<int (*)(CUdeviceptr)>("cuMemFree_v2");
    cuda.use_primary_context();
    ProblemSpec spec = spec_of(1, 8, 2048, 2048, 64);  // 16 MiB of device memory for q, k, v and out
    auto p = make_problem(spec);
    p.options.device = Device::CUDA;
    auto expected = p.expected();

    // Halide's cache of freed device memory is emptied first, then every byte the
    // device has left is taken: GiB pieces, then smaller ones down to 1 MiB.
    halide_reuse_device_allocations(nullptr, false);
    halide_reuse_device_allocations(nullptr, true);
    std::vector<CUdeviceptr> taken;
    for (size_t piece = size_t(1) << 30; piece >= (size_t(1) << 20);) {
        CUdeviceptr at = 0;
        if (cuMemAlloc(&at, piece) == 0) {
            taken.push_back(at);
        } else {
            piece /= 2;
        }
    }
    REQUIRE(!taken.empty());
    INFO(taken.size() << " pieces of device memory taken");
    std::fill(p.out.storage.begin(), p.out.storage.end(), 7.0f);
    CHECK_THROWS_WITH_AS(p.run(), doctest::Contains("OUT_OF_MEMORY"), attend::Error);
    CHECK(std::all_of(p.out.storage.begin(), p.out.storage.end(), [](float x) { return x == 7.0f; }));
    for (CUdeviceptr at : taken) cuMemFree(at);

    check_against_reference(p, expected);  // the same call, with memory again
    auto cpu = make_problem(spec_of(1, 2, 40, 50, 64));
    check_against_reference(cpu, cpu.expected());
}

// A kernel fault (here: a read of device memory that does not exist) leaves the
// CUDA context unusable for the rest of its life. It breaks the process's primary
// context, so it runs only when asked for, in a process of its own:
//   attend_gpu_tests --device=cuda --no-skip --test-case="CUDA: a kernel fault*"
TEST_CASE("CUDA: a kernel fault: reported, the context refused afterwards, the CPU path still works" *
          doctest::skip()) {
    if (g_device != Device::CUDA) return;
    CallerCuda cuda;
    auto cuCtxSynchronize = cuda.get<int (*)()>("cuCtxSynchronize");
    cuda.use_primary_context();
    auto p = make_problem(spec_of(1, 2, 64, 64, 64));
    CallerCuda::CUdeviceptr allocations[4] = {};  // never freed: the context they live in is broken below
    DLTensor q = cuda.upload(p.q, &allocations[0]), k = cuda.upload(p.k, &allocations[1]),
             v = cuda.upload(p.v, &allocations[2]), out = cuda.upload(p.out, &allocations[3]);
    DLTensor q_nowhere = q;
    q_nowhere.data = static_cast<char *>(q.data) + (size_t(1) << 40);  // 1 TiB past q: nothing is there
    Options options;
    // The kernel runs after forward returns (the output stays on the device): the
    // fault shows at the next synchronisation, the caller's or attend's.
    bool reported = false;
    try {
        forward(q_nowhere, k, v, nullptr, out, options);
    } catch (const attend::Error &e) {
        reported = true;
        MESSAGE("the faulting call: " << std::string(e.what()));
    }
    const int synchronised = cuCtxSynchronize();
    CHECK((reported || synchronised != 0));
    // The next call names the fault and says the context is unusable...
    CHECK_THROWS_WITH_AS(forward(q, k, v, nullptr, out, options), doctest::Contains("unusable after a kernel fault"),
                         attend::Error);
    // ... and later ones are refused before any CUDA call is made.
    CHECK_THROWS_WITH_AS(forward(q, k, v, nullptr, out, options), doctest::Contains("makes no more calls"),
                         attend::Error);
    auto cpu = make_problem(spec_of(1, 2, 40, 50, 64));
    check_against_reference(cpu, cpu.expected());
}

TEST_CASE("no n x m buffer: a size whose scores exceed the memory budget runs within it") {
    if (g_device != Device::OpenCL) return;  // PoCL's device memory is this process's memory; CUDA: bench/gpu_check.sh
    // n = m = 8192: the scores alone would take 256 MiB; inputs and output take 4 MiB
    // at d=32 (a head dim with a kernel of its own: a padded call adds padded copies).
    const int64_t n = 8192, d = built_among({32})[0];
    const double budget_mib = 64;
    auto warm = make_problem(spec_of(1, 1, 64, 64, d), {});
    warm.options.device = g_device;
    warm.run();  // loads the OpenCL platform and compiles the kernel
    auto p = make_problem(spec_of(1, 1, n, n, d), {});
    p.options.device = g_device;
    p.options.causal = true;  // half the work, the same footprint
    rusage before{}, after{};
    getrusage(RUSAGE_SELF, &before);
    p.run();
    getrusage(RUSAGE_SELF, &after);
    const double grown_mib = double(after.ru_maxrss - before.ru_maxrss) / 1024.0;
    INFO("peak RSS grew by " << grown_mib << " MiB");
    CHECK(grown_mib < budget_mib);
    for (int64_t row : {int64_t(0), n / 2, n - 1}) {  // spot checks against the oracle, a row at a time
        auto out = p.out.dense();
        reference::Shape one{1, 1, 1, 1, row + 1, d, d};
        auto q_row = p.q.dense();
        auto k_all = p.k.dense(), v_all = p.v.dense();
        Options o;
        auto expected = reference::forward(one, q_row.data() + row * d, k_all.data(), v_all.data(), nullptr, o);
        for (int64_t c = 0; c < d; c++) CHECK(std::fabs(out[size_t(row * d + c)] - expected[size_t(c)]) < 1e-4);
    }
}

int main(int argc, char **argv) {
    std::vector<char *> args;
    bool listing = false;
    for (int i = 0; i < argc; i++) {
        if (std::strcmp(argv[i], "--device=cuda") == 0) {
            g_device = Device::CUDA;
        } else if (std::strcmp(argv[i], "--device=opencl") == 0) {
            g_device = Device::OpenCL;
        } else {
            listing = listing || std::strncmp(argv[i], "--list", 6) == 0 || std::strncmp(argv[i], "-ltc", 4) == 0;
            args.push_back(argv[i]);
        }
    }
    if (!listing) {
        // Is the device there? One small call says, with the reason if not.
        auto probe = make_problem(spec_of(1, 1, 4, 4, 32), {});
        probe.options.device = g_device;
        try {
            probe.run();
        } catch (const attend::Error &e) {
            std::cout << "SKIPPED: no usable " << to_string(g_device) << " device: " << e.what() << "\n";
            return 77;
        }
    }
    doctest::Context context(int(args.size()), args.data());
    return context.run();
}

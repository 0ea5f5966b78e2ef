// attend: the command-line program.
//   attend run    attention on .npy files
//   attend bench  time a kernel on random inputs
//   attend demo   the README's main job: every kernel of this build on a
//                 naturalspeech2-like batch, against the double reference
//   attend kernels  what this build and this CPU have
// Exit status: 0 success, 2 bad arguments or input, 1 failure while running.
#include <algorithm>
#include <cfloat>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <functional>
#include <map>
#include <numeric>
#include <random>
#include <sstream>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include "attend/attend.hpp"
#if ATTEND_HAS_DIST
#include "attend/dist.hpp"
#endif
#include "attend/dlpack_types.hpp"
#include "attend/half.hpp"
#include "attend/reference.hpp"
#include "npy.hpp"
#include "timing.hpp"

namespace {

using namespace attend;

struct BadInput : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Whether errors are printed: a --ring run's ranks agree on one, which rank 0 prints.
bool print_errors = true;

void report(const char *prefix, const char *what) {
    if (print_errors) std::fprintf(stderr, "%s%s\n", prefix, what);
}

// The exit status of a command that threw, its message printed: 2 for bad
// input, 1 for a failure while running.
int exit_status_of(std::exception_ptr error) {
    try {
        std::rethrow_exception(error);
    } catch (const std::invalid_argument &e) {
        report("", e.what());
        return 2;
    } catch (const BadInput &e) {
        report("attend: ", e.what());
        return 2;
    } catch (const npy::Error &e) {
        report("attend: ", e.what());
        return 2;
    } catch (const attend::Error &e) {
        report("", e.what());  // already says "attend: ..."
        return 1;
    } catch (const std::exception &e) {
        report("attend: ", e.what());
        return 1;
    }
}

DLTensor as_dl(npy::Array &a) {
    DLTensor t{};
    t.data = a.data.data();
    t.device = {kDLCPU, 0};
    t.ndim = int(a.shape.size());
    t.shape = a.shape.data();
    t.strides = nullptr;  // C order
    t.dtype = a.dtype == npy::DType::Bool      ? dlpack::kBool
              : a.dtype == npy::DType::Float16 ? DLDataType{kDLFloat, 16, 1}
                                               : DLDataType{kDLFloat, 32, 1};
    return t;
}

DType parse_dtype(const std::string &option, const std::string &name) {
    for (DType dtype : {DType::Float32, DType::Float16, DType::BFloat16}) {
        if (name == to_string(dtype)) return dtype;
    }
    throw BadInput(option + ": expected float32, float16 or bfloat16, got '" + name + "'");
}

// Elements of `dtype` from float32 values (rounded to nearest, ties to even).
std::vector<unsigned char> elements_of(const std::vector<float> &values, DType dtype) {
    const size_t bytes = dtype == DType::Float32 ? 4 : 2;
    std::vector<unsigned char> elements(values.size() * bytes);
    for (size_t e = 0; e < values.size(); e++) {
        if (dtype == DType::Float32) {
            std::memcpy(&elements[e * 4], &values[e], 4);
        } else {
            uint16_t bits = float_to_bits(values[e], dtype);
            std::memcpy(&elements[e * 2], &bits, 2);
        }
    }
    return elements;
}

// float32 values from elements of `dtype` (exact).
std::vector<float> floats_of(const std::vector<unsigned char> &elements, DType dtype) {
    const size_t bytes = dtype == DType::Float32 ? 4 : 2;
    std::vector<float> values(elements.size() / bytes);
    for (size_t e = 0; e < values.size(); e++) {
        if (dtype == DType::Float32) {
            std::memcpy(&values[e], &elements[e * 4], 4);
        } else {
            uint16_t bits;
            std::memcpy(&bits, &elements[e * 2], 2);
            values[e] = bits_to_float(bits, dtype);
        }
    }
    return values;
}

CpuIsa parse_isa(const std::string &name) {
    for (CpuIsa isa : {CpuIsa::Auto, CpuIsa::AVX512, CpuIsa::AVX2, CpuIsa::Baseline}) {
        if (name == to_string(isa)) return isa;
    }
    throw BadInput("--isa: expected auto, avx512, avx2 or baseline, got '" + name + "'");
}

// Resident memory that work adds on top of what the process holds (Linux): the
// peak is reset before it (/proc/self/clear_refs) and read after. In MiB; -1
// where /proc cannot say.
class PeakMemoryGrowth {
public:
    PeakMemoryGrowth() {
        std::ofstream clear("/proc/self/clear_refs");
        clear << "5";  // resets VmHWM to the current VmRSS
        clear.close();
        before_kib_ = clear ? status_kib("VmRSS") : -1;
    }
    double mib() const {
        const long peak = status_kib("VmHWM");
        return before_kib_ < 0 || peak < 0 ? -1.0 : double(peak - before_kib_) / 1024.0;
    }

private:
    static long status_kib(const std::string &field) {  // "VmHWM:   1234 kB"
        std::ifstream status("/proc/self/status");
        for (std::string line; std::getline(status, line);) {
            if (line.rfind(field + ":", 0) == 0) return std::stol(line.substr(field.size() + 1));
        }
        return -1;
    }
    long before_kib_ = -1;
};

std::vector<float> random_floats(size_t count, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    std::vector<float> x(count);
    for (auto &e : x) e = normal(rng);
    return x;
}

DLTensor dense_dl(void *data, std::vector<int64_t> &shape, DLDataType dtype) {
    DLTensor t{};
    t.data = data;
    t.device = {kDLCPU, 0};
    t.ndim = int(shape.size());
    t.shape = shape.data();
    t.dtype = dtype;
    return t;
}

// ---- attend run ---------------------------------------------------------------

struct RunArgs {
    std::string q, k, v, out, lse, mask, device = "cpu", kernel, isa = "auto", causal_align = "top-left", dtype;
    std::string dout, dq, dk, dv;  // the backward: all four, or none
    std::string layout = "contiguous";  // --ring
    bool causal = false, ring = false;
    std::optional<float> scale, dropout;
    uint64_t seed = 0;
};

Device parse_device(const std::string &name) {
    for (Device device : {Device::CPU, Device::CUDA, Device::OpenCL}) {
        if (name == to_string(device)) return device;
    }
    throw BadInput("--device: expected cpu, cuda or opencl, got '" + name + "'");
}

// A run's inputs read and converted to the computation's dtype, its outputs
// allocated (zeros), and its options: everything before the kernels run.
struct RunCall {
    DType dtype = DType::Float32;
    npy::Array q, k, v, dout, out, lse, dq, dk, dv;
    std::optional<npy::Array> mask;
    bool with_backward = false, want_lse = false;
    Options options;

    // An array as the tensor the kernels take (float data in the computation's dtype).
    DLTensor tensor(npy::Array &array) const {
        DLTensor t = as_dl(array);
        if (t.dtype.code == kDLFloat) t.dtype = dlpack::type_of(dtype);
        return t;
    }
};

RunCall prepare_run(const RunArgs &a) {
    RunCall c;
    const Device device = parse_device(a.device);
    const int backward_files = !a.dout.empty() + !a.dq.empty() + !a.dk.empty() + !a.dv.empty();
    if (backward_files != 0 && backward_files != 4) {
        throw BadInput("--dout, --dq, --dk, --dv: the backward needs all four, got " + std::to_string(backward_files));
    }
    c.with_backward = backward_files == 4;
    {
        std::vector<std::pair<const char *, std::string>> written{{"--out", a.out}, {"--lse", a.lse}, {"--dq", a.dq},
                                                                  {"--dk", a.dk}, {"--dv", a.dv}};
        for (size_t x = 0; x < written.size(); x++) {
            for (size_t y = x + 1; y < written.size(); y++) {
                if (!written[x].second.empty() && !written[y].second.empty() &&
                    std::filesystem::absolute(written[x].second) == std::filesystem::absolute(written[y].second)) {
                    throw BadInput(std::string(written[y].first) + ": names the same file as " + written[x].first +
                                   " (" + written[x].second + ")");
                }
            }
        }
    }
    c.q = npy::read(a.q);
    c.k = npy::read(a.k);
    c.v = npy::read(a.v);
    if (!a.mask.empty()) c.mask = npy::read(a.mask);
    if (c.q.shape.size() != 4) throw BadInput("--q: expected 4 dims [b, h, n, d], got " + std::to_string(c.q.shape.size()));
    if (c.v.shape.empty()) throw BadInput("--v: expected 3 or 4 dims, got a scalar");

    // The dtype of the computation: --dtype, else q's. Without --dtype, k and v
    // must be q's; with it, each input is converted (rounded) to it.
    auto file_dtype = [](const npy::Array &a) { return a.dtype == npy::DType::Float16 ? DType::Float16 : DType::Float32; };
    c.dtype = a.dtype.empty() ? file_dtype(c.q) : parse_dtype("--dtype", a.dtype);
    if (c.with_backward) c.dout = npy::read(a.dout);
    std::vector<std::pair<const char *, npy::Array *>> inputs{{"--k", &c.k}, {"--v", &c.v}};
    if (c.with_backward) inputs.push_back({"--dout", &c.dout});
    for (auto [option, array] : inputs) {
        if (a.dtype.empty() && array->dtype != c.q.dtype && array->dtype != npy::DType::Bool) {
            throw BadInput(std::string(option) + ": is " + to_string(file_dtype(*array)) + " but --q is " +
                           to_string(c.dtype) + "; pass --dtype to convert them to one dtype");
        }
    }
    for (npy::Array *array : {&c.q, &c.k, &c.v, &c.dout}) {
        if (array->dtype == npy::DType::Bool) continue;  // rejected by forward with the tensor's name
        const DType from = file_dtype(*array);
        if (from != c.dtype) array->data = elements_of(floats_of(array->data, from), c.dtype);
    }

    // out in the computation's dtype; numpy has no bfloat16, so a bfloat16 out is
    // written as float32 (exactly).
    auto result = [&](std::vector<int64_t> shape) {
        npy::Array r;
        r.dtype = c.dtype == DType::Float16 ? npy::DType::Float16 : npy::DType::Float32;
        r.shape = std::move(shape);
        r.data.assign(size_t(std::max<int64_t>(r.numel(), 0)) * (c.dtype == DType::Float32 ? 4 : 2), 0);
        return r;
    };
    c.out = result({c.q.shape[0], c.q.shape[1], c.q.shape[2], c.v.shape.back()});
    c.lse.dtype = npy::DType::Float32;
    c.lse.shape = {c.q.shape[0], c.q.shape[1], c.q.shape[2]};
    c.lse.data.assign(size_t(std::max<int64_t>(c.lse.numel(), 0)) * sizeof(float), 0);
    if (c.with_backward) {  // the gradients: q's, k's and v's shapes
        c.dq = result(c.q.shape);
        c.dk = result(c.k.shape);
        c.dv = result(c.v.shape);
    }
    c.want_lse = !a.lse.empty() || c.with_backward;

    c.options.causal = a.causal;
    if (a.causal_align != "top-left" && a.causal_align != "bottom-right") {
        throw BadInput("--causal-align: expected top-left or bottom-right, got '" + a.causal_align + "'");
    }
    c.options.causal_align = a.causal_align == "bottom-right" ? CausalAlign::BottomRight : CausalAlign::TopLeft;
    c.options.scale = a.scale;
    c.options.kernel = a.kernel;
    c.options.cpu_isa = parse_isa(a.isa);
    c.options.device = device;
    if (a.dropout) {
        c.options.training = true;  // --dropout asks for training-mode dropout
        c.options.dropout = *a.dropout;
        c.options.seed = a.seed;
    }
    return c;
}

// Writes the results, each file a temporary renamed into place: whole or untouched.
void write_results(const RunArgs &a, RunCall &c) {
    std::vector<std::pair<std::string, npy::Array *>> files{{a.out, &c.out}};
    if (!a.lse.empty()) files.push_back({a.lse, &c.lse});
    if (c.with_backward) files.insert(files.end(), {{a.dq, &c.dq}, {a.dk, &c.dk}, {a.dv, &c.dv}});
    for (auto &[path, array] : files) {
        if (c.dtype == DType::BFloat16 && array != &c.lse) {
            array->data = elements_of(floats_of(array->data, c.dtype), DType::Float32);
        }
        npy::write(path, *array);
    }
}

#if ATTEND_HAS_DIST
// MPI for the life of a --ring run (unless the caller's program set it up).
struct MpiSession {
    bool owned = false;
    MpiSession() {
        int initialized = 0;
        MPI_Initialized(&initialized);
        if (!initialized) {
            MPI_Init(nullptr, nullptr);
            owned = true;
        }
    }
    ~MpiSession() {
        if (owned) MPI_Finalize();
    }
    MpiSession(const MpiSession &) = delete;
    MpiSession &operator=(const MpiSession &) = delete;
};

dist::Layout parse_layout(const std::string &name) {
    if (name != "contiguous" && name != "zigzag") {
        throw BadInput("--layout: expected contiguous or zigzag, got '" + name + "'");
    }
    return name == "zigzag" ? dist::Layout::ZigZag : dist::Layout::Contiguous;
}

// Throws unless a sequence of `length` positions divides into the layout's equal chunks on `ranks` ranks.
void check_divides(const char *option, int64_t length, const std::string &layout, int ranks) {
    const int64_t parts = parse_layout(layout) == dist::Layout::ZigZag ? 2 * int64_t(ranks) : ranks;
    if (length % parts != 0) {
        throw BadInput(std::string(option) + ": its sequence of " + std::to_string(length) + " does not divide into " +
                       std::to_string(parts) + " equal chunks (--layout " + layout + " on " + std::to_string(ranks) +
                       " ranks)");
    }
}

// attend run --ring: every rank reads the inputs and keeps its shard of the
// sequence (in --layout), ring_forward computes each rank's rows, rank 0
// gathers and writes them. Each step's errors are agreed by every rank.
void ring_run_on(const RunArgs &a, MPI_Comm comm, int rank, int ranks) {
    RunCall c;
    dist::Layout layout = dist::Layout::Contiguous;
    npy::Array q, k, v, mask, out, lse;  // this rank's shards
    const int key_dim = 2;  // of 4-D k and v; 1 for 3-D
    // A bad input on any rank is a bad input (exit status 2) on every rank.
    auto as_bad_input = [](auto step) {
        return [step] {
            try {
                step();
            } catch (const BadInput &e) {
                throw std::invalid_argument(std::string("attend: ") + e.what());
            } catch (const npy::Error &e) {
                throw std::invalid_argument(std::string("attend: ") + e.what());
            }
        };
    };
    dist::collectively(comm, as_bad_input([&] {
        layout = parse_layout(a.layout);
        if (!a.dout.empty() || !a.dq.empty() || !a.dk.empty() || !a.dv.empty()) {
            throw BadInput("--ring: runs the forward only (no --dout, --dq, --dk, --dv)");
        }
        if (a.device != "cpu") throw BadInput("--ring: runs on the CPU only (--device cpu)");
        c = prepare_run(a);
        if (c.k.shape.size() < 3) throw BadInput("--k: expected 3 or 4 dims");
        const int k_dim = c.k.shape.size() == 3 ? 1 : key_dim;
        check_divides("--q", c.q.shape[2], a.layout, ranks);
        check_divides("--k", c.k.shape[size_t(k_dim)], a.layout, ranks);
        // This rank's shard of an array whose dim `dim` is the sequence.
        auto shard_of = [&](npy::Array &whole, int dim) {
            npy::Array local = whole;
            local.shape[size_t(dim)] /= ranks;
            local.data.assign(size_t(local.numel()) * whole.itemsize(), 0);
            DLTensor w = c.tensor(whole), l = c.tensor(local);
            dist::shard(w, dim, rank, ranks, layout, l);
            return local;
        };
        q = shard_of(c.q, 2);
        k = shard_of(c.k, k_dim);
        v = shard_of(c.v, k_dim);
        if (c.mask) {
            if (c.mask->shape.size() != 2) throw BadInput("--mask: expected 2 dims [b, m]");
            mask = shard_of(*c.mask, 1);
        }
        out = shard_of(c.out, 2);
        lse = shard_of(c.lse, 2);
    }));
    {
        DLTensor tq = c.tensor(q), tk = c.tensor(k), tv = c.tensor(v), tmask = c.tensor(mask), tout = c.tensor(out),
                 tlse = as_dl(lse);
        dist::ring_forward(tq, tk, tv, c.mask ? &tmask : nullptr, tout, c.want_lse ? &tlse : nullptr, comm, c.options,
                           layout);
    }
    // Rank 0 gathers every rank's rows into the whole out and lse, then writes them.
    dist::collectively(comm, as_bad_input([&] {
        for (auto [local, whole] : {std::pair<npy::Array *, npy::Array *>{&out, &c.out}, {&lse, &c.lse}}) {
            if (local->data.size() > size_t(INT32_MAX)) throw BadInput("--ring: a rank's rows pass 2 GiB");
            std::vector<unsigned char> all(rank == 0 ? local->data.size() * size_t(ranks) : 0);
            MPI_Gather(local->data.data(), int(local->data.size()), MPI_BYTE, all.data(), int(local->data.size()),
                       MPI_BYTE, 0, comm);
            for (int from = 0; rank == 0 && from < ranks; from++) {
                npy::Array part = *local;
                std::memcpy(part.data.data(), all.data() + size_t(from) * local->data.size(), local->data.size());
                DLTensor p = local == &lse ? as_dl(part) : c.tensor(part), w = local == &lse ? as_dl(*whole) : c.tensor(*whole);
                dist::unshard(p, 2, from, ranks, layout, w);
            }
        }
        if (rank == 0) write_results(a, c);
    }));
}

// Runs body(comm, rank, ranks) on every rank of MPI_COMM_WORLD: its exit status.
// Every rank has the same error (the steps agree on them), which rank 0 prints
// before any rank exits (mpirun ends the job when one does).
int on_every_rank(const std::function<void(MPI_Comm, int, int)> &body) {
    const MpiSession mpi;
    int rank = 0, ranks = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &ranks);
    try {
        body(MPI_COMM_WORLD, rank, ranks);
        return 0;
    } catch (...) {
        print_errors = rank == 0;
        const int status = exit_status_of(std::current_exception());
        std::fflush(stderr);
        MPI_Barrier(MPI_COMM_WORLD);
        return status;
    }
}

#endif

#if !ATTEND_HAS_DIST
constexpr const char *kNoDistMessage = "--ring: this build has no attend_dist (MPI was not found when it was configured)";
#endif

int run_command(const RunArgs &a) {
    if (a.ring) {
#if ATTEND_HAS_DIST
        return on_every_rank([&](MPI_Comm comm, int rank, int ranks) { ring_run_on(a, comm, rank, ranks); });
#else
        throw BadInput(kNoDistMessage);
#endif
    }
    RunCall c = prepare_run(a);
    DLTensor tq = c.tensor(c.q), tk = c.tensor(c.k), tv = c.tensor(c.v), tout = c.tensor(c.out), tlse = as_dl(c.lse);
    DLTensor tmask = c.mask ? as_dl(*c.mask) : DLTensor{};
    forward(tq, tk, tv, c.mask ? &tmask : nullptr, tout, c.want_lse ? &tlse : nullptr, c.options);
    if (c.with_backward) {
        DLTensor tdout = c.tensor(c.dout), tdq = c.tensor(c.dq), tdk = c.tensor(c.dk), tdv = c.tensor(c.dv);
        backward(tq, tk, tv, c.mask ? &tmask : nullptr, tout, tlse, tdout, tdq, tdk, tdv, c.options);
    }
    // Everything is computed before anything is written.
    write_results(a, c);
    return 0;
}

// ---- attend bench -------------------------------------------------------------

struct BenchArgs {
    int64_t b = 2, h = 8, n = 1024, m = 1024, d = 64, dv = -1, kv_heads = -1;
    bool causal = false, mask = false, json = false, backward = false, ring = false;
    std::string layout = "contiguous";  // --ring
    int repeats = 10, key_splits = 0, query_splits = 0;
    std::string device = "cpu", kernel, isa = "auto", dtype = "float32";
};

// Device buffers for a GPU benchmark: the data is copied once, before timing.
Halide::Runtime::Buffer<void> on_device(const std::vector<unsigned char> &host, DType dtype,
                                        const std::vector<int64_t> &shape, Device device) {
    std::vector<int> halide_shape(shape.rbegin(), shape.rend());  // Halide's dim 0 is innermost
    const halide_type_t type = dtype == DType::Float32   ? halide_type_t(halide_type_float, 32)
                               : dtype == DType::Float16 ? halide_type_t(halide_type_float, 16)
                                                         : halide_type_t(halide_type_bfloat, 16);
    Halide::Runtime::Buffer<void> buffer(type, halide_shape);
    std::memcpy(buffer.data(), host.data(), host.size());
    buffer.set_host_dirty();
    const halide_device_interface_t *interface = device_interface(device);
    if (!interface) throw BadInput(std::string("--device: this build has no ") + to_string(device) + " kernels");
    if (int status = buffer.copy_to_device(interface)) {
        throw Error(std::string("attend bench: copying inputs to ") + to_string(device) + " failed (Halide error " +
                    std::to_string(status) + ")");
    }
    return buffer;
}

#if ATTEND_HAS_DIST
// attend bench --ring under mpirun: each rank times ring_forward on random
// shards of one sequence (--n and --m are the whole sequence's); a sample is
// the slowest rank's time. Rank 0 prints each rank's compute in the median
// sample (summed over its steps), the wait after it that the compute did not
// hide, the bytes it sent, the balance (most compute over least, whole call
// and step by step), and a JSON line.
void ring_bench_on(const BenchArgs &a, MPI_Comm comm, int rank, int ranks) {
    if (a.backward || a.device != "cpu") throw BadInput("--ring: times the forward on the CPU (no --backward, --device)");
    const dist::Layout layout = parse_layout(a.layout);
    if (a.repeats < 1) throw BadInput("--repeats: expected at least 1");
    const int64_t dv = a.dv < 0 ? a.d : a.dv, kv_heads = a.kv_heads < 0 ? a.h : a.kv_heads;
    if (kv_heads < 1) throw BadInput("--kv-heads: --ring takes 4-D k and v (at least 1 kv head)");
    for (auto [name, value] : {std::pair{"--n", a.n}, {"--m", a.m}}) {
        if (value < 1) throw BadInput(std::string(name) + ": expected a positive size, got " + std::to_string(value));
        check_divides(name, value, a.layout, ranks);
    }
    const int64_t n = a.n / ranks, m = a.m / ranks;  // this rank's
    std::vector<int64_t> q_shape{a.b, a.h, n, a.d}, k_shape{a.b, kv_heads, m, a.d}, v_shape{a.b, kv_heads, m, dv},
        out_shape{a.b, a.h, n, dv}, mask_shape{a.b, m};
    auto count = [](const std::vector<int64_t> &s) {
        size_t c = 1;
        for (auto e : s) c *= size_t(e);
        return c;
    };
    const DType dtype = parse_dtype("--dtype", a.dtype);
    const uint32_t seed = 10 * uint32_t(rank);
    auto q = elements_of(random_floats(count(q_shape), seed + 1), dtype),
         k = elements_of(random_floats(count(k_shape), seed + 2), dtype),
         v = elements_of(random_floats(count(v_shape), seed + 3), dtype);
    auto out = elements_of(std::vector<float>(count(out_shape)), dtype);
    std::vector<uint8_t> mask(count(mask_shape), 1);
    Options options;
    options.causal = a.causal;
    options.kernel = a.kernel;
    options.cpu_isa = parse_isa(a.isa);
    const DLDataType type = dlpack::type_of(dtype);
    DLTensor tq = dense_dl(q.data(), q_shape, type), tk = dense_dl(k.data(), k_shape, type),
             tv = dense_dl(v.data(), v_shape, type), tout = dense_dl(out.data(), out_shape, type),
             tmask = dense_dl(mask.data(), mask_shape, dlpack::kBool);

    // Samples: the slowest rank's milliseconds, and this rank's steps in each.
    std::vector<double> slowest;
    std::vector<dist::RingStats> steps(size_t(a.repeats));
    auto ring = [&](dist::RingStats *stats) {
        dist::ring_forward(tq, tk, tv, a.mask ? &tmask : nullptr, tout, nullptr, comm, options, layout, stats);
    };
    ring(nullptr);  // warm-up
    for (int r = 0; r < a.repeats; r++) {
        MPI_Barrier(comm);
        const double ms = timing::milliseconds([&] { ring(&steps[size_t(r)]); });
        double most = 0;
        MPI_Allreduce(&ms, &most, 1, MPI_DOUBLE, MPI_MAX, comm);
        slowest.push_back(most);
    }
    std::vector<size_t> order(slowest.size());
    for (size_t i = 0; i < order.size(); i++) order[i] = i;
    std::sort(order.begin(), order.end(), [&](size_t x, size_t y) { return slowest[x] < slowest[y]; });
    const dist::RingStats &median_sample = steps[order[order.size() / 2]];
    auto sum = [](const std::vector<double> &v) { return std::accumulate(v.begin(), v.end(), 0.0); };
    const double mine[3] = {sum(median_sample.compute_ms), sum(median_sample.wait_ms), double(median_sample.bytes_sent)};
    std::vector<double> all(size_t(3 * ranks)), all_steps(size_t(ranks) * size_t(ranks));
    MPI_Gather(mine, 3, MPI_DOUBLE, all.data(), 3, MPI_DOUBLE, 0, comm);
    MPI_Gather(median_sample.compute_ms.data(), ranks, MPI_DOUBLE, all_steps.data(), ranks, MPI_DOUBLE, 0, comm);
    if (rank != 0) return;

    nlohmann::json result;
    result["ranks"] = ranks;
    result["layout"] = a.layout;
    for (auto [name, value] : {std::pair{"b", a.b}, {"h", a.h}, {"kv_heads", kv_heads}, {"n", a.n}, {"m", a.m},
                               {"d", a.d}, {"dv", dv}}) {
        result[name] = value;
    }
    result["causal"] = a.causal;
    result["mask"] = a.mask;
    result["dtype"] = to_string(dtype);
    const double median_ms = timing::median(slowest);
    result["ms"] = *std::min_element(slowest.begin(), slowest.end());
    result["median_ms"] = median_ms;
    result["gflops"] = flop_count(a.b, a.h, a.n, a.m, a.d, dv, a.causal) / median_ms * 1e-6;
    std::vector<double> compute, wait, sent, step_balance;
    for (int r = 0; r < ranks; r++) {
        compute.push_back(all[size_t(3 * r)]);
        wait.push_back(all[size_t(3 * r + 1)]);
        sent.push_back(all[size_t(3 * r + 2)]);
        std::printf("rank %d: compute %.2f ms in %d steps, %.2f ms waiting for transfers after it, %.1f MiB sent\n", r,
                    compute.back(), ranks, wait.back(), sent.back() / (1 << 20));
    }
    for (int step = 0; step < ranks; step++) {
        double most = 0, least = INFINITY;
        for (int r = 0; r < ranks; r++) {
            most = std::max(most, all_steps[size_t(r * ranks + step)]);
            least = std::min(least, all_steps[size_t(r * ranks + step)]);
        }
        step_balance.push_back(least > 0 ? most / least : 1.0);
    }
    const double balance = *std::max_element(compute.begin(), compute.end()) /
                           std::max(*std::min_element(compute.begin(), compute.end()), 1e-9);
    std::printf("%d ranks, %s: median %.2f ms (slowest rank), %.1f GFLOP/s; compute balance (most / least) %.3f\n",
                ranks, a.layout.c_str(), median_ms, double(result["gflops"]), balance);
    result["compute_ms"] = compute;
    result["wait_ms"] = wait;
    result["bytes_sent"] = sent;
    result["balance"] = balance;
    result["step_balance"] = step_balance;
    result["repeats"] = a.repeats;
    if (a.json) std::printf("%s\n", result.dump().c_str());
}
#endif

int bench_command(const BenchArgs &a) {
    if (a.ring) {
#if ATTEND_HAS_DIST
        return on_every_rank([&](MPI_Comm comm, int rank, int ranks) { ring_bench_on(a, comm, rank, ranks); });
#else
        throw BadInput(kNoDistMessage);
#endif
    }
    const Device device = parse_device(a.device);
    const int64_t dv = a.dv < 0 ? a.d : a.dv, kv_heads = a.kv_heads < 0 ? a.h : a.kv_heads;
    if (a.repeats < 1) throw BadInput("--repeats: expected at least 1");
    for (auto [name, value] : {std::pair{"--b", a.b}, {"--h", a.h}, {"--n", a.n}, {"--m", a.m}, {"--d", a.d}, {"--dv", dv}}) {
        if (value < 1) throw BadInput(std::string(name) + ": expected a positive size, got " + std::to_string(value));
    }
    std::vector<int64_t> q_shape{a.b, a.h, a.n, a.d}, out_shape{a.b, a.h, a.n, dv};
    std::vector<int64_t> k_shape{a.b, kv_heads, a.m, a.d}, v_shape{a.b, kv_heads, a.m, dv}, mask_shape{a.b, a.m};
    if (kv_heads == 0) {  // multi-query
        k_shape = {a.b, a.m, a.d};
        v_shape = {a.b, a.m, dv};
    }
    auto count = [](const std::vector<int64_t> &s) {
        size_t n = 1;
        for (auto e : s) n *= size_t(e);
        return n;
    };
    const DType dtype = parse_dtype("--dtype", a.dtype);
    auto q = elements_of(random_floats(count(q_shape), 1), dtype), k = elements_of(random_floats(count(k_shape), 2), dtype),
         v = elements_of(random_floats(count(v_shape), 3), dtype);
    auto out = elements_of(std::vector<float>(count(out_shape)), dtype);
    std::vector<uint8_t> mask(count(mask_shape));
    for (size_t j = 0; j < mask.size(); j++) mask[j] = (j % size_t(a.m)) < size_t(a.m * 9 / 10) ? 1 : 0;

    Options options;
    options.causal = a.causal;
    options.kernel = a.kernel;
    options.cpu_isa = parse_isa(a.isa);
    options.device = device;
    options.key_splits = a.key_splits;
    options.query_splits = a.query_splits;
    Options forward_options = options;  // --backward's one forward: the kernel that select_kernel picks
    forward_options.kernel.clear();
    std::vector<double> ms;
    double extra_mib = -1;     // host memory the calls add (CPU)
    int calls_per_sample = 1;  // a GPU's samples are batches of calls
    if (device == Device::CPU) {
        const DLDataType type = dlpack::type_of(dtype);
        DLTensor dq = dense_dl(q.data(), q_shape, type), dk = dense_dl(k.data(), k_shape, type),
                 dv_ = dense_dl(v.data(), v_shape, type), dout = dense_dl(out.data(), out_shape, type),
                 dmask = dense_dl(mask.data(), mask_shape, dlpack::kBool);
        if (a.backward) {
            // The forward once (out and lse), then the backward timed alone.
            std::vector<float> lse(count(out_shape) / size_t(dv));
            std::vector<int64_t> lse_shape{a.b, a.h, a.n};
            auto gradient_out = elements_of(random_floats(count(out_shape), 4), dtype);
            auto grad_q = q, grad_k = k, grad_v = v;
            DLTensor dlse = dense_dl(lse.data(), lse_shape, DLDataType{kDLFloat, 32, 1}),
                     ddout = dense_dl(gradient_out.data(), out_shape, type),
                     ddq = dense_dl(grad_q.data(), q_shape, type), ddk = dense_dl(grad_k.data(), k_shape, type),
                     ddv = dense_dl(grad_v.data(), v_shape, type);
            forward(dq, dk, dv_, a.mask ? &dmask : nullptr, dout, &dlse, forward_options);
            PeakMemoryGrowth growth;
            ms = timing::time_calls(
                [&] { backward(dq, dk, dv_, a.mask ? &dmask : nullptr, dout, dlse, ddout, ddq, ddk, ddv, options); },
                a.repeats);
            extra_mib = growth.mib();
        } else {
            PeakMemoryGrowth growth;
            ms = timing::time_calls([&] { forward(dq, dk, dv_, a.mask ? &dmask : nullptr, dout, options); }, a.repeats);
            extra_mib = growth.mib();
        }
    } else if (a.backward) {
        // The forward once (out and lse on the device), then the backward timed alone.
        auto gq = on_device(q, dtype, q_shape, device), gk = on_device(k, dtype, k_shape, device),
             gv = on_device(v, dtype, v_shape, device), gdout = on_device(elements_of(random_floats(count(out_shape), 4), dtype), dtype, out_shape, device);
        Halide::Runtime::Buffer<void> gout = on_device(out, dtype, out_shape, device),
                                      gdq = on_device(q, dtype, q_shape, device), gdk = on_device(k, dtype, k_shape, device),
                                      gdv = on_device(v, dtype, v_shape, device);
        Halide::Runtime::Buffer<float> glse(int(a.n), int(a.h), int(a.b));  // written on the device by the forward
        if (int status = glse.device_malloc(device_interface(device))) {
            throw Error("attend bench: allocating lse on the device failed (Halide error " + std::to_string(status) + ")");
        }
        Halide::Runtime::Buffer<uint8_t> gmask(int(a.m), int(a.b));
        std::copy(mask.begin(), mask.end(), gmask.data());
        gmask.set_host_dirty();
        const Halide::Runtime::Buffer<const void> use_mask =
            a.mask ? Halide::Runtime::Buffer<const void>(gmask) : Halide::Runtime::Buffer<const void>();
        forward(gq, gk, gv, use_mask, gout, glse, forward_options);
        ms = timing::time_gpu_calls([&] { backward(gq, gk, gv, use_mask, gout, glse, gdout, gdq, gdk, gdv, options); },
                                    [&] {
                                        if (int status = gdq.device_sync()) {
                                            throw Error("attend bench: waiting for the kernel failed (Halide error " +
                                                        std::to_string(status) + ")");
                                        }
                                    },
                                    a.repeats, calls_per_sample);
    } else {
        // Inputs and output stay on the device; each sample waits once, after its batch.
        auto gq = on_device(q, dtype, q_shape, device), gk = on_device(k, dtype, k_shape, device),
             gv = on_device(v, dtype, v_shape, device);
        Halide::Runtime::Buffer<void> gout = on_device(out, dtype, out_shape, device);  // keeps its device state
        Halide::Runtime::Buffer<uint8_t> gmask(int(a.m), int(a.b));
        std::copy(mask.begin(), mask.end(), gmask.data());
        gmask.set_host_dirty();
        Halide::Runtime::Buffer<const void> no_mask;
        ms = timing::time_gpu_calls(
            [&] { forward(gq, gk, gv, a.mask ? Halide::Runtime::Buffer<const void>(gmask) : no_mask, gout, options); },
            [&] {
                if (int status = gout.device_sync()) {
                    throw Error("attend bench: waiting for the kernel failed (Halide error " + std::to_string(status) + ")");
                }
            },
            a.repeats, calls_per_sample);
    }
    double best = *std::min_element(ms.begin(), ms.end()), med = timing::median(ms);
    double flops = a.backward ? backward_flop_count(a.b, a.h, a.n, a.m, a.d, dv, a.causal)
                              : flop_count(a.b, a.h, a.n, a.m, a.d, dv, a.causal);
    KernelRequest request;
    request.operation = a.backward ? Operation::Backward : Operation::Forward;
    request.device = device;
    request.dtype = dtype;
    request.head_dim = a.d;
    request.value_dim = dv;
    request.features = Features{a.mask, a.causal, false};
    request.rows_per_head = a.n;
    request.kernel = a.kernel;
    request.cpu_isa = options.cpu_isa;
    std::string why_not;
    auto selected = select_kernel(request, &why_not);
    std::string kernel = selected ? selected->kernel.name : "(none: " + why_not + ")";
    std::printf("%s %s isa=%s b=%lld h=%lld n=%lld m=%lld d=%lld dv=%lld%s%s: best %.3f ms, median %.3f ms, %.1f GFLOP/s",
                kernel.c_str(), a.dtype.c_str(), a.isa.c_str(), (long long)a.b, (long long)a.h, (long long)a.n, (long long)a.m,
                (long long)a.d, (long long)dv, a.causal ? " causal" : "", a.mask ? " mask" : "", best, med,
                flops / best / 1e6);
    if (extra_mib >= 0) std::printf(", %.1f MiB of memory added", extra_mib);
    if (device != Device::CPU) std::printf(", samples of %d calls", calls_per_sample);
    std::printf("\n");
    if (a.json) {
        nlohmann::json j{{"kernel", kernel}, {"device", a.device}, {"dtype", a.dtype}, {"isa", a.isa}, {"b", a.b}, {"h", a.h},
                         {"n", a.n}, {"m", a.m}, {"d", a.d}, {"dv", dv}, {"kv_heads", kv_heads},
                         {"causal", a.causal}, {"mask", a.mask}, {"backward", a.backward}, {"ms", best}, {"median_ms", med},
                         {"gflops", flops / best / 1e6}, {"median_gflops", flops / med / 1e6},
                         {"repeats", a.repeats}};
        if (extra_mib >= 0) j["extra_memory_mib"] = extra_mib;
        if (device != Device::CPU) j["calls_per_sample"] = calls_per_sample;
        std::cout << j.dump() << std::endl;
    }
    return 0;
}

// ---- attend demo --------------------------------------------------------------

// A progress line, rewritten in place, for work that takes more than a second.
class Progress {
public:
    explicit Progress(std::string what) : what_(std::move(what)), start_(std::chrono::steady_clock::now()) {
        std::fflush(stdout);  // what was printed before stays before the progress line
    }
    void update(double fraction) {
        if (seconds() < 1.0) return;
        std::fprintf(stderr, "\r%s: %3.0f%%", what_.c_str(), 100 * fraction);
        shown_ = true;
    }
    void done() {
        if (shown_) std::fprintf(stderr, "\r%s: done in %.1f s\n", what_.c_str(), seconds());
    }
    double seconds() const {
        return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    }

private:
    std::string what_;
    std::chrono::steady_clock::time_point start_;
    bool shown_ = false;
};

// The demo's batch: naturalspeech2-like, a key padding mask and causal.
struct DemoBatch {
    static constexpr int64_t b = 2, h = 8, n = 1024, m = 1024, d = 64;
    static constexpr int64_t lengths[2] = {1024, 700};  // batch 1 padded after 700 keys, as in a TTS batch
    std::vector<int64_t> shape{b, h, n, d}, mask_shape{b, m}, lse_shape{b, h, n};
    std::vector<float> q = random_floats(size_t(b * h * n * d), 11), k = random_floats(size_t(b * h * m * d), 12),
                       v = random_floats(size_t(b * h * m * d), 13), dout = random_floats(size_t(b * h * n * d), 14);
    std::vector<uint8_t> mask;
    Options options;

    DemoBatch() : mask(size_t(b * m)) {
        for (int64_t i = 0; i < b; i++)
            for (int64_t j = 0; j < m; j++) mask[size_t(i * m + j)] = j < lengths[i];
        options.causal = true;
    }
};

// The demo's inputs in one dtype: the values the kernels see (rounded to the
// dtype), their elements, and the double reference computed from those values.
struct DemoInputs {
    std::vector<unsigned char> q_elements, k_elements, v_elements;  // before q, k, v: their initializers fill them
    std::vector<float> q, k, v;
    std::vector<double> expected;

    DemoInputs(const DemoBatch &batch, DType dtype)
        : q(rounded(batch.q, dtype, q_elements)), k(rounded(batch.k, dtype, k_elements)),
          v(rounded(batch.v, dtype, v_elements)) {
        // The reference, one (batch, head) at a time so progress can be shown.
        const int64_t n = batch.n, m = batch.m, d = batch.d;
        Progress progress(std::string("double-precision reference (") + to_string(dtype) + " inputs)");
        for (int64_t bh = 0; bh < batch.b * batch.h; bh++) {
            reference::Shape one{1, 1, 1, n, m, d, d};
            auto part = reference::forward(one, q.data() + bh * n * d, k.data() + bh * m * d, v.data() + bh * m * d,
                                           batch.mask.data() + bh / batch.h * m, batch.options);
            expected.insert(expected.end(), part.begin(), part.end());
            progress.update(double(bh + 1) / double(batch.b * batch.h));
        }
        progress.done();
    }

    // values rounded to dtype; their elements in *elements.
    static std::vector<float> rounded(const std::vector<float> &values, DType dtype,
                                      std::vector<unsigned char> &elements) {
        elements = elements_of(values, dtype);
        return floats_of(elements, dtype);
    }
};

double unit_roundoff(DType dtype) {
    return dtype == DType::Float32 ? 0.0 : dtype == DType::Float16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
}

// Times calls of one kernel on every CPU target this machine runs (a GPU kernel:
// once); `check` judges each result. The last column is `work` (flops, or bytes
// read) per call in G per second. A kernel whose device is missing is reported
// and skipped. Returns false when a result failed its check.
template <typename Call, typename Check>
bool demo_rows(const KernelInfo &kernel, bool picked_kernel, double work, Call &&call, Check &&check) {
    std::vector<CpuIsa> isas{CpuIsa::Auto};
    if (kernel.device == Device::CPU) isas = supported_cpu_isas();
    bool all_ok = true;
    for (CpuIsa isa : isas) {
        Options o;
        o.kernel = kernel.name;
        o.cpu_isa = isa;
        o.device = kernel.device;
        const char *isa_name = kernel.device == Device::CPU ? to_string(isa) : to_string(kernel.device);
        std::vector<double> ms;
        try {
            // The GPU runs copy the inputs in and the result out on every call.
            ms = timing::time_calls([&] { call(o); }, kernel.device == Device::CPU ? 5 : 2);
        } catch (const attend::Error &e) {  // no such device here: say so and go on
            std::printf("%-32s %-9s %-9s not run: %s\n", kernel.name.c_str(), to_string(kernel.dtype), isa_name,
                        e.what());
            continue;
        }
        const auto [max_error, within] = check();
        all_ok = all_ok && within;
        std::printf("%-32s %-9s %-9s %12.2e %10.2f %12.1f%s%s\n", kernel.name.c_str(), to_string(kernel.dtype),
                    isa_name, max_error, timing::median(ms), work / timing::median(ms) / 1e6,
                    within ? "" : "  ERROR ABOVE THE BOUND",
                    picked_kernel && isa == CpuIsa::Auto ? "  <- what the call picks here" : "");
    }
    return all_ok;
}

// Every forward kernel of the build on the batch, against the double reference.
bool demo_forward(const DemoBatch &batch, std::map<DType, DemoInputs> &inputs) {
    // fp32 parity with the reference at this size (tests/support.hpp derives the
    // bound); a 16-bit out adds its rounding, the unit roundoff times |out|.
    const double parity = 2e-5;
    std::vector<int64_t> shape = batch.shape, mask_shape = batch.mask_shape;
    std::printf("%-32s %-9s %-9s %12s %10s %12s\n", "forward kernel", "dtype", "isa", "max |error|", "median ms",
                "GFLOP/s");
    bool all_ok = true;
    for (const auto &kernel : available_kernels()) {
        if (kernel.operation != Operation::Forward || kernel.max_rows > 0 ||
            (kernel.head_dim != 0 && kernel.head_dim != batch.d)) {
            continue;
        }
        DemoInputs &in = inputs.at(kernel.dtype);
        const DLDataType type = dlpack::type_of(kernel.dtype);
        std::vector<unsigned char> out(in.q_elements.size(), 0xff);  // NaN in every dtype
        DLTensor dq = dense_dl(in.q_elements.data(), shape, type), dk = dense_dl(in.k_elements.data(), shape, type),
                 dv = dense_dl(in.v_elements.data(), shape, type), dout = dense_dl(out.data(), shape, type),
                 dmask = dense_dl(const_cast<uint8_t *>(batch.mask.data()), mask_shape, dlpack::kBool);
        const auto selected = select_kernel(kernel.device, kernel.dtype, batch.d, batch.d, {true, true, false});
        all_ok &= demo_rows(
            kernel, selected && selected->name == kernel.name,
            flop_count(batch.b, batch.h, batch.n, batch.m, batch.d, batch.d, true),
            [&](Options o) {
                o.causal = batch.options.causal;
                forward(dq, dk, dv, &dmask, dout, o);
            },
            [&] {
                const auto got = floats_of(out, kernel.dtype);
                std::fill(out.begin(), out.end(), 0xff);  // NaN in every dtype, for the next target
                double max_error = 0;
                bool within = true;
                for (size_t e = 0; e < got.size(); e++) {
                    double err = std::fabs(double(got[e]) - in.expected[e]);
                    max_error = std::isnan(err) ? INFINITY : std::max(max_error, err);
                    within = within && err <= parity + unit_roundoff(kernel.dtype) * std::fabs(in.expected[e]);
                }
                return std::pair{max_error, within};
            });
    }
    std::printf("\nGFLOP/s counts 4*b*h*n*m*d/2 (causal). %s\n\n",
                all_ok ? "Every kernel matches the reference within 2e-5 (plus, for float16/bfloat16, the "
                         "rounding of out: 2^-11 and 2^-8 of |out|)."
                       : "SOME KERNELS DISAGREE WITH THE REFERENCE.");
    return all_ok;
}

// Decoding: the last query of every head (a view of q, one row) over the whole
// batch of keys, bottom-right causal, on each decode kernel; the reference is the
// batch's last row (it sees every key, as a decoded token does).
bool demo_decode(const DemoBatch &batch, std::map<DType, DemoInputs> &inputs) {
    const double parity = 2e-5;  // as the forward table's
    std::vector<int64_t> kv_shape = batch.shape, mask_shape = batch.mask_shape,
                         row_shape{batch.b, batch.h, 1, batch.d};
    std::vector<int64_t> q_strides{batch.h * batch.n * batch.d, batch.n * batch.d, batch.d, 1};
    Options options;
    options.causal = true;
    options.causal_align = CausalAlign::BottomRight;
    bool any = false, all_ok = true;
    for (const auto &kernel : available_kernels()) {
        if (kernel.operation != Operation::Forward || kernel.max_rows == 0 || kernel.head_dim != batch.d) continue;
        if (!any) {
            std::printf("%-32s %-9s %-9s %12s %10s %12s\n", "decode kernel (n=1, m=1024)", "dtype", "isa",
                        "max |error|", "median ms", "GB/s of k, v");
        }
        any = true;
        DemoInputs &in = inputs.at(kernel.dtype);
        const DLDataType type = dlpack::type_of(kernel.dtype);
        const size_t bytes = kernel.dtype == DType::Float32 ? 4 : 2;
        std::vector<unsigned char> out(size_t(batch.b * batch.h * batch.d) * bytes, 0xff);
        DLTensor dq = dense_dl(in.q_elements.data() + size_t((batch.n - 1) * batch.d) * bytes, row_shape, type);
        dq.strides = q_strides.data();
        DLTensor dk = dense_dl(in.k_elements.data(), kv_shape, type), dv = dense_dl(in.v_elements.data(), kv_shape, type),
                 dout = dense_dl(out.data(), row_shape, type),
                 dmask = dense_dl(const_cast<uint8_t *>(batch.mask.data()), mask_shape, dlpack::kBool);
        KernelRequest request;
        request.dtype = kernel.dtype;
        request.head_dim = request.value_dim = batch.d;
        request.features = {true, true, false};
        request.rows_per_head = 1;
        const auto selected = select_kernel(request);
        // Reported as the rate of reading k and v (the roofline of decoding).
        const double kv_bytes = 2.0 * double(batch.b * batch.h * batch.m * batch.d * int64_t(bytes));
        all_ok &= demo_rows(
            kernel, selected && selected->kernel.name == kernel.name, kv_bytes,
            [&](Options o) {
                o.causal = options.causal;
                o.causal_align = options.causal_align;
                forward(dq, dk, dv, &dmask, dout, o);
            },
            [&] {
                const auto got = floats_of(out, kernel.dtype);
                std::fill(out.begin(), out.end(), 0xff);
                double max_error = 0;
                bool within = true;
                for (int64_t bh = 0; bh < batch.b * batch.h; bh++) {
                    for (int64_t c = 0; c < batch.d; c++) {
                        const double expected = in.expected[size_t((bh * batch.n + batch.n - 1) * batch.d + c)];
                        const double err = std::fabs(double(got[size_t(bh * batch.d + c)]) - expected);
                        max_error = std::isnan(err) ? INFINITY : std::max(max_error, err);
                        within = within && err <= parity + unit_roundoff(kernel.dtype) * std::fabs(expected);
                    }
                }
                return std::pair{max_error, within};
            });
    }
    if (any) {
        std::printf("\n%s\n\n", all_ok ? "Every decode kernel matches the reference's last row within the forward's bound."
                                        : "SOME DECODE KERNELS DISAGREE WITH THE REFERENCE.");
    }
    return all_ok;
}

// The backward of the batch in one dtype: dout rounded to it, out and lse from
// the forward this build picks, and the double reference's gradients of the
// seed module's function with the bound of each element (docs/contract.md §15).
struct DemoGradients {
    std::vector<unsigned char> dout_elements, out_elements;
    std::vector<float> lse;
    std::vector<double> dq, dk, dv, dq_terms, dk_terms, dv_terms;
    double relative_dq = 0, relative_kv = 0;  // the bound per unit of an element's sum of absolute terms

    DemoGradients(const DemoBatch &batch, const DemoInputs &in, DType dtype) {
        std::vector<int64_t> shape = batch.shape, mask_shape = batch.mask_shape, lse_shape = batch.lse_shape;
        const DLDataType type = dlpack::type_of(dtype);
        const std::vector<float> dout = DemoInputs::rounded(batch.dout, dtype, dout_elements);
        out_elements.resize(dout_elements.size());
        lse.resize(size_t(batch.b * batch.h * batch.n));
        DLTensor tq = dense_dl(const_cast<unsigned char *>(in.q_elements.data()), shape, type),
                 tk = dense_dl(const_cast<unsigned char *>(in.k_elements.data()), shape, type),
                 tv = dense_dl(const_cast<unsigned char *>(in.v_elements.data()), shape, type),
                 tout = dense_dl(out_elements.data(), shape, type),
                 tlse = dense_dl(lse.data(), lse_shape, DLDataType{kDLFloat, 32, 1}),
                 tmask = dense_dl(const_cast<uint8_t *>(batch.mask.data()), mask_shape, dlpack::kBool);
        forward(tq, tk, tv, &tmask, tout, &tlse, batch.options);

        const int64_t n = batch.n, m = batch.m, d = batch.d;
        Progress progress(std::string("double-precision reference gradients (") + to_string(dtype) + " inputs)");
        double largest_norm_q = 0, largest_norm_k = 0;
        for (int64_t bh = 0; bh < batch.b * batch.h; bh++) {
            reference::Shape one{1, 1, 1, n, m, d, d};
            const auto g = reference::backward(one, in.q.data() + bh * n * d, in.k.data() + bh * m * d,
                                               in.v.data() + bh * m * d, batch.mask.data() + bh / batch.h * m,
                                               dout.data() + bh * n * d, batch.options);
            for (auto [to, from] : {std::pair{&dq, &g.dq}, {&dk, &g.dk}, {&dv, &g.dv}, {&dq_terms, &g.dq_terms},
                                    {&dk_terms, &g.dk_terms}, {&dv_terms, &g.dv_terms}})
                to->insert(to->end(), from->begin(), from->end());
            progress.update(double(bh + 1) / double(batch.b * batch.h));
        }
        progress.done();
        for (const auto &[values, largest] : {std::pair{&in.q, &largest_norm_q}, {&in.k, &largest_norm_k}}) {
            for (size_t row = 0; row < values->size(); row += size_t(d)) {
                double squares = 0;
                for (int64_t c = 0; c < d; c++) squares += double((*values)[row + c]) * (*values)[row + c];
                *largest = std::max(*largest, std::sqrt(squares));
            }
        }
        double largest_lse = 0;
        for (float l : lse)
            if (std::isfinite(l)) largest_lse = std::max(largest_lse, double(std::fabs(l)));
        // Each term carries P's error (the score through exp: 2·sqrt(d)·eps·|s|,
        // and lse's, eps·|lse|) and dP's and D's (sqrt(d)·eps); the sum over
        // `outer` terms adds sqrt(outer)·eps; a 16-bit out moves D by u; factor 4
        // as in the tests (tests/backward_support.hpp).
        const double eps = FLT_EPSILON, score = largest_norm_q * largest_norm_k / std::sqrt(double(d));
        auto relative = [&](int64_t outer) {
            return 4.0 * eps * (2.0 * std::sqrt(double(d)) * score + std::sqrt(double(d)) + largest_lse +
                                std::sqrt(double(outer)) + 8.0) +
                   unit_roundoff(dtype);
        };
        relative_dq = relative(m);
        relative_kv = relative(n);
    }
};

// Every backward kernel of the build on the batch, against the reference's gradients.
bool demo_backward(const DemoBatch &batch, std::map<DType, DemoInputs> &inputs) {
    std::map<DType, DemoGradients> gradients;
    for (const auto &kernel : available_kernels()) {
        if (kernel.operation == Operation::Backward && !gradients.count(kernel.dtype))
            gradients.try_emplace(kernel.dtype, batch, inputs.at(kernel.dtype), kernel.dtype);
    }
    if (gradients.empty()) return true;
    std::printf("%-32s %-9s %-9s %12s %10s %12s\n", "backward kernel (dq, dk, dv)", "dtype", "isa",
                "max |error|", "median ms", "GFLOP/s");
    std::vector<int64_t> shape = batch.shape, mask_shape = batch.mask_shape, lse_shape = batch.lse_shape;
    bool all_ok = true;
    for (const auto &kernel : available_kernels()) {
        if (kernel.operation != Operation::Backward || (kernel.head_dim != 0 && kernel.head_dim != batch.d)) continue;
        DemoInputs &in = inputs.at(kernel.dtype);
        DemoGradients &g = gradients.at(kernel.dtype);
        const DLDataType type = dlpack::type_of(kernel.dtype);
        std::vector<unsigned char> dq(in.q_elements.size(), 0xff), dk(dq.size(), 0xff), dv(dq.size(), 0xff);
        DLTensor tq = dense_dl(in.q_elements.data(), shape, type), tk = dense_dl(in.k_elements.data(), shape, type),
                 tv = dense_dl(in.v_elements.data(), shape, type), tout = dense_dl(g.out_elements.data(), shape, type),
                 tlse = dense_dl(g.lse.data(), lse_shape, DLDataType{kDLFloat, 32, 1}),
                 tdout = dense_dl(g.dout_elements.data(), shape, type), tdq = dense_dl(dq.data(), shape, type),
                 tdk = dense_dl(dk.data(), shape, type), tdv = dense_dl(dv.data(), shape, type),
                 tmask = dense_dl(const_cast<uint8_t *>(batch.mask.data()), mask_shape, dlpack::kBool);
        KernelRequest request;
        request.operation = Operation::Backward;
        request.device = kernel.device;
        request.dtype = kernel.dtype;
        request.head_dim = request.value_dim = batch.d;
        request.features = {true, true, false};
        const auto selected = select_kernel(request);
        const double u = unit_roundoff(kernel.dtype),
                     subnormal = kernel.dtype == DType::Float16 ? std::ldexp(1.0, -25) : 0.0;
        all_ok &= demo_rows(
            kernel, selected && selected->kernel.name == kernel.name,
            backward_flop_count(batch.b, batch.h, batch.n, batch.m, batch.d, batch.d, true),
            [&](Options o) {
                o.causal = batch.options.causal;
                backward(tq, tk, tv, &tmask, tout, tlse, tdout, tdq, tdk, tdv, o);
            },
            [&] {
                double max_error = 0;
                bool within = true;
                for (const auto &[got_elements, expected, terms, relative] :
                     {std::tuple{&dq, &g.dq, &g.dq_terms, g.relative_dq}, {&dk, &g.dk, &g.dk_terms, g.relative_kv},
                      {&dv, &g.dv, &g.dv_terms, g.relative_kv}}) {
                    const auto got = floats_of(*got_elements, kernel.dtype);
                    std::fill(got_elements->begin(), got_elements->end(), 0xff);  // NaN, for the next target
                    for (size_t e = 0; e < got.size(); e++) {
                        const double err = std::fabs(double(got[e]) - (*expected)[e]);
                        max_error = std::isnan(err) ? INFINITY : std::max(max_error, err);
                        within = within && err <= relative * (*terms)[e] + u * std::fabs((*expected)[e]) + subnormal;
                    }
                }
                return std::pair{max_error, within};
            });
    }
    std::printf("\nGFLOP/s counts 10*b*h*n*m*d/2 (causal). %s\n",
                all_ok ? "Every gradient element is within its bound of the reference: 4*eps*(2*sqrt(d)*|s| + "
                         "sqrt(d) + |lse| + sqrt(n or m) + 8) (plus, for float16/bfloat16, 2^-11 and 2^-8) times "
                         "the sum of its terms' absolute values, plus the rounding of the gradient."
                       : "SOME GRADIENTS DISAGREE WITH THE REFERENCE.");
    return all_ok;
}

int demo_command() {
    const DemoBatch batch;
    std::printf("attend demo: naturalspeech2-like attention, b=%lld h=%lld n=m=%lld d=%lld,\n"
                "key padding mask (lengths %lld and %lld) and causal, forward and backward against a\n"
                "double-precision reference computed from the same inputs (float16/bfloat16: the inputs\n"
                "rounded to that dtype)\n\n",
                (long long)batch.b, (long long)batch.h, (long long)batch.n, (long long)batch.d,
                (long long)batch.lengths[0], (long long)batch.lengths[1]);
    std::map<DType, DemoInputs> inputs;  // the references first, then the tables
    for (const auto &kernel : available_kernels()) {
        if (!inputs.count(kernel.dtype)) inputs.try_emplace(kernel.dtype, batch, kernel.dtype);
    }
    const bool forward_ok = demo_forward(batch, inputs);
    const bool decode_ok = demo_decode(batch, inputs);
    const bool backward_ok = demo_backward(batch, inputs);
    return forward_ok && decode_ok && backward_ok ? 0 : 1;
}

// `attend kernels --device cuda`: runs each CUDA kernel of the build (forward
// and backward) on a small problem, without and with dropout, so the driver
// compiles it, then prints what it compiled each function into.
int cuda_functions_command() {
    std::string first_error;
    for (const auto &k : available_kernels()) {
        if (k.device != Device::CUDA) continue;
        std::vector<int64_t> shape{1, 1, 64, k.head_dim}, lse_shape{1, 1, 64};
        const DLDataType type = dlpack::type_of(k.dtype);
        std::vector<unsigned char> zeros(size_t(64 * k.head_dim) * 4), out(zeros.size()), dq(zeros.size()),
            dk(zeros.size()), dv(zeros.size());
        std::vector<float> lse(64);
        DLTensor q = dense_dl(zeros.data(), shape, type), o = dense_dl(out.data(), shape, type),
                 l = dense_dl(lse.data(), lse_shape, DLDataType{kDLFloat, 32, 1}), tdq = dense_dl(dq.data(), shape, type),
                 tdk = dense_dl(dk.data(), shape, type), tdv = dense_dl(dv.data(), shape, type);
        for (bool dropout : {false, true}) {
            Options options;
            options.device = Device::CUDA;
            options.training = dropout;
            options.dropout = 0.25f;
            try {
                if (k.operation == Operation::Forward) {
                    options.kernel = k.name;
                    forward(q, q, q, nullptr, o, options);
                } else {  // the backward of the forward select_kernel picks
                    forward(q, q, q, nullptr, o, &l, options);
                    options.kernel = k.name;
                    backward(q, q, q, nullptr, o, l, o, tdq, tdk, tdv, options);
                }
            } catch (const std::exception &e) {  // a module that loaded is still reported
                if (first_error.empty()) first_error = std::string(k.name) + ": " + e.what();
            }
        }
    }
    const auto functions = cuda_functions();
    if (functions.empty()) {
        throw attend::Error(first_error.empty() ? "attend: kernels --device cuda: this build has no CUDA kernels"
                                                : first_error);
    }
    std::printf("%-36s %-40s %9s %11s %9s\n", "kernel", "function", "registers", "local bytes", "JIT limit");
    auto figure = [](int value) { return value < 0 ? std::string("?") : std::to_string(value); };
    for (const auto &f : functions) {
        std::printf("%-36s %-40s %9s %11s %9s\n", f.kernel.c_str(), f.function.c_str(), figure(f.registers).c_str(),
                    figure(f.local_bytes).c_str(), f.max_registers < 0 ? "none" : std::to_string(f.max_registers).c_str());
    }
    std::printf("\nRegisters and local bytes (spills included) per thread, as the CUDA driver compiled each "
                "function; ? where it could not say.\n");
    if (!first_error.empty()) {  // the table may lack their functions: not a clean report
        std::fprintf(stderr, "attend kernels: some calls failed, their functions may be missing above: %s\n",
                     first_error.c_str());
        return 1;
    }
    return 0;
}

int kernels_command(const std::string &device) {
    if (device == "cuda") return cuda_functions_command();
    if (!device.empty()) {
        throw BadInput("--device: expected cuda (what the driver compiled each CUDA kernel into), got '" + device + "'");
    }
    std::printf("kernels of this build:\n");
    for (const auto &k : available_kernels()) {
        // What a call that names the kernel runs here: the selection forward() and backward() make.
        KernelRequest request;
        request.operation = k.operation;
        request.device = k.device;
        request.dtype = k.dtype;
        request.head_dim = request.value_dim = k.head_dim ? k.head_dim : 64;
        request.kernel = k.name;
        std::string why_not, runs;
        if (auto choice = select_kernel(request, &why_not)) {
            runs = k.device == Device::CPU ? std::string("runs ") + to_string(choice->cpu_isa) + " here" : "";
        } else {
            runs = "cannot run here: " + why_not;
        }
        std::string targets;
        for (CpuIsa isa : k.cpu_isas) targets += std::string(targets.empty() ? "" : "+") + to_string(isa);
        const std::string rows =
            k.max_rows > 0 ? ", decoding: picked for at most " + std::to_string(k.max_rows) + " query rows per head" : "";
        std::printf("  %-32s %s, %s, %s, %s%s%s%s%s\n", k.name.c_str(), to_string(k.operation), to_string(k.device),
                    to_string(k.dtype),
                    k.head_dim ? ("d = dv = " + std::to_string(k.head_dim)).c_str() : "any d and dv", rows.c_str(),
                    targets.empty() ? "" : (", targets " + targets).c_str(), runs.empty() ? "" : ", ", runs.c_str());
    }
    std::printf("cpu instruction sets this machine can run:");
    for (CpuIsa isa : supported_cpu_isas()) std::printf(" %s", to_string(isa));
    std::printf("\n");
    return 0;
}


}  // namespace

int main(int argc, char **argv) {
    CLI::App app{"attend: the attention of naturalspeech2's Attend module, from Halide kernels"};
    app.require_subcommand(1);

    RunArgs run;
    auto *run_cmd = app.add_subcommand("run", "attention on .npy files (float32, C order; mask bool)");
    run_cmd->option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    run_cmd->add_option("--q", run.q, "queries [b, h, n, d]")->required();
    run_cmd->add_option("--k", run.k, "keys [b, h, m, d], [b, hk, m, d] or [b, m, d]")->required();
    run_cmd->add_option("--v", run.v, "values, like k with last dim dv")->required();
    run_cmd->add_option("--out", run.out, "output [b, h, n, dv], written only on success")->required();
    run_cmd->add_option("--lse", run.lse,
                        "also write each row's log-sum-exp, float32 [b, h, n] (-inf where every key is masked)");
    run_cmd->add_option("--mask", run.mask, "key padding mask, bool [b, m], true = attend");
    run_cmd->add_option("--dout", run.dout, "the backward: the gradient of the loss by out, [b, h, n, dv]");
    run_cmd->add_option("--dq", run.dq, "the backward: dq is written here (q's shape); needs --dout, --dk, --dv");
    run_cmd->add_option("--dk", run.dk, "the backward: dk (k's shape)");
    run_cmd->add_option("--dv", run.dv, "the backward: dv (v's shape)");
    run_cmd->add_option("--dtype", run.dtype,
                        "float32, float16 or bfloat16: convert q, k, v to it (default: q's dtype); out is written "
                        "in it (bfloat16: as float32, which numpy can read)");
    run_cmd->add_flag("--causal", run.causal, "mask key j for query i when j > i (see --causal-align)");
    run_cmd->add_option("--causal-align", run.causal_align,
                        "top-left (default: j > i masked) or bottom-right (j > i + m - n masked: decoding)");
    run_cmd->add_option("--scale", run.scale, "score scale (default d^-0.5)");
    run_cmd->add_option("--dropout", run.dropout, "training-mode dropout probability p in [0, 1]");
    run_cmd->add_option("--seed", run.seed, "dropout seed");
    run_cmd->add_option("--device", run.device, "cpu, cuda or opencl (host .npy data is copied to the device)");
    run_cmd->add_option("--kernel", run.kernel, "force a kernel (see `attend kernels`)");
    run_cmd->add_option("--isa", run.isa, "cap the CPU instruction set: auto, avx512, avx2, baseline");
    run_cmd->add_flag("--ring", run.ring,
                      "ring attention over the ranks of mpirun: each rank computes its shard of the sequence, rank "
                      "0 writes the whole result (the same as without --ring)");
    run_cmd->add_option("--layout", run.layout,
                        "--ring: contiguous (default; rank r holds the r-th of P chunks) or zigzag (2P chunks, rank r "
                        "holds r and 2P-1-r: balanced for --causal)");

    BenchArgs bench;
    auto *bench_cmd = app.add_subcommand("bench", "time a kernel on random inputs (best and median of --repeats)");
    bench_cmd->option_defaults()->multi_option_policy(CLI::MultiOptionPolicy::TakeLast);
    bench_cmd->add_option("--b", bench.b, "batch");
    bench_cmd->add_option("--h", bench.h, "heads");
    bench_cmd->add_option("--n", bench.n, "queries");
    bench_cmd->add_option("--m", bench.m, "keys");
    bench_cmd->add_option("--d", bench.d, "head dim");
    bench_cmd->add_option("--dv", bench.dv, "value head dim (default d)");
    bench_cmd->add_option("--kv-heads", bench.kv_heads, "kv heads (default h; 0: multi-query [b, m, d])");
    bench_cmd->add_flag("--causal", bench.causal, "causal");
    bench_cmd->add_flag("--mask", bench.mask, "with a key padding mask (last 10% of keys masked)");
    bench_cmd->add_option("--repeats", bench.repeats,
                          "timed samples after a warm-up (CPU: one call each; GPU: a batch of calls, about 20 ms)");
    bench_cmd->add_option("--device", bench.device, "cpu, cuda or opencl (data kept on the device)");
    bench_cmd->add_option("--kernel", bench.kernel, "force a kernel");
    bench_cmd->add_option("--isa", bench.isa, "cap the CPU instruction set");
    bench_cmd->add_option("--dtype", bench.dtype, "float32, float16 or bfloat16");
    bench_cmd->add_option("--key-splits", bench.key_splits, "chunks of keys run in parallel (GPU); 0: automatic");
    bench_cmd->add_option("--query-splits", bench.query_splits,
                          "CPU: tasks the query rows of one head run as; 0: automatic");
    bench_cmd->add_flag("--json", bench.json, "print a JSON object as the last line");
    bench_cmd->add_flag("--ring", bench.ring,
                        "under mpirun: time ring attention over the ranks (--n, --m: the whole sequence), with each "
                        "rank's compute, the transfer time it did not hide, bytes sent and the balance");
    bench_cmd->add_option("--layout", bench.layout, "--ring: contiguous (default) or zigzag");
    bench_cmd->add_flag("--backward", bench.backward,
                        "time the backward (dq, dk, dv) after one forward; GFLOP/s count 2·b·h·n·m·(3d + 2dv)");

    auto *demo_cmd = app.add_subcommand("demo", "every kernel of this build on a naturalspeech2-like batch");
    auto *kernels_cmd = app.add_subcommand("kernels", "list the kernels of this build and this CPU's instruction sets");
    std::string kernels_device;
    kernels_cmd->add_option("--device", kernels_device,
                            "cuda: run each CUDA kernel once and print the registers and local (spill) bytes the "
                            "driver compiled each of its functions into");

    try {
        app.parse(argc, argv);
    } catch (const CLI::ParseError &e) {
        return app.exit(e) == 0 ? 0 : 2;
    }
    try {
        if (*run_cmd) return run_command(run);
        if (*bench_cmd) return bench_command(bench);
        if (*demo_cmd) return demo_command();
        if (*kernels_cmd) return kernels_command(kernels_device);
    } catch (...) {
        return exit_status_of(std::current_exception());
    }
    return 2;
}

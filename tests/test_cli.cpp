// The attend program: a good run, bench --json, and bad input (exit status,
// a message on stderr naming what is wrong, OUT.npy untouched).
#include <sys/wait.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

#include "low_precision.hpp"
#include "npy.hpp"

using namespace attend;
using namespace attend::test;
namespace fs = std::filesystem;

namespace {

struct Result {
    int status = -1;
    std::string out, err;
};

std::string slurp(const fs::path &p) {
    std::ifstream f(p, std::ios::binary);
    std::stringstream s;
    s << f.rdbuf();
    return s.str();
}

class Workspace {
public:
    Workspace() : dir_(fs::temp_directory_path() / ("attend_cli_test_" + std::to_string(::getpid()))) {
        fs::remove_all(dir_);
        fs::create_directories(dir_);
    }
    ~Workspace() { fs::remove_all(dir_); }
    std::string path(const std::string &name) const { return (dir_ / name).string(); }

    // env: VAR=value settings for the program, before its name.
    Result attend(const std::string &args, const std::string &env = "") const {
        Result r;
        std::string command =
            env + " " + std::string(ATTEND_CLI) + " " + args + " > " + path("stdout") + " 2> " + path("stderr");
        int raw = std::system(command.c_str());
        r.status = WIFEXITED(raw) ? WEXITSTATUS(raw) : -1;
        r.out = slurp(path("stdout"));
        r.err = slurp(path("stderr"));
        return r;
    }

    void save(const std::string &name, const Tensor<float> &t) const {
        npy::Array a;
        a.dtype = npy::DType::Float32;
        a.shape = t.shape;
        auto dense = t.dense();
        a.data.resize(dense.size() * sizeof(float));
        std::memcpy(a.data.data(), dense.data(), a.data.size());
        npy::write(path(name), a);
    }
    void save_mask(const std::string &name, const Tensor<uint8_t> &t) const {
        npy::Array a;
        a.dtype = npy::DType::Bool;
        a.shape = t.shape;
        a.data = t.dense();
        npy::write(path(name), a);
    }

private:
    fs::path dir_;
};

// q, k, v, mask of one problem on disk, and a sentinel OUT file.
struct CliProblem {
    Workspace ws;
    Problem p;
    std::string files;
    CliProblem() {
        ProblemSpec spec;
        spec.b = 2;
        spec.h = 4;
        spec.kv_heads = 0;
        spec.n = 30;
        spec.m = 40;
        spec.d = spec.dv = 64;
        spec.mask = true;
        p = make_problem(spec);
        ws.save("q.npy", p.q);
        ws.save("k.npy", p.k);
        ws.save("v.npy", p.v);
        ws.save_mask("mask.npy", *p.mask);
        std::ofstream(ws.path("out.npy")) << "sentinel";
        files = "--q " + ws.path("q.npy") + " --k " + ws.path("k.npy") + " --v " + ws.path("v.npy") + " --mask " +
                ws.path("mask.npy") + " --out " + ws.path("out.npy");
    }
    bool out_untouched() const { return slurp(ws.path("out.npy")) == "sentinel"; }
};

}  // namespace

TEST_CASE("attend run: multi-query with a mask and causal, against the reference") {
    CliProblem c;
    auto r = c.ws.attend("run " + c.files + " --causal");
    INFO(r.err);
    REQUIRE(r.status == 0);
    c.p.options.causal = true;
    auto out = npy::read(c.ws.path("out.npy"));
    CHECK(out.shape == std::vector<int64_t>{2, 4, 30, 64});
    auto result = compare(std::vector<float>(out.f32(), out.f32() + out.numel()), c.p.expected());
    CHECK(result.not_finite == 0);
    CHECK(result.max_error <= fp32_tolerance(c.p));
}

TEST_CASE("attend run: --lse writes each row's log-sum-exp, as the library does") {
    CliProblem c;
    auto r = c.ws.attend("run " + c.files + " --causal --lse " + c.ws.path("lse.npy"));
    INFO(r.err);
    REQUIRE(r.status == 0);
    auto lse = npy::read(c.ws.path("lse.npy"));
    CHECK(lse.shape == std::vector<int64_t>{2, 4, 30});
    c.p.options.causal = true;
    c.p.lse = nan_tensor({2, 4, 30});
    c.p.run();
    CHECK(std::vector<float>(lse.f32(), lse.f32() + lse.numel()) == c.p.lse->dense());
    CHECK(c.ws.attend("run " + c.files + " --lse " + c.ws.path("out.npy")).status == 2);  // the same file as --out
}

TEST_CASE("attend run: --dtype float16 and bfloat16 equal the library call on rounded inputs") {
    for (DType dtype : built_16bit_dtypes()) {
        CliProblem c;
        auto r = c.ws.attend("run " + c.files + " --dtype " + to_string(dtype));
        INFO(std::string(to_string(dtype)) << ": " << r.err);
        REQUIRE(r.status == 0);
        auto out = npy::read(c.ws.path("out.npy"));
        // numpy has float16 but no bfloat16: a bfloat16 out comes as float32, exactly.
        CHECK(out.dtype == (dtype == DType::Float16 ? npy::DType::Float16 : npy::DType::Float32));
        std::vector<float> got;
        for (int64_t e = 0; e < out.numel(); e++) {
            if (out.dtype == npy::DType::Float32) {
                got.push_back(out.f32()[e]);
            } else {
                uint16_t bits;
                std::memcpy(&bits, out.data.data() + 2 * e, 2);
                got.push_back(float16_bits_to_float(bits));
            }
        }
        LowPrecisionRun library(c.p, dtype);
        library.run();
        CHECK(got == library.out_values());
    }
    CliProblem c;
    CHECK(c.ws.attend("run " + c.files + " --dtype float64").status == 2);
    CHECK(c.out_untouched());
}

TEST_CASE("attend run: --causal-align bottom-right equals the library call") {
    CliProblem c;
    REQUIRE(c.ws.attend("run " + c.files + " --causal --causal-align bottom-right").status == 0);
    auto out = npy::read(c.ws.path("out.npy"));
    c.p.options.causal = true;
    c.p.options.causal_align = CausalAlign::BottomRight;
    c.p.run();
    CHECK(std::vector<float>(out.f32(), out.f32() + out.numel()) == c.p.out.dense());
}

TEST_CASE("attend run: dropout with a seed equals the library call") {
    CliProblem c;
    REQUIRE(c.ws.attend("run " + c.files + " --dropout 0.25 --seed 77 --scale 0.2").status == 0);
    auto out = npy::read(c.ws.path("out.npy"));
    c.p.options.training = true;
    c.p.options.dropout = 0.25f;
    c.p.options.seed = 77;
    c.p.options.scale = 0.2f;
    c.p.run();
    CHECK(std::vector<float>(out.f32(), out.f32() + out.numel()) == c.p.out.dense());
}

TEST_CASE("attend run --dout --dq --dk --dv: the backward after the forward, as the library gives it") {
    CliProblem c;
    c.ws.save("dout.npy", random_tensor({2, 4, 30, 64}, 9));
    const std::string gradients = " --dout " + c.ws.path("dout.npy") + " --dq " + c.ws.path("dq.npy") + " --dk " +
                                  c.ws.path("dk.npy") + " --dv " + c.ws.path("dv.npy");
    auto r = c.ws.attend("run " + c.files + " --causal --dropout 0.2 --seed 5" + gradients);
    INFO(r.err);
    REQUIRE(r.status == 0);
    // The library: forward (with lse), then backward, with the same options.
    c.p.options.causal = true;
    c.p.options.training = true;
    c.p.options.dropout = 0.2f;
    c.p.options.seed = 5;
    c.p.lse = nan_tensor({2, 4, 30});
    c.p.run();
    auto dout = random_tensor({2, 4, 30, 64}, 9);
    auto dq = nan_tensor({2, 4, 30, 64}), dk = nan_tensor({2, 40, 64}), dv = nan_tensor({2, 40, 64});
    DLTensor q = c.p.q.dl(), k = c.p.k.dl(), v = c.p.v.dl(), mask = c.p.mask->dl(), out = c.p.out.dl(),
             lse = c.p.lse->dl(), t_dout = dout.dl(), t_dq = dq.dl(), t_dk = dk.dl(), t_dv = dv.dl();
    backward(q, k, v, &mask, out, lse, t_dout, t_dq, t_dk, t_dv, c.p.options);
    for (const auto &gradient : {std::pair{"dq.npy", &dq}, {"dk.npy", &dk}, {"dv.npy", &dv}}) {
        INFO(std::string(gradient.first));
        auto got = npy::read(c.ws.path(gradient.first));
        CHECK(got.shape == gradient.second->shape);
        CHECK(std::vector<float>(got.f32(), got.f32() + got.numel()) == gradient.second->dense());
    }
    // Three of the four: exit 2, nothing written.
    fs::remove(c.ws.path("dq.npy"));
    std::ofstream(c.ws.path("out.npy")) << "sentinel";
    r = c.ws.attend("run " + c.files + " --dout " + c.ws.path("dout.npy") + " --dq " + c.ws.path("dq.npy") + " --dk " +
                    c.ws.path("dk.npy"));
    CHECK(r.status == 2);
    CHECK(r.err.find("the backward needs all four, got 3") != std::string::npos);
    CHECK(c.out_untouched());
    CHECK_FALSE(fs::exists(c.ws.path("dq.npy")));
    // dout of the wrong shape: the backward's message, nothing written (out neither).
    c.ws.save("dout_short.npy", random_tensor({2, 4, 29, 64}, 9));
    r = c.ws.attend("run " + c.files + " --dout " + c.ws.path("dout_short.npy") + " --dq " + c.ws.path("dq.npy") +
                    " --dk " + c.ws.path("dk.npy") + " --dv " + c.ws.path("dv.npy"));
    CHECK(r.status == 2);
    CHECK(r.err.find("dout: expected out's shape") != std::string::npos);
    CHECK(c.out_untouched());
    CHECK_FALSE(fs::exists(c.ws.path("dq.npy")));
    CHECK(c.ws.attend("run " + c.files + gradients.substr(0, gradients.find(" --dk")) + " --dk " + c.ws.path("dq.npy") +
                      " --dv " + c.ws.path("dv.npy")).status == 2);  // --dk names --dq's file
}

TEST_CASE("attend run: bad input exits 2 with a message, OUT.npy untouched") {
    CliProblem c;
    struct Bad {
        std::string args, message;
    };
    std::ofstream(c.ws.path("truncated.npy"), std::ios::binary) << std::string("\x93NUMPY\x01\x00\x10\x00{'descr'", 17);
    c.ws.save("k_wrong_d.npy", random_tensor({2, 40, 32}, 5));
    std::vector<Bad> cases = {
        {"run " + c.files + " --q " + c.ws.path("missing.npy"), "missing.npy"},
        {"run " + c.files + " --k " + c.ws.path("truncated.npy"), "truncated.npy"},
        {"run " + c.files + " --k " + c.ws.path("k_wrong_d.npy"), "k: head dim is 32"},
        {"run " + c.files + " --mask " + c.ws.path("q.npy"), "mask: expected 2 dims"},
        {"run " + c.files + " --dropout 2", "options.dropout"},
        {"run " + c.files + " --device tpu", "--device"},
        {"run " + c.files + " --isa sse9", "--isa"},
        {"run " + c.files + " --scale abc", "--scale"},
        {"run " + c.files + " --causal --causal-align middle", "--causal-align"},
    };
    for (const auto &bad : cases) {
        INFO(bad.args);
        auto r = c.ws.attend(bad.args);
        INFO("stderr: " << r.err);
        CHECK(r.status == 2);
        CHECK(r.err.find(bad.message) != std::string::npos);
        CHECK(std::count(r.err.begin(), r.err.end(), '\n') <= 2);  // one line (CLI11 may add a hint line)
        CHECK(c.out_untouched());
    }
}

TEST_CASE("attend run --device opencl|cuda: the same result as cpu, or exit 1 naming what is missing") {
    CliProblem c;
    REQUIRE(c.ws.attend("run " + c.files + " --causal").status == 0);
    auto on_cpu = npy::read(c.ws.path("out.npy"));
    for (const char *device : {"opencl", "cuda"}) {
        INFO(std::string(device));
        std::ofstream(c.ws.path("out.npy")) << "sentinel";
        auto r = c.ws.attend("run " + c.files + " --causal --device " + device);
        INFO("stderr: " << r.err);
        if (r.status == 0) {
            auto on_gpu = npy::read(c.ws.path("out.npy"));
            REQUIRE(on_gpu.numel() == on_cpu.numel());
            double largest = 0;
            for (int64_t e = 0; e < on_cpu.numel(); e++) {
                largest = std::max(largest, double(std::fabs(on_gpu.f32()[e] - on_cpu.f32()[e])));
            }
            CHECK(largest <= 2 * fp32_tolerance(c.p));  // two fp32 results, each within the bound
        } else {
            // No such device here (CUDA without a GPU): a runtime failure, OUT.npy untouched.
            CHECK(r.status == 1);
            CHECK(r.err.find(std::string(device) == "cuda" ? "CUDA" : "OpenCL") != std::string::npos);
            CHECK(c.out_untouched());
        }
    }
}

#ifdef ATTEND_FAKE_CUDA_DIR
TEST_CASE("attend run --device cuda when the driver reports a fault: exit 1 naming it, OUT.npy untouched") {
    CliProblem c;
    // The fake CUDA driver of tests/fake_cuda, told what to report.
    const std::string driver =
        std::string("LD_LIBRARY_PATH=") + ATTEND_FAKE_CUDA_DIR + "${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ATTEND_FAKE_CUDA=";
    struct Fault {
        const char *settings, *message;
    } faults[] = {
        {"init=100", "cuInit failed: CUDA_ERROR_NO_DEVICE"},
        {"devices=0", "device 0 does not exist"},
        {"memory=4096", "CUDA_ERROR_OUT_OF_MEMORY"},
        {"fault=launch", "unusable after a kernel fault"},
    };
    for (const Fault &fault : faults) {
        INFO(std::string(fault.settings));
        auto r = c.ws.attend("run " + c.files + " --device cuda", driver + fault.settings);
        INFO("stderr: " << r.err);
        CHECK(r.status == 1);
        CHECK(r.err.find(fault.message) != std::string::npos);
        CHECK(std::count(r.err.begin(), r.err.end(), '\n') == 1);
        CHECK(c.out_untouched());
    }
}
#endif

#ifdef ATTEND_FAKE_CUDA_DIR
TEST_CASE("attend kernels --device cuda: each CUDA kernel's functions with the registers the driver gave them") {
    Workspace ws;
    const std::string driver =
        std::string("LD_LIBRARY_PATH=") + ATTEND_FAKE_CUDA_DIR + "${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} ATTEND_FAKE_CUDA=";
    auto r = ws.attend("kernels --device cuda", driver + "launch=noop");
    INFO("stdout: " << r.out << "stderr: " << r.err);
    CHECK(r.status == 0);
    for (const auto &k : available_kernels()) {
        if (k.device == Device::CUDA) CHECK(r.out.find(k.name + " ") != std::string::npos);
    }
    CHECK(r.out.find("_kernel_partial") != std::string::npos);
    CHECK(r.out.find(" 255\n") != std::string::npos);  // the JIT limit: no cap
    // No device: exit 1 naming why.
    auto none = ws.attend("kernels --device cuda", driver + "init=100");
    CHECK(none.status == 1);
    CHECK(none.err.find("CUDA_ERROR_NO_DEVICE") != std::string::npos);
    CHECK(ws.attend("kernels --device tpu").status == 2);
}
#endif

TEST_CASE("attend bench --json: the last line is a JSON object with ms and gflops") {
    Workspace ws;
    const std::string d = std::to_string(built_among({32})[0]);
    auto r = ws.attend("bench --b 1 --h 2 --n 64 --m 80 --d " + d + " --causal --mask --repeats 3 --json");
    REQUIRE(r.status == 0);
    auto last = r.out.substr(r.out.rfind('\n', r.out.size() - 2) + 1);
    auto j = nlohmann::json::parse(last);
    CHECK(j["ms"].get<double>() > 0);
    CHECK(j["gflops"].get<double>() > 0);
    CHECK(j["kernel"] == "attend_cpu_d" + d);
    // The memory the calls add (no n x m buffer; per-task buffers are small).
    REQUIRE(j.contains("extra_memory_mib"));
    CHECK(j["extra_memory_mib"].get<double>() >= 0);
    CHECK(j["extra_memory_mib"].get<double>() < 64);
    CHECK(ws.attend("bench --n 0").status == 2);
    // --backward: the backward kernel, its flop count.
    r = ws.attend("bench --b 1 --h 2 --n 64 --m 80 --d " + d + " --causal --repeats 3 --backward --json");
    REQUIRE(r.status == 0);
    j = nlohmann::json::parse(r.out.substr(r.out.rfind('\n', r.out.size() - 2) + 1));
    CHECK(j["kernel"] == "attend_cpu_backward_d" + d);
    CHECK(j["backward"] == true);
    CHECK(j["gflops"].get<double>() ==
          doctest::Approx(backward_flop_count(1, 2, 64, 80, std::stoi(d), std::stoi(d), true) / j["ms"].get<double>() / 1e6));
}

TEST_CASE("attend bench --device opencl --json: samples are batches of calls, said in the JSON") {
    Workspace ws;
    const std::string d = std::to_string(built_among({32})[0]);
    auto r = ws.attend("bench --device opencl --b 1 --h 2 --n 64 --m 80 --d " + d + " --repeats 2 --json");
    INFO("stderr: " << r.err);
    if (r.status != 0) {  // no OpenCL device here: a runtime failure naming it
        CHECK(r.status == 1);
        CHECK(r.err.find("OpenCL") != std::string::npos);
        return;
    }
    auto last = r.out.substr(r.out.rfind('\n', r.out.size() - 2) + 1);
    auto j = nlohmann::json::parse(last);
    CHECK(j["kernel"].get<std::string>().rfind("attend_opencl_d" + d, 0) == 0);
    CHECK(j["repeats"] == 2);
    CHECK(j["ms"].get<double>() > 0);
    REQUIRE(j.contains("calls_per_sample"));
    CHECK(j["calls_per_sample"].get<int>() >= 1);
    CHECK(j["calls_per_sample"].get<int>() <= 1000);
    CHECK_FALSE(j.contains("extra_memory_mib"));  // host memory is a CPU figure
}

#ifdef ATTEND_TEST_MPIEXEC
TEST_CASE("attend run --ring under mpirun: rank 0 writes the whole result, errors are printed once, nothing written") {
    CliProblem c;  // n = 30, m = 40, multi-query, mask
    const std::string mpirun = "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 HL_NUM_THREADS=1 "
                               ATTEND_TEST_MPIEXEC " 2";
    auto r = c.ws.attend("run " + c.files + " --causal --lse " + c.ws.path("lse.npy") + " --ring", mpirun);
    INFO(r.err);
    REQUIRE(r.status == 0);
    c.p.options.causal = true;
    const Expected expected = c.p.expected();
    auto out = npy::read(c.ws.path("out.npy"));
    CHECK(out.shape == std::vector<int64_t>{2, 4, 30, 64});
    const double tolerance = merge_tolerance(c.p, expected, 2);
    auto result = compare(std::vector<float>(out.f32(), out.f32() + out.numel()), expected);
    INFO("max error " << result.max_error << ", tolerance " << tolerance);
    CHECK(result.not_finite == 0);
    CHECK(result.max_error <= tolerance);
    auto lse = npy::read(c.ws.path("lse.npy"));
    c.p.lse = nan_tensor({2, 4, 30});
    std::memcpy(c.p.lse->storage.data(), lse.f32(), size_t(lse.numel()) * sizeof(float));
    check_lse(c.p, expected.lse);

    // Zig-zag on 2 ranks cuts 30 queries into 4 chunks: a bad input on every rank, printed once.
    std::ofstream(c.ws.path("out.npy")) << "sentinel";
    r = c.ws.attend("run " + c.files + " --ring --layout zigzag", mpirun);
    CHECK(r.status != 0);
    CHECK(r.err.find("attend: rank 0: --q: its sequence of 30 does not divide into 4 equal chunks") !=
          std::string::npos);
    CHECK(r.err.find("rank 0:") == r.err.rfind("rank 0:"));
    CHECK(c.out_untouched());
    r = c.ws.attend("run " + c.files + " --ring --device cuda", mpirun);
    CHECK(r.status != 0);
    CHECK(r.err.find("--ring: runs on the CPU only") != std::string::npos);
    CHECK(c.out_untouched());

    // bench --ring: each rank's steps, and the bytes of its k and v shard sent on once (2 ranks).
    r = c.ws.attend("bench --ring --layout zigzag --causal --b 1 --h 4 --kv-heads 2 --n 64 --m 64 --d 32 --repeats 2 "
                    "--json", mpirun);
    INFO(r.err);
    REQUIRE(r.status == 0);
    const auto report = nlohmann::json::parse(r.out.substr(r.out.rfind('{')));
    CHECK(report["ranks"] == 2);
    CHECK(report["compute_ms"].size() == 2);
    CHECK(report["step_balance"].size() == 2);
    CHECK(report["bytes_sent"][0] == 1 * 2 * 32 * (32 + 32) * 4);  // b · hk · m / 2 · (d + dv) · 4 bytes
    CHECK(report["gflops"].get<double>() > 0);
}
#endif

// attend._attend: the C++ API for Python. Tensors arrive as DLPack capsules
// (attend/__init__.py makes them, choosing each framework's stream rule) and
// outputs are allocated by the caller in Python, so this module only converts
// options, releases the GIL around a call, and turns the C++ errors into
// Python's: std::invalid_argument -> ValueError, attend::Error -> attend.Error.
#include <cstdint>
#include <optional>
#include <string>

#include <nanobind/nanobind.h>
#include <nanobind/stl/optional.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "attend/attend.hpp"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

// The tensor of a DLPack capsule (not consumed: its producer keeps ownership,
// and the capsule's destructor releases it).
const DLTensor &tensor_of(nb::handle capsule, const char *name) {
    if (!PyCapsule_IsValid(capsule.ptr(), "dltensor")) {
        throw std::invalid_argument(std::string("attend: ") + name +
                                    ": expected an unused DLPack capsule ('dltensor'), as __dlpack__() returns");
    }
    return static_cast<DLManagedTensor *>(PyCapsule_GetPointer(capsule.ptr(), "dltensor"))->dl_tensor;
}

const DLTensor *optional_tensor(nb::handle capsule, const char *name) {
    return capsule.is_none() ? nullptr : &tensor_of(capsule, name);
}

attend::Device device_of(const std::string &name) {
    for (attend::Device d : {attend::Device::Auto, attend::Device::CPU, attend::Device::CUDA, attend::Device::OpenCL}) {
        if (name == attend::to_string(d)) return d;
    }
    throw std::invalid_argument("attend: device: expected auto, cpu, cuda or opencl, got '" + name + "'");
}

attend::Options options_of(bool causal, const std::string &causal_align, std::optional<float> scale, float dropout,
                           uint64_t seed, const std::string &device, uintptr_t cuda_stream, const std::string &kernel,
                           int64_t query_offset, int64_t key_offset) {
    attend::Options o;
    o.causal = causal;
    if (causal_align != "top-left" && causal_align != "bottom-right") {
        throw std::invalid_argument("attend: causal_align: expected 'top-left' or 'bottom-right', got '" +
                                    causal_align + "'");
    }
    o.causal_align = causal_align == "top-left" ? attend::CausalAlign::TopLeft : attend::CausalAlign::BottomRight;
    o.scale = scale;
    o.training = dropout != 0.0f;  // Python's dropout means training-mode dropout
    o.dropout = dropout;
    o.seed = seed;
    o.device = device_of(device);
    o.cuda_stream = reinterpret_cast<void *>(cuda_stream);
    o.kernel = kernel;
    o.query_offset = query_offset;
    o.key_offset = key_offset;
    return o;
}

}  // namespace

NB_MODULE(_attend, m) {
    m.doc() = "Attend's C++ API (use the attend package: attend.forward, attend.backward, attend.torch.Attend)";
    nb::exception<attend::Error>(m, "Error");

    m.def(
        "forward",
        [](nb::handle q, nb::handle k, nb::handle v, nb::handle mask, nb::handle out, nb::handle lse, bool causal,
           const std::string &causal_align, std::optional<float> scale, float dropout, uint64_t seed,
           const std::string &device, uintptr_t cuda_stream, const std::string &kernel, int64_t query_offset,
           int64_t key_offset) {
            const DLTensor &tq = tensor_of(q, "q"), &tk = tensor_of(k, "k"), &tv = tensor_of(v, "v"),
                           &tout = tensor_of(out, "out");
            const DLTensor *tmask = optional_tensor(mask, "mask"), *tlse = optional_tensor(lse, "lse");
            const attend::Options o = options_of(causal, causal_align, scale, dropout, seed, device, cuda_stream,
                                                 kernel, query_offset, key_offset);
            nb::gil_scoped_release released;
            attend::forward(tq, tk, tv, tmask, tout, tlse, o);
        },
        "q"_a, "k"_a, "v"_a, "mask"_a.none(), "out"_a, "lse"_a.none(), "causal"_a, "causal_align"_a, "scale"_a.none(),
        "dropout"_a, "seed"_a, "device"_a, "cuda_stream"_a, "kernel"_a, "query_offset"_a, "key_offset"_a,
        "attend::forward on DLPack capsules; out (and lse) are written.");

    m.def(
        "backward",
        [](nb::handle q, nb::handle k, nb::handle v, nb::handle mask, nb::handle out, nb::handle lse, nb::handle dout,
           nb::handle dq, nb::handle dk, nb::handle dv, bool causal, const std::string &causal_align,
           std::optional<float> scale, float dropout, uint64_t seed, const std::string &device, uintptr_t cuda_stream,
           const std::string &kernel, int64_t query_offset, int64_t key_offset) {
            const DLTensor &tq = tensor_of(q, "q"), &tk = tensor_of(k, "k"), &tv = tensor_of(v, "v"),
                           &tout = tensor_of(out, "out"), &tlse = tensor_of(lse, "lse"),
                           &tdout = tensor_of(dout, "dout"), &tdq = tensor_of(dq, "dq"), &tdk = tensor_of(dk, "dk"),
                           &tdv = tensor_of(dv, "dv");
            const DLTensor *tmask = optional_tensor(mask, "mask");
            const attend::Options o = options_of(causal, causal_align, scale, dropout, seed, device, cuda_stream,
                                                 kernel, query_offset, key_offset);
            nb::gil_scoped_release released;
            attend::backward(tq, tk, tv, tmask, tout, tlse, tdout, tdq, tdk, tdv, o);
        },
        "q"_a, "k"_a, "v"_a, "mask"_a.none(), "out"_a, "lse"_a, "dout"_a, "dq"_a, "dk"_a, "dv"_a, "causal"_a,
        "causal_align"_a, "scale"_a.none(), "dropout"_a, "seed"_a, "device"_a, "cuda_stream"_a, "kernel"_a,
        "query_offset"_a, "key_offset"_a, "attend::backward on DLPack capsules; dq, dk and dv are written.");

    m.def(
        "kernels",
        [] {
            std::vector<nb::dict> all;
            for (const attend::KernelInfo &k : attend::available_kernels()) {
                nb::dict d;
                d["name"] = k.name;
                d["operation"] = attend::to_string(k.operation);
                d["device"] = attend::to_string(k.device);
                d["dtype"] = attend::to_string(k.dtype);
                d["head_dim"] = k.head_dim;
                d["max_rows"] = k.max_rows;
                all.push_back(d);
            }
            return all;
        },
        "The kernels of this build: name, operation, device, dtype, head_dim (0: any), max_rows (> 0: a decode "
        "kernel, picked for calls of at most that many query rows per head).");
}

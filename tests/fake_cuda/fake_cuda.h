// The test controls of the fake CUDA driver (fake_cuda.cpp). A test finds them
// with dlsym once attend has loaded the driver (RTLD_GLOBAL), or as declared here.
#pragma once

#include <cstddef>
#include <cstdint>

extern "C" {

// Settings "key=value,key=value" (the same as the ATTEND_FAKE_CUDA variable,
// read when the driver loads); keys not given keep their value:
//   init=CODE       what cuInit returns (100: CUDA_ERROR_NO_DEVICE)
//   devices=N       how many devices there are (1)
//   memory=BYTES    device memory (1 GiB); an allocation past it is OUT_OF_MEMORY
//   fault=launch    the next launch faults: it returns success and leaves its
//                   context with CUDA_ERROR_ILLEGAL_ADDRESS, as a kernel that
//                   reads a bad address does on a GPU (the error is sticky)
//   fault=none      no fault
// Returns 0, or -1 for a setting it does not know.
int attend_fake_cuda_configure(const char *settings);

struct AttendFakeCudaStats {
    uint64_t work_calls;    // calls that do work in a context: allocations, copies, modules, launches
    uint64_t launches;      // kernel launches, faulting ones included
    uint64_t live_bytes;    // device memory allocated and not freed
    uint64_t allocations;   // successful cuMemAlloc calls
};
void attend_fake_cuda_stats(AttendFakeCudaStats *stats);
}

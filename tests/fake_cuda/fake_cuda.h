// The test controls of the fake CUDA driver (fake_cuda.cpp).
#pragma once

#include <cstdint>

extern "C" {

// Settings "key=value,key=value" (the same as the ATTEND_FAKE_CUDA variable,
// read when the driver loads); keys not given keep their value:
//   init=CODE        what cuInit returns (100: CUDA_ERROR_NO_DEVICE)
//   devices=N        how many devices there are (1)
//   memory=BYTES     device memory (1 GiB); an allocation past it is OUT_OF_MEMORY
//   launch=unsupported  launches return CUDA_ERROR_NOT_SUPPORTED (the default:
//                    nothing here runs a kernel)
//   launch=noop      launches succeed and do nothing: device memory keeps what
//                    it held, so results copied back are whatever was there
//   fault=launch     the next launch faults: it returns success and leaves its
//                    context with CUDA_ERROR_ILLEGAL_ADDRESS, as a kernel that
//                    reads a bad address does on a GPU (the error is sticky)
//   fault=copy_to_host:N  the Nth device-to-host copy from now faults the same way
//   fault=none       no fault
//   ptxas=PATH       compile each module's PTX with this ptxas (sm_90) under the
//                    register limit it was loaded with: cuFuncGetAttribute then
//                    reports its registers and local bytes (else NOT_SUPPORTED),
//                    and attend_fake_cuda_modules what it needs with no limit
// Returns 0, or -1 for a setting it does not know (nothing is changed then).
int attend_fake_cuda_configure(const char *settings);

struct AttendFakeCudaStats {
    uint64_t work_calls;       // calls that do work in a context: allocations, copies, modules, launches
    uint64_t launches;         // kernel launches, faulting ones included
    uint64_t copies_to_host;   // device-to-host copies, faulting ones included
    uint64_t live_bytes;       // device memory allocated and not freed
    uint64_t peak_live_bytes;  // the most live_bytes has been
    uint64_t allocations;      // successful cuMemAlloc calls
};
void attend_fake_cuda_stats(AttendFakeCudaStats *stats);

// Every module loaded so far, in order: the JIT register limit it was given,
// and (with ptxas=PATH) the most registers one of its functions uses with no
// limit. Fills at most `capacity` and returns how many there are.
struct AttendFakeCudaModule {
    int max_registers;     // CU_JIT_MAX_REGISTERS (-1: not given)
    int registers_needed;  // -1: not known
};
int attend_fake_cuda_modules(AttendFakeCudaModule *modules, int capacity);
}

// libFuzzer harness for the .npy reader: any bytes as a file. Reading may only
// fail with npy::Error; an array it returns must be self-consistent (its data
// exactly numel() * itemsize() bytes, bools 0 or 1) and survive a write and a
// read back unchanged.
#include <sys/mman.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>

#include "npy.hpp"

namespace {

// An in-memory file with a path (memfd), so the reader runs as it does on disk.
std::string as_file(const uint8_t *data, size_t size) {
    static int fd = memfd_create("fuzz_npy", 0);
    if (fd < 0 || ftruncate(fd, 0) != 0 || pwrite(fd, data, size, 0) != ssize_t(size)) std::abort();
    return "/proc/self/fd/" + std::to_string(fd);
}

[[noreturn]] void finding(const char *what) {
    std::fprintf(stderr, "finding: %s\n", what);
    std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    using namespace attend::npy;
    Array array;
    try {
        array = read(as_file(data, size));
    } catch (const Error &) {
        return 0;
    }
    if (array.data.size() != size_t(array.numel()) * array.itemsize()) finding("data size differs from the shape");
    if (array.dtype == DType::Bool) {
        for (unsigned char c : array.data) {
            if (c > 1) finding("a bool that is not 0 or 1");
        }
    }
    const std::string path = "/tmp/fuzz_npy_roundtrip_" + std::to_string(getpid()) + ".npy";
    write(path, array);
    Array again = read(path);
    std::remove(path.c_str());
    if (again.dtype != array.dtype || again.shape != array.shape || again.data != array.data) {
        finding("write then read changed the array");
    }
    return 0;
}

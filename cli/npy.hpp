// Reading and writing NumPy .npy files (format versions 1.0, 2.0 and 3.0).
//
// Only the dtypes the attention CLI exchanges are supported: little-endian
// float32 ('<f4'), float16 ('<f2') and bool ('|b1'), in C order. Anything else
// is rejected with a message that says what was found and how to convert it,
// because these files usually come from a user's Python script.
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace attend::npy {

enum class DType { Float32, Float16, Bool };  // '<f4', '<f2', '|b1'

struct Array {
    DType dtype = DType::Float32;
    std::vector<int64_t> shape;        // {} for a scalar
    std::vector<unsigned char> data;   // C order, little-endian, numel() * itemsize() bytes

    // Product of the dimensions (1 for a scalar). Throws std::logic_error if a
    // dimension is negative or the product overflows int64.
    int64_t numel() const;
    size_t itemsize() const;

    // The data viewed as floats; throw std::logic_error unless dtype is Float32.
    const float* f32() const;
    float* f32();
};

class Error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

// Reads a whole .npy file. Every problem (I/O, malformed or unsupported
// content) is an npy::Error with a one-line message that starts with the path.
Array read(const std::string& path);

// Writes `a` to path + ".tmp.<pid>" and renames it over `path`, so readers
// never see a partial file. On failure the temp file is removed and an
// npy::Error is thrown.
void write(const std::string& path, const Array& a);

}  // namespace attend::npy

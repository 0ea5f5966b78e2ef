// .npy reader and writer; see npy.hpp. Format reference:
// https://numpy.org/doc/stable/reference/generated/numpy.lib.format.html
#include "npy.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <memory>
#include <new>
#include <optional>

#ifdef _WIN32
#include <process.h>
#define ATTEND_NPY_GETPID _getpid
#else
#include <unistd.h>
#define ATTEND_NPY_GETPID getpid
#endif

namespace attend::npy {
namespace {

constexpr char kMagic[] = "\x93NUMPY";
constexpr size_t kMagicLen = 6;
constexpr size_t kMaxHeaderLen = size_t(1) << 20;   // numpy's own limit is 10000
constexpr int64_t kMaxDataBytes = int64_t(1) << 40;
constexpr size_t kMaxDims = 64;                      // numpy's NPY_MAXDIMS
constexpr size_t kAlign = 64;                        // numpy's ARRAY_ALIGN
constexpr size_t kGrowthAxisMaxDigits = 21;          // numpy's spare room for shape[0]

// ---------------------------------------------------------------- helpers

size_t dtype_itemsize(DType dtype) {
    switch (dtype) {
    case DType::Float32: return 4;
    case DType::Float16: return 2;
    case DType::Bool: return 1;
    }
    throw std::logic_error("npy: invalid DType value");
}

const char* dtype_descr(DType dtype) {
    switch (dtype) {
    case DType::Float32: return "<f4";
    case DType::Float16: return "<f2";
    case DType::Bool: return "|b1";
    }
    throw std::logic_error("npy: invalid DType value");
}

std::optional<DType> dtype_from_descr(const std::string& descr) {
    for (DType d : {DType::Float32, DType::Float16, DType::Bool})
        if (descr == dtype_descr(d)) return d;
    return std::nullopt;
}

// Product of dims, or nullopt (with `why` set) for a negative dim or int64
// overflow. A zero dim makes the product 0 whatever the other dims are.
std::optional<int64_t> checked_product(const std::vector<int64_t>& dims, std::string& why) {
    int64_t product = 1;
    bool has_zero = false;
    for (int64_t d : dims) {
        if (d < 0) { why = "negative dimension " + std::to_string(d); return std::nullopt; }
        has_zero = has_zero || d == 0;
    }
    if (has_zero) return 0;
    for (int64_t d : dims) {
        if (product > std::numeric_limits<int64_t>::max() / d) {
            why = "element count overflows int64";
            return std::nullopt;
        }
        product *= d;
    }
    return product;
}

// numpy's repr of a shape tuple: "()", "(3,)", "(2, 3)".
std::string shape_repr(const std::vector<int64_t>& shape) {
    std::string s = "(";
    for (size_t i = 0; i < shape.size(); ++i) {
        if (i > 0) s += ", ";
        s += std::to_string(shape[i]);
    }
    if (shape.size() == 1) s += ",";
    return s + ")";
}

// Quotes untrusted header text for an error message: one line, bounded length.
std::string quote_untrusted(const std::string& text) {
    constexpr size_t kMaxShown = 40;
    std::string out = "'";
    for (size_t i = 0; i < text.size() && i < kMaxShown; ++i) {
        unsigned char c = static_cast<unsigned char>(text[i]);
        if (c >= 0x20 && c < 0x7f && c != '\\') {
            out += static_cast<char>(c);
        } else {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02x", c);
            out += buf;
        }
    }
    if (text.size() > kMaxShown) out += "...";
    return out + "'";
}

uint32_t load_le(const unsigned char* p, size_t nbytes) {
    uint32_t v = 0;
    for (size_t i = nbytes; i-- > 0;) v = (v << 8) | p[i];
    return v;
}

// ---------------------------------------------------------------- header lexer

enum class Tok { LBrace, RBrace, LParen, RParen, LBracket, RBracket, Colon, Comma, String, Word, End };

struct Token {
    Tok kind;
    std::string text;   // contents of a String (unquoted) or a Word
};

// Splits the header dict literal into tokens. Words are runs of identifier and
// number characters (True, 3, -1, 3.5, 7L); the parser decides what they mean.
class Lexer {
public:
    explicit Lexer(const std::string& text) : text_(text) {}

    Token next() {
        skip_whitespace();
        if (pos_ >= text_.size()) return {Tok::End, {}};
        char c = text_[pos_];
        if (auto punct = punctuation(c)) { ++pos_; return {*punct, std::string(1, c)}; }
        if (c == '\'' || c == '"') return string_literal(c);
        if (is_word_char(c)) return word();
        throw Error("header: unexpected character " + quote_untrusted(std::string(1, c)) +
                    " at offset " + std::to_string(pos_));
    }

private:
    static bool is_word_char(char c) {
        return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
               c == '_' || c == '.' || c == '+' || c == '-';
    }

    static bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\n'; }

    static std::optional<Tok> punctuation(char c) {
        switch (c) {
        case '{': return Tok::LBrace;
        case '}': return Tok::RBrace;
        case '(': return Tok::LParen;
        case ')': return Tok::RParen;
        case '[': return Tok::LBracket;
        case ']': return Tok::RBracket;
        case ':': return Tok::Colon;
        case ',': return Tok::Comma;
        default: return std::nullopt;
        }
    }

    void skip_whitespace() {
        while (pos_ < text_.size() && is_space(text_[pos_])) ++pos_;
    }

    // A backslash keeps the next character literally; that is all the escaping
    // a dtype descr can need.
    Token string_literal(char quote) {
        size_t start = pos_++;
        std::string value;
        while (pos_ < text_.size() && text_[pos_] != quote && text_[pos_] != '\n') {
            if (text_[pos_] == '\\' && pos_ + 1 < text_.size()) ++pos_;
            value += text_[pos_++];
        }
        if (pos_ >= text_.size() || text_[pos_] != quote)
            throw Error("header: unterminated string starting at offset " + std::to_string(start));
        ++pos_;
        return {Tok::String, value};
    }

    Token word() {
        size_t start = pos_;
        while (pos_ < text_.size() && is_word_char(text_[pos_])) ++pos_;
        return {Tok::Word, text_.substr(start, pos_ - start)};
    }

    const std::string& text_;
    size_t pos_ = 0;
};

// ---------------------------------------------------------------- header parser

struct Header {
    std::optional<DType> dtype;
    std::optional<bool> fortran_order;
    std::optional<std::vector<int64_t>> shape;
};

std::string descr_hint(const std::string& descr) {
    if (!descr.empty() && descr[0] == '>')
        return "; the data is big-endian: convert with arr.astype(arr.dtype.newbyteorder('<'))";
    if (descr.find('O') != std::string::npos)
        return "; object arrays hold Python objects, not numbers: convert to float32";
    if (descr == "<f8" || descr == "=f8")
        return "; this is float64: convert with arr.astype(np.float32)";
    return "";
}

DType parse_descr(Lexer& lexer) {
    Token t = lexer.next();
    if (t.kind == Tok::LBracket)
        throw Error("header: structured dtypes (descr is a list) are not supported");
    if (t.kind != Tok::String) throw Error("header: 'descr' must be a quoted string");
    if (auto dtype = dtype_from_descr(t.text)) return *dtype;
    throw Error("unsupported dtype descr " + quote_untrusted(t.text) +
                " (supported: '<f4' float32, '<f2' float16, '|b1' bool)" + descr_hint(t.text));
}

bool parse_fortran_order(Lexer& lexer) {
    Token t = lexer.next();
    if (t.kind == Tok::Word && t.text == "True") return true;
    if (t.kind == Tok::Word && t.text == "False") return false;
    throw Error("header: 'fortran_order' must be True or False");
}

// One shape entry: a non-negative decimal integer, optionally with Python 2's
// 'L' suffix for longs (old numpy wrote "(3L, 4L)").
int64_t parse_dim(std::string text) {
    if (!text.empty() && (text.back() == 'L' || text.back() == 'l')) text.pop_back();
    bool negative = !text.empty() && text[0] == '-';
    std::string digits = negative ? text.substr(1) : text;
    if (digits.empty() || digits.find_first_not_of("0123456789") != std::string::npos)
        throw Error("header: shape entry " + quote_untrusted(text) + " is not an integer");
    if (negative) throw Error("header: negative dimension " + text + " in shape");
    int64_t value = 0;
    for (char c : digits) {
        int digit = c - '0';
        if (value > (std::numeric_limits<int64_t>::max() - digit) / 10)
            throw Error("header: shape dimension " + quote_untrusted(text) + " overflows int64");
        value = value * 10 + digit;
    }
    return value;
}

std::vector<int64_t> parse_shape(Lexer& lexer) {
    if (lexer.next().kind != Tok::LParen)
        throw Error("header: 'shape' must be a tuple such as (2, 3)");
    std::vector<int64_t> dims;
    bool trailing_comma = false;
    Token t = lexer.next();
    while (t.kind != Tok::RParen) {
        if (t.kind != Tok::Word) throw Error("header: shape entries must be integers");
        if (dims.size() == kMaxDims)
            throw Error("header: shape has more than " + std::to_string(kMaxDims) + " dimensions");
        dims.push_back(parse_dim(t.text));
        t = lexer.next();
        trailing_comma = t.kind == Tok::Comma;
        if (trailing_comma) t = lexer.next();
        else if (t.kind != Tok::RParen) throw Error("header: expected ',' or ')' in shape");
    }
    // In Python "(3)" is just the integer 3; numpy writes a 1-D shape as "(3,)".
    if (dims.size() == 1 && !trailing_comma)
        throw Error("header: 'shape' (" + std::to_string(dims[0]) + ") is not a tuple; 1-D shapes are written (" +
                    std::to_string(dims[0]) + ",)");
    return dims;
}

template <class T, class ParseFn>
void parse_once(std::optional<T>& slot, const char* key, Lexer& lexer, ParseFn parse) {
    if (slot) throw Error(std::string("header: duplicate key '") + key + "'");
    slot = parse(lexer);
}

void parse_entry(const std::string& key, Lexer& lexer, Header& header) {
    if (key == "descr") parse_once(header.dtype, "descr", lexer, parse_descr);
    else if (key == "fortran_order") parse_once(header.fortran_order, "fortran_order", lexer, parse_fortran_order);
    else if (key == "shape") parse_once(header.shape, "shape", lexer, parse_shape);
    else throw Error("header: unexpected key " + quote_untrusted(key) + " (expected 'descr', 'fortran_order', 'shape')");
}

void require_keys(const Header& header) {
    const char* missing = !header.dtype ? "descr" : !header.fortran_order ? "fortran_order" : !header.shape ? "shape" : nullptr;
    if (missing) throw Error(std::string("header is missing key '") + missing + "'");
    if (*header.fortran_order)
        throw Error("fortran_order=True is unsupported; save np.ascontiguousarray(arr) instead");
}

// Parses "{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }".
Header parse_header(const std::string& text) {
    Lexer lexer(text);
    if (lexer.next().kind != Tok::LBrace)
        throw Error("header is not a Python dict literal (it must start with '{')");
    Header header;
    Token t = lexer.next();
    while (t.kind != Tok::RBrace) {
        if (t.kind != Tok::String) throw Error("header: expected a quoted key or '}'");
        const std::string key = t.text;
        if (lexer.next().kind != Tok::Colon) throw Error("header: expected ':' after key " + quote_untrusted(key));
        parse_entry(key, lexer, header);
        t = lexer.next();
        if (t.kind == Tok::Comma) t = lexer.next();
        else if (t.kind != Tok::RBrace) throw Error("header: expected ',' or '}' after the value of " + quote_untrusted(key));
    }
    if (lexer.next().kind != Tok::End) throw Error("header: unexpected text after the closing '}'");
    require_keys(header);
    return header;
}

// ---------------------------------------------------------------- reading

// Byte count of the data a header describes, within kMaxDataBytes.
int64_t data_bytes(const Header& header) {
    std::string why;
    auto numel = checked_product(*header.shape, why);
    const int64_t item = static_cast<int64_t>(dtype_itemsize(*header.dtype));
    if (!numel || *numel > kMaxDataBytes / item)
        throw Error("shape " + shape_repr(*header.shape) + " is too large: " +
                    (numel ? "data exceeds the 2^40-byte limit" : why));
    return *numel * item;
}

struct Preamble {
    size_t header_offset;   // where the header text starts
    size_t header_len;
};

// Checks magic and version and reads the header length, given the first
// bytes of a file of `file_size` bytes.
Preamble parse_preamble(const unsigned char* bytes, size_t available, uint64_t file_size) {
    if (file_size == 0) throw Error("file is empty, not a .npy array");
    if (std::memcmp(bytes, kMagic, std::min(available, kMagicLen)) != 0)
        throw Error("not a .npy file (bad magic bytes; expected \\x93NUMPY)");
    if (available < kMagicLen + 2)
        throw Error("truncated header: file ends inside the preamble after " + std::to_string(available) + " bytes");
    const int major = bytes[6], minor = bytes[7];
    if (major < 1 || major > 3 || minor != 0)
        throw Error("unsupported .npy format version " + std::to_string(major) + "." + std::to_string(minor) +
                    " (supported: 1.0, 2.0, 3.0)");
    const size_t len_size = major == 1 ? 2 : 4;
    const size_t header_offset = kMagicLen + 2 + len_size;
    if (available < header_offset)
        throw Error("truncated header: file ends inside the preamble after " + std::to_string(available) + " bytes");
    const size_t header_len = load_le(bytes + kMagicLen + 2, len_size);
    if (header_len > kMaxHeaderLen)
        throw Error("header length " + std::to_string(header_len) + " exceeds the 1 MiB limit");
    if (header_offset + header_len > file_size)
        throw Error("header length " + std::to_string(header_len) + " runs past end of file (file has " +
                    std::to_string(file_size) + " bytes)");
    return {header_offset, header_len};
}

void check_data_length(uint64_t available, int64_t expected) {
    if (available == static_cast<uint64_t>(expected)) return;
    const char* what = available < static_cast<uint64_t>(expected) ? "truncated data" : "trailing data after the array";
    throw Error(std::string(what) + ": file has " + std::to_string(available) + " bytes of data, header promises " +
                std::to_string(expected));
}

void check_bool_bytes(const std::vector<unsigned char>& data) {
    for (size_t i = 0; i < data.size(); ++i)
        if (data[i] > 1)
            throw Error("bool element " + std::to_string(i) + " has byte value " + std::to_string(data[i]) +
                        " (must be 0 or 1)");
}

void read_exactly(std::ifstream& in, unsigned char* dst, size_t n) {
    // Size was checked up front, so a short read means the file changed or an I/O error.
    if (n > 0 && !in.read(reinterpret_cast<char*>(dst), static_cast<std::streamsize>(n)))
        throw Error("read failed (file shrank while reading or I/O error)");
}

std::ifstream open_for_reading(const std::string& path, uint64_t& size) {
    std::error_code ec;
    auto status = std::filesystem::status(path, ec);
    if (ec || !std::filesystem::exists(status))
        throw Error("cannot open: " + (ec ? ec.message() : std::string("no such file")));
    if (!std::filesystem::is_regular_file(status)) throw Error("not a regular file");
    std::ifstream in(path, std::ios::binary);
    if (!in) throw Error(std::string("cannot open: ") + std::strerror(errno));
    in.seekg(0, std::ios::end);
    const std::streamoff end = in.tellg();
    if (end < 0) throw Error("cannot determine file size");
    in.seekg(0, std::ios::beg);
    size = static_cast<uint64_t>(end);
    return in;
}

Array read_unlabelled(const std::string& path) {
    uint64_t file_size = 0;
    std::ifstream in = open_for_reading(path, file_size);

    unsigned char prefix[12] = {};
    const size_t available = static_cast<size_t>(std::min<uint64_t>(file_size, sizeof prefix));
    read_exactly(in, prefix, available);
    const Preamble pre = parse_preamble(prefix, available, file_size);

    std::string header_text(pre.header_len, '\0');
    in.seekg(static_cast<std::streamoff>(pre.header_offset));
    read_exactly(in, reinterpret_cast<unsigned char*>(header_text.data()), pre.header_len);
    const Header header = parse_header(header_text);

    const int64_t nbytes = data_bytes(header);
    check_data_length(file_size - pre.header_offset - pre.header_len, nbytes);

    Array array;
    array.dtype = *header.dtype;
    array.shape = *header.shape;
    array.data.resize(static_cast<size_t>(nbytes));
    read_exactly(in, array.data.data(), array.data.size());
    if (array.dtype == DType::Bool) check_bool_bytes(array.data);
    return array;
}

// ---------------------------------------------------------------- writing

// The header dict and its spare room exactly as numpy >= 1.23 writes them,
// so our files are byte-identical to np.save's.
std::string header_dict(const Array& a) {
    std::string dict = std::string("{'descr': '") + dtype_descr(a.dtype) +
                       "', 'fortran_order': False, 'shape': " + shape_repr(a.shape) + ", }";
    // Room to grow shape[0] in place, as numpy leaves.
    if (!a.shape.empty()) {
        const size_t digits = std::to_string(a.shape[0]).size();
        if (digits < kGrowthAxisMaxDigits) dict.append(kGrowthAxisMaxDigits - digits, ' ');
    }
    return dict;
}

std::string preamble_and_header(const Array& a) {
    const std::string dict = header_dict(a);
    const size_t text_len = dict.size() + 1;   // + final '\n'
    for (int major : {1, 2}) {
        const size_t prefix_len = kMagicLen + 2 + (major == 1 ? 2 : 4);
        const size_t pad = kAlign - (prefix_len + text_len) % kAlign;
        const size_t header_len = text_len + pad;
        if (major == 1 && header_len > 0xffff) continue;
        std::string out(kMagic, kMagicLen);
        out += static_cast<char>(major);
        out += '\0';
        for (size_t i = 0; i < prefix_len - kMagicLen - 2; ++i)
            out += static_cast<char>((header_len >> (8 * i)) & 0xff);
        return out + dict + std::string(pad, ' ') + "\n";
    }
    throw Error("header too long");   // unreachable: at most 64 dims of <= 20 digits
}

void validate_for_writing(const Array& a) {
    if (a.shape.size() > kMaxDims)
        throw Error("array has " + std::to_string(a.shape.size()) + " dimensions; .npy allows " +
                    std::to_string(kMaxDims));
    std::string why;
    auto numel = checked_product(a.shape, why);
    if (!numel) throw Error("invalid shape " + shape_repr(a.shape) + ": " + why);
    const uint64_t expected = static_cast<uint64_t>(*numel) * dtype_itemsize(a.dtype);
    if (expected / dtype_itemsize(a.dtype) != static_cast<uint64_t>(*numel) || a.data.size() != expected)
        throw Error("data has " + std::to_string(a.data.size()) + " bytes but shape " + shape_repr(a.shape) +
                    " of " + dtype_descr(a.dtype) + " needs " + std::to_string(*numel) + " elements of " +
                    std::to_string(dtype_itemsize(a.dtype)) + " bytes");
    if (a.dtype == DType::Bool) check_bool_bytes(a.data);
}

// Removes the temp file unless the rename into place happened.
struct TempFileGuard {
    std::string path;
    bool committed = false;
    ~TempFileGuard() {
        if (committed) return;
        std::error_code ignored;
        std::filesystem::remove(path, ignored);
    }
};

struct FileCloser {
    void operator()(std::FILE* f) const { std::fclose(f); }
};

void write_all(std::FILE* f, const void* bytes, size_t n, const std::string& tmp_path) {
    if (n > 0 && std::fwrite(bytes, 1, n, f) != n)
        throw Error("write to " + tmp_path + " failed: " + std::strerror(errno));
}

// Flushes to the OS and, where possible, to disk, so the rename never exposes
// an empty file after a crash.
void flush_and_close(std::unique_ptr<std::FILE, FileCloser> file, const std::string& tmp_path) {
    if (std::fflush(file.get()) != 0) throw Error("write to " + tmp_path + " failed: " + std::strerror(errno));
#ifndef _WIN32
    if (fsync(fileno(file.get())) != 0) throw Error("fsync of " + tmp_path + " failed: " + std::strerror(errno));
#endif
    if (std::fclose(file.release()) != 0) throw Error("closing " + tmp_path + " failed: " + std::strerror(errno));
}

void write_unlabelled(const std::string& path, const Array& a) {
    validate_for_writing(a);
    const std::string head = preamble_and_header(a);
    TempFileGuard temp{path + ".tmp." + std::to_string(ATTEND_NPY_GETPID())};

    std::unique_ptr<std::FILE, FileCloser> file(std::fopen(temp.path.c_str(), "wb"));
    if (!file) throw Error("cannot create " + temp.path + ": " + std::strerror(errno));
    write_all(file.get(), head.data(), head.size(), temp.path);
    write_all(file.get(), a.data.data(), a.data.size(), temp.path);
    flush_and_close(std::move(file), temp.path);

    std::error_code ec;
    std::filesystem::rename(temp.path, path, ec);
    if (ec) throw Error("cannot rename " + temp.path + " into place: " + ec.message());
    temp.committed = true;
}

}  // namespace

// ---------------------------------------------------------------- public API

int64_t Array::numel() const {
    std::string why;
    auto n = checked_product(shape, why);
    if (!n) throw std::logic_error("npy::Array::numel: " + why);
    return *n;
}

size_t Array::itemsize() const { return dtype_itemsize(dtype); }

// vector storage comes from operator new, so it is suitably aligned for float.
const float* Array::f32() const {
    if (dtype != DType::Float32) throw std::logic_error("npy::Array::f32: array dtype is not float32");
    return reinterpret_cast<const float*>(data.data());
}

float* Array::f32() {
    if (dtype != DType::Float32) throw std::logic_error("npy::Array::f32: array dtype is not float32");
    return reinterpret_cast<float*>(data.data());
}

Array read(const std::string& path) {
    try {
        return read_unlabelled(path);
    } catch (const Error& e) {
        throw Error(path + ": " + e.what());
    } catch (const std::bad_alloc&) {
        throw Error(path + ": out of memory reading the array");
    }
}

void write(const std::string& path, const Array& a) {
    try {
        write_unlabelled(path, a);
    } catch (const Error& e) {
        throw Error("cannot write " + path + ": " + e.what());
    } catch (const std::bad_alloc&) {
        throw Error("cannot write " + path + ": out of memory");
    }
}

}  // namespace attend::npy

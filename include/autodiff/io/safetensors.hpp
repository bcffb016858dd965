#pragma once
// Parameter files in the safetensors format (https://github.com/huggingface/safetensors), readable and
// writable by the Python `safetensors` package and so by torch:
//
//   8 bytes      N, the header's length, unsigned little-endian
//   N bytes      a JSON object: {"__metadata__": {"key": "value", ...},            (optional)
//                               "<name>": {"dtype": "F32" | "F64", "shape": [d0, ...],
//                                          "data_offsets": [begin, end]}, ...}
//                padded with spaces to a multiple of 8
//   the data     each tensor's row-major little-endian elements at [begin, end) of this part; the
//                tensors cover it exactly, without gaps or overlaps
//
// Only float32 and float64 tensors of rank 0..4 (this library's Tensor) are read and written. The reader
// trusts nothing in the file: a truncated file, a malformed header, an unknown dtype, a shape that does
// not fit its byte range, overlapping or missing data, a duplicated name all throw Error naming the
// operation ("load_safetensors"), the file and the tensor.

#include <map>
#include <string>
#include <variant>
#include <vector>

#include "autodiff/tensor.hpp"

namespace autodiff {

// One named tensor of a parameter file, float32 or float64.
struct NamedTensor {
    std::string name;
    std::variant<Tensor<float>, Tensor<double>> value;

    [[nodiscard]] const Shape& shape() const;
    [[nodiscard]] const char* dtype() const;  // "F32" or "F64", safetensors' names
};

struct SafetensorsFile {
    std::vector<NamedTensor> tensors;  // in the order of their data in the file
    std::map<std::string, std::string> metadata;

    // The tensor called `name`, or nullptr.
    [[nodiscard]] const NamedTensor* find(const std::string& name) const;
};

// Writes `tensors` (distinct, non-empty names; defined tensors) and `metadata` to `path`, replacing it.
void save_safetensors(const std::string& path, const std::vector<NamedTensor>& tensors,
                      const std::map<std::string, std::string>& metadata = {});

// Reads a whole file, validating everything in it (see above).
SafetensorsFile load_safetensors(const std::string& path);

}  // namespace autodiff

// Helpers of the ops' argument checks (CPU and CUDA).
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

namespace deqfuse {

// "[2, 7]". Numbers in messages are formatted by hand (std::to_string): streaming integers or
// IntArrayRef into TORCH_CHECK segfaulted under torch 2.11+cu130 on the GPU machine (strings did not;
// likely a libstdc++ locale/ABI mismatch), while it works under the CPU torch 2.13.
inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Contiguous versions of a list of tensors (the ops read raw pointers).
inline std::vector<at::Tensor> contiguous_all(const std::vector<at::Tensor>& ts) {
  std::vector<at::Tensor> out;
  out.reserve(ts.size());
  for (const auto& t : ts) out.push_back(t.contiguous());
  return out;
}

}  // namespace deqfuse

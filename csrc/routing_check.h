// Argument checks of the routing ops (group_by_choice, gather_rows_multi, scatter_rows), CPU and CUDA.
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "check_util.h"

namespace deqfuse {

inline void check_choice(const at::Tensor& choice, int64_t num_groups) {
  TORCH_CHECK(choice.dim() == 1, "group_by_choice: choice must be [B], got ", shape_str(choice.sizes()));
  TORCH_CHECK(!at::isFloatingType(choice.scalar_type()) && choice.scalar_type() != at::kBool,
              "group_by_choice: choice must be an integer tensor, got ", c10::toString(choice.scalar_type()));
  TORCH_CHECK(num_groups >= 1, "group_by_choice: num_groups must be >= 1, got ", std::to_string(num_groups));
}

inline void check_index(const at::Tensor& idx, const at::Device& dev, const char* op) {
  TORCH_CHECK(idx.dim() == 1 && idx.scalar_type() == at::kLong, op, ": idx must be a 1-D int64 tensor, got ",
              c10::toString(idx.scalar_type()), " ", shape_str(idx.sizes()));
  TORCH_CHECK(idx.device() == dev, op, ": idx is on ", idx.device().str(), ", the rows are on ", dev.str());
}

inline void check_rows_args(const std::vector<at::Tensor>& srcs, const at::Tensor& idx, const char* op) {
  for (size_t k = 0; k < srcs.size(); ++k) {
    const auto& s = srcs[k];
    TORCH_CHECK(s.dim() == 2, op, ": srcs[", std::to_string(k), "] must be [B, D], got ", shape_str(s.sizes()));
    TORCH_CHECK(s.size(0) == srcs[0].size(0), op, ": every source needs the same rows; srcs[", std::to_string(k),
                "] has ", std::to_string(s.size(0)), ", srcs[0] ", std::to_string(srcs[0].size(0)));
    TORCH_CHECK(s.device() == srcs[0].device(), op, ": srcs[", std::to_string(k), "] is on ", s.device().str());
  }
  if (!srcs.empty()) check_index(idx, srcs[0].device(), op);
}

inline void check_scatter_args(const at::Tensor& src, const at::Tensor& idx, const at::Tensor& out) {
  TORCH_CHECK(src.dim() == 2 && out.dim() == 2 && src.size(1) == out.size(1),
              "scatter_rows: src [R, D] and out [B, D] must share D, got ", shape_str(src.sizes()), " and ",
              shape_str(out.sizes()));
  TORCH_CHECK(src.scalar_type() == out.scalar_type(), "scatter_rows: src and out dtypes differ: ",
              c10::toString(src.scalar_type()), " vs ", c10::toString(out.scalar_type()));
  TORCH_CHECK(src.device() == out.device(), "scatter_rows: src is on ", src.device().str(), ", out on ", out.device().str());
  TORCH_CHECK(out.is_contiguous(), "scatter_rows: out must be contiguous (written in place)");
  check_index(idx, out.device(), "scatter_rows");
  TORCH_CHECK(idx.numel() == src.size(0), "scatter_rows: idx must have one entry per src row (",
              std::to_string(src.size(0)), "), got ", std::to_string(idx.numel()));
}

}  // namespace deqfuse

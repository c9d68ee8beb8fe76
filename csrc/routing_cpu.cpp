// Routing ops for dynamic fusion: schemas and the C++ CPU versions (CUDA: cuda/routing_cuda.cu).
// Contracts: deqfuse/reference/routing.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "routing_check.h"

namespace deqfuse {

// Stable counting sort of the batch by chosen group: (order [B] int64, counts [E] int32). Entries
// outside [0, E) are left out: counts then sum to less than B and order past that sum is unspecified
// (the Python caller raises).
std::tuple<at::Tensor, at::Tensor> group_by_choice_cpu(at::Tensor choice, int64_t num_groups) {
  check_choice(choice, num_groups);
  const auto c = choice.to(at::kLong).contiguous();
  const int64_t B = c.numel();
  const int64_t* cp = c.data_ptr<int64_t>();
  auto counts = at::zeros({num_groups}, choice.options().dtype(at::kInt));
  auto order = at::empty({B}, choice.options().dtype(at::kLong));
  int32_t* cnt = counts.data_ptr<int32_t>();
  for (int64_t i = 0; i < B; ++i)
    if (cp[i] >= 0 && cp[i] < num_groups) ++cnt[cp[i]];
  std::vector<int64_t> next(num_groups, 0);
  for (int64_t e = 1; e < num_groups; ++e) next[e] = next[e - 1] + cnt[e - 1];
  int64_t* op = order.data_ptr<int64_t>();
  for (int64_t i = 0; i < B; ++i)
    if (cp[i] >= 0 && cp[i] < num_groups) op[next[cp[i]]++] = i;
  return {order, counts};
}

std::vector<at::Tensor> gather_rows_multi_cpu(std::vector<at::Tensor> srcs, at::Tensor idx) {
  check_rows_args(srcs, idx, "gather_rows_multi");
  std::vector<at::Tensor> out;
  for (const auto& s : srcs) out.push_back(s.index_select(0, idx));
  return out;
}

void scatter_rows_cpu(at::Tensor src, at::Tensor idx, at::Tensor out) {
  check_scatter_args(src, idx, out);
  out.index_copy_(0, idx, src);
}

}  // namespace deqfuse

TORCH_LIBRARY_FRAGMENT(deqfuse, m) {
  m.def("group_by_choice(Tensor choice, int num_groups) -> (Tensor, Tensor)");
  m.def("gather_rows_multi(Tensor[] srcs, Tensor idx) -> Tensor[]");
  m.def("scatter_rows(Tensor src, Tensor idx, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(deqfuse, CPU, m) {
  m.impl("group_by_choice", &deqfuse::group_by_choice_cpu);
  m.impl("gather_rows_multi", &deqfuse::gather_rows_multi_cpu);
  m.impl("scatter_rows", &deqfuse::scatter_rows_cpu);
}

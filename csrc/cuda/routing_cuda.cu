// Launchers of the routing ops (kernels: routing_kernel.cuh; schemas and CPU versions: routing_cpu.cpp).
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <vector>

#include "../routing_check.h"
#include "routing_kernel.cuh"

namespace deqfuse {
namespace {

int widest_word(const void* a, const void* b, int64_t row_bytes) {
  const auto pa = reinterpret_cast<uintptr_t>(a), pb = reinterpret_cast<uintptr_t>(b);
  for (int w : {16, 8, 4, 2})
    if (row_bytes % w == 0 && pa % w == 0 && pb % w == 0) return w;
  return 1;
}

// srcs[k] -> dsts[k] row moves, kMaxRowSources tensors per launch.
template <bool GATHER>
void move_rows(const std::vector<at::Tensor>& srcs, const std::vector<at::Tensor>& dsts, const at::Tensor& idx,
               int64_t bound) {
  const int64_t R = idx.numel();
  if (R == 0) return;
  auto stream = c10::cuda::getCurrentCUDAStream();
  for (size_t k0 = 0; k0 < srcs.size(); k0 += kMaxRowSources) {
    RowMoves a{};
    a.n = (int)std::min<size_t>(kMaxRowSources, srcs.size() - k0);
    for (int k = 0; k < a.n; ++k) {
      const at::Tensor& s = srcs[k0 + k];
      const at::Tensor& d = dsts[k0 + k];
      a.src[k] = static_cast<const char*>(s.data_ptr());
      a.dst[k] = static_cast<char*>(d.data_ptr());
      a.row_bytes[k] = s.size(1) * (int64_t)s.element_size();
      a.word[k] = widest_word(a.src[k], a.dst[k], a.row_bytes[k]);
    }
    move_rows_kernel<GATHER><<<(unsigned)R, 128, 0, stream>>>(a, idx.data_ptr<int64_t>(), bound);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> group_by_choice_cuda(at::Tensor choice, int64_t num_groups) {
  check_choice(choice, num_groups);
  TORCH_CHECK(num_groups <= kMaxExperts, "group_by_choice (CUDA): num_groups must be <= ",
              std::to_string(kMaxExperts), ", got ", std::to_string(num_groups));
  const c10::cuda::CUDAGuard guard(choice.device());
  choice = choice.contiguous();
  const int64_t B = choice.numel();
  auto order = at::empty({B}, choice.options().dtype(at::kLong));
  auto counts = at::empty({num_groups}, choice.options().dtype(at::kInt));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INTEGRAL_TYPES(choice.scalar_type(), "group_by_choice", [&] {
    group_by_choice_kernel<scalar_t><<<1, kRouteThreads, 0, stream>>>(
        choice.data_ptr<scalar_t>(), B, (int)num_groups, order.data_ptr<int64_t>(), counts.data_ptr<int32_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {order, counts};
}

std::vector<at::Tensor> gather_rows_multi_cuda(std::vector<at::Tensor> srcs, at::Tensor idx) {
  check_rows_args(srcs, idx, "gather_rows_multi");
  const c10::cuda::CUDAGuard guard(idx.device());
  for (auto& s : srcs) s = s.contiguous();
  idx = idx.contiguous();
  std::vector<at::Tensor> dsts;
  for (const auto& s : srcs) dsts.push_back(at::empty({idx.numel(), s.size(1)}, s.options()));
  if (!srcs.empty()) move_rows<true>(srcs, dsts, idx, srcs[0].size(0));
  return dsts;
}

void scatter_rows_cuda(at::Tensor src, at::Tensor idx, at::Tensor out) {
  check_scatter_args(src, idx, out);
  const c10::cuda::CUDAGuard guard(idx.device());
  move_rows<false>({src.contiguous()}, {out}, idx.contiguous(), out.size(0));
}

}  // namespace deqfuse

TORCH_LIBRARY_IMPL(deqfuse, CUDA, m) {
  m.impl("group_by_choice", &deqfuse::group_by_choice_cuda);
  m.impl("gather_rows_multi", &deqfuse::gather_rows_multi_cuda);
  m.impl("scatter_rows", &deqfuse::scatter_rows_cuda);
}

// Fused modality epilogue of the fusion cell (contract: deqfuse/reference/epilogue.py):
//   a = a2 + b2_i + x_i ; u = GN2_i(a) + z_i ; out = GN3_i(ReLU(u))
// one warp per (modality i, sample b, group g) (kernel: epilogue_kernel.cuh); D / groups <= 1024.
// Inputs: a2 [N, B, D] (the W2 GEMM output), x [B, N, D], z [B, N+1, D]; outputs out [B, N, D], u [N, B, D].
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "../check_util.h"
#include "epilogue_kernel.cuh"

namespace deqfuse {
namespace {

// Picks the (vector width, chunks per lane) instance for the group width D / groups.
template <typename T>
void launch_epilogue(const at::Tensor& a2, const at::Tensor& x, const at::Tensor& z, const at::Tensor& b2,
                     const at::Tensor& w2, const at::Tensor& bb2, const at::Tensor& w3, const at::Tensor& bb3,
                     at::Tensor& out, at::Tensor& u, int64_t groups) {
  const int64_t N = a2.size(0), B = a2.size(1), D = a2.size(2), DG = D / groups;
  const unsigned blocks = (unsigned)((N * B * groups + kEpiWarps - 1) / kEpiWarps);
  auto stream = c10::cuda::getCurrentCUDAStream();
#define DF_EPI(V, CPL)                                                                                            \
  modality_epilogue_kernel<T, V, CPL><<<blocks, kEpiWarps * 32, 0, stream>>>(                                     \
      a2.data_ptr<T>(), x.data_ptr<T>(), z.data_ptr<T>(), b2.data_ptr<float>(), w2.data_ptr<float>(),             \
      bb2.data_ptr<float>(), w3.data_ptr<float>(), bb3.data_ptr<float>(), out.data_ptr<T>(), u.data_ptr<T>(),      \
      (int)B, (int)N, (int)D, (int)groups, 1e-5f)
  if (DG % 4 == 0) {  // 16-byte chunks (fp32): every group starts 4-channel aligned
    if (DG <= 128) DF_EPI(4, 1);
    else if (DG <= 256) DF_EPI(4, 2);
    else if (DG <= 512) DF_EPI(4, 4);
    else DF_EPI(4, 8);
  } else if (DG <= 256) {
    DF_EPI(1, 8);
  } else {
    DF_EPI(1, 32);
  }
#undef DF_EPI
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> modality_epilogue_cuda(at::Tensor a2, at::Tensor x, at::Tensor z, at::Tensor b2,
                                                          at::Tensor gn2_w, at::Tensor gn2_b, at::Tensor gn3_w,
                                                          at::Tensor gn3_b, int64_t groups) {
  TORCH_CHECK(a2.is_cuda(), "modality_epilogue: a2 must be a CUDA tensor");
  TORCH_CHECK(a2.dim() == 3, "modality_epilogue: a2 must be [N, B, D], got ", shape_str(a2.sizes()));
  const int64_t N = a2.size(0), B = a2.size(1), D = a2.size(2);
  TORCH_CHECK(x.sizes() == at::IntArrayRef({B, N, D}), "modality_epilogue: x must be [B, N, D] = ", shape_str({B, N, D}), ", got ", shape_str(x.sizes()));
  TORCH_CHECK(z.sizes() == at::IntArrayRef({B, N + 1, D}), "modality_epilogue: z must be [B, N+1, D], got ", shape_str(z.sizes()));
  TORCH_CHECK(groups > 0 && D % groups == 0, "modality_epilogue: groups (", std::to_string(groups), ") must divide D (", std::to_string(D), ")");
  TORCH_CHECK(D / groups <= kEpiMaxGroupWidth, "modality_epilogue: D / groups must be <= ", std::to_string(kEpiMaxGroupWidth), ", got ", std::to_string(D / groups));
  for (auto* p : {&b2, &gn2_w, &gn2_b, &gn3_w, &gn3_b}) {
    TORCH_CHECK(p->sizes() == at::IntArrayRef({N, D}), "modality_epilogue: bias/GroupNorm params must be [N, D], got ", shape_str(p->sizes()));
    TORCH_CHECK(p->scalar_type() == at::kFloat && p->device() == a2.device(), "modality_epilogue: params must be fp32 on a2's device");
  }
  TORCH_CHECK(x.scalar_type() == a2.scalar_type() && z.scalar_type() == a2.scalar_type(), "modality_epilogue: a2, x, z must share a dtype");
  TORCH_CHECK(a2.scalar_type() != at::kDouble, "modality_epilogue: a2 must be fp32, fp16 or bf16 on CUDA, got fp64");
  const c10::cuda::CUDAGuard guard(a2.device());
  a2 = a2.contiguous(); x = x.contiguous(); z = z.contiguous();
  auto out = at::empty({B, N, D}, a2.options());
  auto u = at::empty({N, B, D}, a2.options());
  if (B == 0) return {out, u};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a2.scalar_type(), "modality_epilogue", [&] {
    launch_epilogue<scalar_t>(a2, x, z, b2.contiguous(), gn2_w.contiguous(), gn2_b.contiguous(), gn3_w.contiguous(),
                              gn3_b.contiguous(), out, u, groups);
  });
  return {out, u};
}

}  // namespace deqfuse

TORCH_LIBRARY_IMPL(deqfuse, CUDA, m) { m.impl("modality_epilogue", &deqfuse::modality_epilogue_cuda); }

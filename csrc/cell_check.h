// Argument checks of the C++ CPU cell ops (cell_cpu.cpp) and of the whole-solve ops (solve_cpu.cpp).
#pragma once
#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "check_util.h"

namespace deqfuse {

constexpr int kNumParams = 16;  // CellParams (deqfuse/reference/cell.py), in its order
constexpr int kNumSaved = 13;   // what cell_forward(save=True) returns (SAVED_NAMES in deqfuse/ops.py)

// z: the state (or gbar for the VJP, named by zname); x / xf undefined for the VJP. Messages are built
// only on failure (TORCH_CHECK evaluates them lazily): the checks cost ~nothing per solver iteration.
inline void check_cell_args(const at::Tensor& z, const at::Tensor& x, const at::Tensor& xf,
                            const std::vector<at::Tensor>& p, int64_t groups, const char* op, const char* zname) {
  TORCH_CHECK(z.dim() == 3, op, ": ", zname, " must be [B, N+1, D], got ", shape_str(z.sizes()));
  const int64_t B = z.size(0), N = z.size(1) - 1, D = z.size(2);
  TORCH_CHECK(N >= 1, op, ": ", zname, " must hold N >= 1 modality states and the fused state, got ",
              shape_str(z.sizes()));
  TORCH_CHECK(B < (int64_t(1) << 31) && D < (int64_t(1) << 31), op, ": ", zname, " too large for the BLAS ints");
  TORCH_CHECK(z.scalar_type() == at::kFloat || z.scalar_type() == at::kDouble, op, ": ", zname,
              " must be float32 or float64, got ", c10::toString(z.scalar_type()));
  TORCH_CHECK(z.device().is_cpu(), op, ": ", zname, " must be a CPU tensor (this is the C++ CPU op)");
  TORCH_CHECK(groups >= 1 && D % groups == 0, op, ": groups (", std::to_string(groups), ") must divide D (",
              std::to_string(D), ")");
  auto like = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name, int idx) {
    const std::string nm = idx < 0 ? std::string(name) : "params[" + std::to_string(idx) + "] (" + name + ")";
    TORCH_CHECK(t.sizes() == shape, op, ": ", idx < 0 ? name : nm.c_str(), " must have shape ", shape_str(shape),
                ", got ", shape_str(t.sizes()));
    TORCH_CHECK(t.scalar_type() == z.scalar_type(), op, ": ", nm, " must have ", zname, "'s dtype ",
                c10::toString(z.scalar_type()), ", got ", c10::toString(t.scalar_type()));
    TORCH_CHECK(t.device().is_cpu(), op, ": ", nm, " must be a CPU tensor");
  };
  auto check = [&](const at::Tensor& t, at::IntArrayRef shape, const char* name, int idx) {
    if (t.sizes() != shape || t.scalar_type() != z.scalar_type() || !t.device().is_cpu()) like(t, shape, name, idx);
  };
  if (x.defined()) check(x, {B, N, D}, "x", -1);
  if (xf.defined()) check(xf, {B, D}, "xf", -1);
  TORCH_CHECK((int64_t)p.size() == kNumParams, op, ": params must hold the 16 CellParams tensors, got ",
              std::to_string(p.size()));
  static const char* names[kNumParams] = {"w1", "b1", "w2", "b2", "gn1_w", "gn1_b", "gn2_w", "gn2_b",
                                          "gn3_w", "gn3_b", "wg", "bg", "wf", "bf", "gnf_w", "gnf_b"};
  for (int i = 0; i < kNumParams; ++i) {
    if (i == 0 || i == 2) check(p[i], {N, D, D}, names[i], i);
    else if (i < 10) check(p[i], {N, D}, names[i], i);
    else if (i == 10 || i == 12) check(p[i], {D, D}, names[i], i);
    else check(p[i], {D}, names[i], i);
  }
}

// gbar [B, N+1, D] and the 13 tensors a cell_forward(save=True) of the same batch returned.
// gname: how the op names its gbar argument in messages.
inline void check_saved(const at::Tensor& gbar, const std::vector<at::Tensor>& saved, const std::vector<at::Tensor>& params,
                 int64_t groups, const char* op, const char* gname = "gbar") {
  check_cell_args(gbar, at::Tensor(), at::Tensor(), params, groups, op, gname);
  const int64_t B = gbar.size(0), N = gbar.size(1) - 1, D = gbar.size(2), G = groups;
  TORCH_CHECK((int64_t)saved.size() == kNumSaved, op, ": saved must hold the 13 tensors cell_forward(save=True) "
              "returns, got ", std::to_string(saved.size()));
  for (int i = 0; i < kNumSaved; ++i) {
    const int64_t last = (i == 1 || i == 4 || i == 7 || i == 12) ? G : D;
    const bool ok = i < 8 ? saved[i].sizes() == at::IntArrayRef({N, B, last}) : saved[i].sizes() == at::IntArrayRef({B, last});
    if (!ok) {
      const std::vector<int64_t> want = i < 8 ? std::vector<int64_t>{N, B, last} : std::vector<int64_t>{B, last};
      TORCH_CHECK(false, op, ": saved[", std::to_string(i), "] must have shape ", shape_str(want),
                  " (from a forward of the same batch), got ", shape_str(saved[i].sizes()));
    }
    TORCH_CHECK(saved[i].scalar_type() == gbar.scalar_type() && saved[i].device().is_cpu(), op, ": saved[",
                std::to_string(i), "] must be a CPU tensor of ", gname, "'s dtype");
  }
}

}  // namespace deqfuse

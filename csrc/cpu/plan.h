// The C++ CPU kernel plan and the types every CPU translation unit shares. External linkage: this header is
// compiled at the build's baseline instruction set in every file, the instruction-set files (rows_*.cpp)
// included, which include it before they switch their target.
#pragma once
#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

namespace deqfuse {

// The GEMM kernel of the cell's D x D float GEMMs (gemm_small.h). Names: kGemmNames, in this order.
enum class SmallGemm { kBlas, kAvx2, kAvx512 };
// The instruction set the cell's row passes (forward_block, vjp_block) run in: one file each, rows_zmm.cpp
// (x86-64-v4: 512-bit vectors), rows_ymm.cpp (x86-64-v3: AVX2 + FMA, 256-bit), rows_base.cpp (the build's
// baseline). Names: kRowsNames.
enum class RowIsa { kZmm, kYmm, kBase };

// Every choice's name, in its enum's order: what deqfuse.cpu_plan reports and force_cpu_plan takes.
inline constexpr const char* kGemmNames[] = {"blas", "avx2", "avx512"};
inline constexpr const char* kRowsNames[] = {"zmm", "ymm", "base"};
inline constexpr const char* kLayoutNames[] = {"rows", "fm"};

// The choices of the plan that a caller forced (deqfuse.force_cpu_plan -> _C.set_cpu_plan): process-wide,
// read when a plan is chosen; 0 = the plan's own choice, else 1 + the index of the name above (layout: 1 rows,
// 2 fm); chunk: samples per chunk of the whole solves. A choice the CPU or the shape does not allow falls back
// to the plan's own. Defined in bindings.cpp.
struct PlanForce {
  std::atomic<int> gemm{0}, rows{0}, layout{0};
  std::atomic<int64_t> chunk{0};
};
PlanForce& plan_force();

// The kernel plan of one cell op call or whole solve, chosen once by select_plan (cell_cpu_kernels.h) and
// read by every kernel of the call. Each plan is tested against the plain-PyTorch reference
// (tests/test_cell.py, test_fused_solve.py force each one); values repeat bit for bit within one plan
// (threads, chunk sizes, compaction), not across plans.
struct CpuPlan {
  SmallGemm gemm = SmallGemm::kBlas;  // the D x D GEMMs: a tile kernel (gemm_small.h) or the BLAS
  RowIsa rows = RowIsa::kBase;        // the row passes' instruction set (RowKernels)
  int gn = 0;       // GroupNorm rows: 16 / 8 gn_rows_wide_avx512 of that group width, 1 gn_rows_avx2, 0 gn_row
  int fm = 0;       // whole solves feature-major with this group width (16 or 8; solve_loop_fm), 0 row by row
  int64_t chunk = 0;  // samples per chunk of the whole solves, 0: by cache size (solve_chunks)
};

// What a tile GEMM adds to each output as it stores it (the cell's bias passes folded into the GEMM):
// C[r][j] = fma(scale, bias[j], acc), or acc + (bias[j] + rows[r][j]) when rows is given. bias null: none.
template <typename T>
struct GemmEpi {
  const T* bias = nullptr;         // [Nc]
  const T* const* rows = nullptr;  // [M] row pointers, each [Nc] (row r of the call's C)
  T scale = 1;                     // bias's factor (without rows)
};

// Full-batch gradients the parameter backward needs, kept by vjp_block when given (else all null):
// the grads w.r.t. pre-activations/normalised outputs, [N, B, D] (modality-major) or [B, D].
template <typename T>
struct Keep {
  T* dg1 = nullptr;   // d GN1 output (after the ReLU mask)   [N, B, D]
  T* da1 = nullptr;   // d a1 (GN1 input)                     [N, B, D]
  T* da2 = nullptr;   // d a2 (= d x_i)                        [N, B, D]
  T* du = nullptr;    // d u (= d GN2 output)                  [N, B, D]
  T* dzn = nullptr;   // d z_i+ (= d GN3 output)               [N, B, D]
  T* dga = nullptr;   // d ga                                  [B, D]
  T* da3 = nullptr;   // d a3 (= d x_f)                        [B, D]
};

template <typename T>
struct Cell;

// The row kernels of one instruction set (RowIsa), defined by its file: forward_block and vjp_block
// (cell_cpu_kernels.h: forward_block_body, vjp_block_body) on M <= kMaxBlockRows rows.
template <typename T>
struct RowKernels {
  void (*forward_block)(const Cell<T>& c, const T* zp, const T* xp, const T* xfp, T* outp, bool save, int64_t b0,
                        int64_t M, const int64_t* rows, T* scratch);
  void (*vjp_block)(const Cell<T>& c, const T* gp, const T* addp, T* outp, int64_t b0, int64_t M,
                    const int64_t* rows, T* scratch, const Keep<T>& kp);
};

// Each instruction set's row kernels, defined by its file (rows_zmm.cpp, rows_ymm.cpp, rows_base.cpp; outside
// x86-64 GCC builds all three are the baseline's). select_plan picks one the CPU runs.
extern const RowKernels<float> kRowsZmmF, kRowsYmmF, kRowsBaseF;
extern const RowKernels<double> kRowsZmmD, kRowsYmmD, kRowsBaseD;

template <typename T>
const RowKernels<T>& row_kernels(RowIsa isa) {
  if constexpr (std::is_same_v<T, float>)
    return isa == RowIsa::kZmm ? kRowsZmmF : isa == RowIsa::kYmm ? kRowsYmmF : kRowsBaseF;
  else
    return isa == RowIsa::kZmm ? kRowsZmmD : isa == RowIsa::kYmm ? kRowsYmmD : kRowsBaseD;
}

// Raw pointers and sizes of one call: parameters, the saved tensors (written by a forward with save=true,
// read by the VJP; null in a forward without save), the call's plan and its row kernels. kn(): the GEMMs
// go through a tile kernel, which reads the weights in [K][Nc] layout: a Linear's forward multiplies by W^T
// (transposed copies, made by the constructor when `forward`), its VJP by W as stored. Constructor:
// cell_cpu.cpp.
template <typename T>
struct Cell {
  int64_t B, N, D, G, ZS;  // ZS = (N+1) D: row stride of z / out / gbar
  const T *w1, *b1, *w2, *b2, *g1w, *g1b, *g2w, *g2b, *g3w, *g3b, *wg, *bg, *wf, *bf, *gfw, *gfb;
  T *yh1, *rs1, *g1s, *yh2, *rs2, *us, *yh3, *rs3, *zfs, *gas, *a3s, *yhf, *rsf;
  CpuPlan plan;
  const RowKernels<T>* rows;  // row_kernels(plan.rows)
  const T *w1t = nullptr, *w2t = nullptr, *wgt = nullptr, *wft = nullptr;  // W^T [K][Nc] (forward only)
  std::unique_ptr<T[]> wt_store;  // uninitialised: every value is written by a transpose

  Cell(int64_t B, int64_t N, int64_t D, int64_t G, const std::vector<at::Tensor>& p,
       const std::vector<at::Tensor>& sv, bool forward = false);
  bool kn() const { return plan.gemm != SmallGemm::kBlas; }  // a tile kernel, reading [K][Nc] weights
};

}  // namespace deqfuse

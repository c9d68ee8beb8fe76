// Whole Anderson solves of the fusion cell on the CPU, one op call per solve (issue 17: small problems
// at full speed). The loop of deqfuse/solvers.py (`anderson` driven by `run`) for the two maps the
// layer solves, with no Python, no tensor allocation and no dispatcher call per iteration:
//   anderson_cell_solve: z = f(z, x, xf)            (the forward fixed point; f = cell_forward)
//   anderson_vjp_solve:  g = J^T g + add            (the adjoint fixed point; J^T = cell_vjp at the point
//                                                    the `saved` tensors were taken at)
// Contract per sample: the step of reference/anderson.py (anderson_rows, the anderson_step op's kernel) at
// global step k, a sample frozen once its residual is below tol -- so iterate, best iterate/residual, step
// of the best, flag and the residual traces equal those of the Python loop sample by sample
// (tests/test_fused_solve.py). What differs is the work: each step evaluates the map on the samples still
// moving only (gathered into a contiguous block when they are not already one), so a solve costs the
// rows it needs, without the compaction heuristics of the Python driver.
//
// Threads: one parallel region for the whole solve. Each step the active samples are split evenly over
// the threads (blocks of at most kBlock rows, in sample order, so a sample mostly stays on one core and its
// Anderson history in that core's cache); one barrier per step (StepBarrier: spins, then yields). The
// solve stops when no sample is active or after max_iter steps. Returns (steps run, rows evaluated).
//
// Layout: z0 / g0 / best_x [B, L] with L = (N+1) D; x [B, N, D]; xf [B, D]; add [B, L]; params / saved
// as the cell ops (cell_cpu.cpp); best_res [B], abs/rel traces [T >= max_iter, B] (float for float32
// states, double for float64), converged [B] bool, nstep [B] int32 -- the buffers of solvers.Results,
// initialised by the caller (best_x = z0, best_res = inf, traces NaN, flags false, nstep 0) and updated in
// place. The Anderson state (iterate, rings X / G [B, m, L], Gram [B, m, m]) lives inside the call.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/extension.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <algorithm>
#include <atomic>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "anderson_cpu_kernels.h"
#include "cell_check.h"
#include "cell_cpu_kernels.h"

namespace deqfuse {
namespace {

constexpr int64_t kBlock = 64;  // rows per cell evaluation (cell_cpu_kernels.h: intermediates in cache)

// The forward map on a block of rows (see forward_block for zin / out / b0 / rows).
template <typename T>
struct CellMap {
  const Cell<T>& c;
  const T *xp, *xfp;
  void operator()(const T* zin, T* out, int64_t b0, int64_t M, const int64_t* rows, T* scratch) const {
    forward_block<T>(c, zin, xp, xfp, out, false, b0, M, rows, scratch);
  }
};

// The adjoint map g -> J^T g + add on a block of rows.
template <typename T>
struct VjpMap {
  const Cell<T>& c;
  const T* addp;
  void operator()(const T* gin, T* out, int64_t b0, int64_t M, const int64_t* rows, T* scratch) const {
    vjp_block<T>(c, gin, addp, out, b0, M, rows, scratch, Keep<T>());
  }
};

// The Results buffers of a solve (module comment) as raw pointers.
template <typename T>
struct OutPtrs {
  T* best_x;
  T* best_res;
  bool* converged;
  int32_t* nstep;
  T* abs_trace;  // [T, B]: step k's residuals at abs_trace + k B
  T* rel_trace;
};

struct SolveArgs {
  int64_t m, max_iter;
  double beta, lam, tol;
  bool stop_rel;
};

// The solve's step barrier: sense-reversing, the last thread to arrive runs `last` (the next step's active
// list) before releasing the others. A waiting thread spins briefly, then yields its core: with other
// busy processes on the machine (more runnable threads than cores), the thread it waits for may need that
// core -- libgomp's barrier spins for ~300k iterations first, which made a solve 4-5x slower beside one
// busy process on this 2-core machine (benchmarks/RESULTS.md).
class StepBarrier {
 public:
  explicit StepBarrier(int n) : n_(n), count_(n) {}
  // for a team of n threads (an OpenMP region may get fewer than it asked for); before any wait
  void reset(int n) {
    n_ = n;
    count_.store(n, std::memory_order_relaxed);
  }
  template <typename F>
  void wait(int& sense, const F& last) {
    sense ^= 1;
    if (count_.fetch_sub(1, std::memory_order_acq_rel) == 1) {  // last to arrive: every write before is visible
      last();
      count_.store(n_, std::memory_order_relaxed);
      flag_.store(sense, std::memory_order_release);
      return;
    }
    for (int spins = 0; flag_.load(std::memory_order_acquire) != sense; ++spins) {
      if (spins < kSpins) {
#if defined(__x86_64__)
        _mm_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  static constexpr int kSpins = 256;  // ~10 us of pause instructions, a few per cent of a step
  int n_;
  std::atomic<int> count_;
  std::atomic<int> flag_{0};
};

// The solve loop (module comment). x: the iterate [B, L], updated in place; D: the cell width (scratch).
template <typename T, typename Map>
std::pair<int64_t, int64_t> solve_loop(const Map& map, T* x, const OutPtrs<T>& o, int64_t B, int64_t L, int64_t D,
                                       const SolveArgs& a) {
  const int64_t m = a.m;
  bool* cv = o.converged;
  // Rings and Gram matrices uninitialised: a step reads only the n = min(k + 1, m) slots written so far
  // (zeroing them cost as much as an iteration at B = 128).
  std::unique_ptr<T[]> X(new T[B * m * L]), Gr(new T[B * m * L]), GG(new T[B * m * m]);
  // BLAS GEMMs never throw: the region is entered only with them (the at::mm fallback may throw and must
  // not be called inside an OpenMP region), else the loop runs on this thread.
  int nt = 1;
#ifdef _OPENMP
  if (sgemm_ && dgemm_) nt = (int)std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), (B + 7) / 8));
#endif
  const int64_t per_thread = kBlock * L * 2 + cell_scratch_size(kBlock, D) + kStepRows * L;  // zg, fx | cell | g
  std::unique_ptr<T[]> scratch(new T[per_thread * nt]);
  std::vector<int64_t> act(B);
  int64_t na = 0, steps = 0, rows = 0;

  StepBarrier barrier(nt);
  // run by the last thread to reach a step's barrier: the samples still moving at step k (none past max_iter)
  auto next_step = [&](int64_t k) {
    na = 0;
    if (k >= a.max_iter) return;
    for (int64_t b = 0; b < B; ++b)
      if (!cv[b]) act[na++] = b;
    if (na) {
      steps = k + 1;
      rows += na;
    }
  };
  auto body = [&](int tid, int nthreads) {
    T* zg = scratch.get() + per_thread * tid;
    T* fx = zg + kBlock * L;
    T* cs = fx + kBlock * L;
    T* gp = cs + cell_scratch_size(kBlock, D);
    int sense = 0;
    barrier.wait(sense, [&] { next_step(0); });
    for (int64_t k = 0; na > 0; ++k) {  // every thread sees the same active list (set before the barrier)
      const int slot = (int)(k % m), n = (int)std::min<int64_t>(k + 1, m);
      const StepConst<T> sc{L, (int)m, slot, n, k, (T)a.beta, (T)a.lam, a.tol, a.stop_rel};
      const int64_t lo = na * tid / nthreads, hi = na * (tid + 1) / nthreads;
      const int64_t nblk = (hi - lo + kBlock - 1) / kBlock;
      for (int64_t q = 0; q < nblk; ++q) {  // equal blocks of this thread's share
        const int64_t r0 = lo + (hi - lo) * q / nblk, r1 = lo + (hi - lo) * (q + 1) / nblk, M = r1 - r0;
        const int64_t* idx = act.data() + r0;
        const bool contiguous = idx[M - 1] - idx[0] == M - 1;
        if (contiguous) {
          map(x + idx[0] * L, fx, idx[0], M, nullptr, cs);
        } else {
          for (int64_t r = 0; r < M; ++r) std::copy(x + idx[r] * L, x + (idx[r] + 1) * L, zg + r * L);
          map(zg, fx, 0, M, idx, cs);
        }
        for (int64_t r0 = 0; r0 < M; r0 += kStepRows) {  // the Anderson step, kStepRows samples at a time
          const int R = (int)std::min<int64_t>(kStepRows, M - r0);
          AndersonRow<T, T, T> rw[kStepRows];
          for (int q = 0; q < R; ++q) {
            const int64_t r = r0 + q, b = idx[r];
            rw[q] = {x + b * L, fx + r * L, X.get() + b * m * L, Gr.get() + b * m * L, GG.get() + b * m * m,
                     o.best_x + b * L, o.best_res + b, cv + b, o.nstep + b, o.abs_trace + k * B + b,
                     o.rel_trace + k * B + b};
          }
          anderson_rows<T, T, T>(rw, R, sc, gp);
        }
      }
      barrier.wait(sense, [&] { next_step(k + 1); });  // one barrier per step
    }
  };
#ifdef _OPENMP
  if (nt > 1) {
#pragma omp parallel num_threads(nt)
    {
#pragma omp single
      barrier.reset(omp_get_num_threads());  // the team may be smaller than nt (nested, thread limit)
      body(omp_get_thread_num(), omp_get_num_threads());
    }
  } else {
    body(0, 1);
  }
#else
  body(0, 1);
#endif
  return {steps, rows};
}

// The Results buffers the op updates in place (module comment).
struct SolveBuffers {
  at::Tensor best_x, best_res, converged, nstep, abs_trace, rel_trace;

  // For a solve of B samples of width L in `dtype` of up to max_iter steps.
  void check(int64_t B, int64_t L, int64_t max_iter, at::ScalarType dtype, const char* op) const {
    auto need = [&](const at::Tensor& t, std::vector<int64_t> shape, at::ScalarType st, const char* name) {
      TORCH_CHECK(t.sizes() == at::IntArrayRef(shape) && t.scalar_type() == st && t.device().is_cpu() &&
                      t.is_contiguous(),
                  op, ": ", name, " must be a contiguous CPU tensor of shape ", shape_str(shape), " and dtype ",
                  c10::toString(st), ", got ", shape_str(t.sizes()), " ", c10::toString(t.scalar_type()));
    };
    need(best_x, {B, L}, dtype, "best_x");
    need(best_res, {B}, dtype, "best_res");
    need(converged, {B}, at::kBool, "converged");
    need(nstep, {B}, at::kInt, "nstep");
    TORCH_CHECK(abs_trace.dim() == 2 && abs_trace.size(0) >= max_iter, op, ": abs_trace must have >= max_iter (",
                std::to_string(max_iter), ") rows, got ", shape_str(abs_trace.sizes()));
    need(abs_trace, {abs_trace.size(0), B}, dtype, "abs_trace");
    need(rel_trace, {abs_trace.size(0), B}, dtype, "rel_trace");
  }

  template <typename T>
  OutPtrs<T> ptrs() const {
    return {best_x.data_ptr<T>(), best_res.data_ptr<T>(), converged.data_ptr<bool>(), nstep.data_ptr<int32_t>(),
            abs_trace.data_ptr<T>(), rel_trace.data_ptr<T>()};
  }
};

// Runs the loop from a copy of the start state (contiguous [B, L] values) into the buffers.
template <typename T, typename Map>
std::tuple<int64_t, int64_t> solve_from(const Map& map, const at::Tensor& start, const SolveBuffers& out, int64_t B,
                                        int64_t L, int64_t D, const SolveArgs& a) {
  std::vector<T> it(start.data_ptr<T>(), start.data_ptr<T>() + B * L);
  const auto r = solve_loop<T>(map, it.data(), out.ptrs<T>(), B, L, D, a);
  return {r.first, r.second};
}

SolveArgs check_solve_args(int64_t m, int64_t max_iter, double beta, double lam, double tol, bool stop_rel,
                           const char* op) {
  TORCH_CHECK(m >= 1 && m <= kMaxM, op, ": m must be in [1, ", std::to_string(kMaxM), "], got ", std::to_string(m));
  TORCH_CHECK(max_iter >= 1, op, ": max_iter must be >= 1, got ", std::to_string(max_iter));
  TORCH_CHECK(lam > 0 && beta > 0 && tol > 0, op, ": lam, beta and tol must be > 0");
  return SolveArgs{m, max_iter, beta, lam, tol, stop_rel};
}

// [B, L] state -> contiguous [B, N+1, D] for the cell checks and the loop (L must be (N+1) D; any strides).
at::Tensor as_cell_state(const at::Tensor& s, int64_t N, int64_t D, const char* op, const char* name) {
  TORCH_CHECK(s.dim() == 2 && s.size(1) == (N + 1) * D, op, ": ", name, " must be [B, (N+1) D] = [B, ",
              std::to_string((N + 1) * D), "], got ", shape_str(s.sizes()));
  return s.contiguous().view({s.size(0), N + 1, D});
}

}  // namespace

std::tuple<int64_t, int64_t> anderson_cell_solve_cpu(const at::Tensor& z0, const at::Tensor& x, const at::Tensor& xf,
                                                     const std::vector<at::Tensor>& params, int64_t groups,
                                                     at::Tensor best_x, at::Tensor best_res, at::Tensor converged,
                                                     at::Tensor nstep, at::Tensor abs_trace, at::Tensor rel_trace,
                                                     int64_t m, double beta, double lam, double tol, bool stop_rel,
                                                     int64_t max_iter) {
  const char* op = "anderson_cell_solve";
  TORCH_CHECK(x.dim() == 3, op, ": x must be [B, N, D], got ", shape_str(x.sizes()));
  const int64_t B = x.size(0), N = x.size(1), D = x.size(2), L = (N + 1) * D;
  const at::Tensor zc = as_cell_state(z0, N, D, op, "z0");
  check_cell_args(zc, x, xf, params, groups, op, "z0");
  const SolveArgs a = check_solve_args(m, max_iter, beta, lam, tol, stop_rel, op);
  const SolveBuffers out{best_x, best_res, converged, nstep, abs_trace, rel_trace};
  out.check(B, L, max_iter, z0.scalar_type(), op);
  const auto xc = x.contiguous(), xfc = xf.contiguous();
  const auto p = contiguous_all(params);
  std::tuple<int64_t, int64_t> res;
  AT_DISPATCH_FLOATING_TYPES(z0.scalar_type(), "anderson_cell_solve", [&] {
    const Cell<scalar_t> c(B, N, D, groups, p, {}, /*forward=*/true);
    res = solve_from<scalar_t>(CellMap<scalar_t>{c, xc.data_ptr<scalar_t>(), xfc.data_ptr<scalar_t>()}, zc, out, B,
                               L, D, a);
  });
  return res;
}

std::tuple<int64_t, int64_t> anderson_vjp_solve_cpu(const at::Tensor& g0, const at::Tensor& add,
                                                    const std::vector<at::Tensor>& saved,
                                                    const std::vector<at::Tensor>& params, int64_t groups,
                                                    at::Tensor best_x, at::Tensor best_res, at::Tensor converged,
                                                    at::Tensor nstep, at::Tensor abs_trace, at::Tensor rel_trace,
                                                    int64_t m, double beta, double lam, double tol, bool stop_rel,
                                                    int64_t max_iter) {
  const char* op = "anderson_vjp_solve";
  TORCH_CHECK(params.size() == kNumParams && params[0].dim() == 3, op,
              ": params must hold the 16 CellParams tensors (w1 [N, D, D] first)");
  const int64_t N = params[0].size(0), D = params[0].size(1), L = (N + 1) * D;
  const at::Tensor gc = as_cell_state(g0, N, D, op, "g0");
  const int64_t B = gc.size(0);
  check_saved(gc, saved, params, groups, op);
  TORCH_CHECK(add.sizes() == g0.sizes() && add.scalar_type() == g0.scalar_type() && add.device().is_cpu(), op,
              ": add must be a CPU tensor of g0's shape ", shape_str(g0.sizes()), " and dtype, got ",
              shape_str(add.sizes()), " ", c10::toString(add.scalar_type()));
  const SolveArgs a = check_solve_args(m, max_iter, beta, lam, tol, stop_rel, op);
  const SolveBuffers out{best_x, best_res, converged, nstep, abs_trace, rel_trace};
  out.check(B, L, max_iter, g0.scalar_type(), op);
  const auto ac = add.contiguous();
  const auto sv = contiguous_all(saved), p = contiguous_all(params);
  std::tuple<int64_t, int64_t> res;
  AT_DISPATCH_FLOATING_TYPES(g0.scalar_type(), "anderson_vjp_solve", [&] {
    const Cell<scalar_t> c(B, N, D, groups, p, sv);
    res = solve_from<scalar_t>(VjpMap<scalar_t>{c, ac.data_ptr<scalar_t>()}, gc, out, B, L, D, a);
  });
  return res;
}

}  // namespace deqfuse

TORCH_LIBRARY_FRAGMENT(deqfuse, m) {
  m.def("anderson_cell_solve(Tensor z0, Tensor x, Tensor xf, Tensor[] params, int groups, Tensor(a!) best_x, "
        "Tensor(b!) best_res, Tensor(c!) converged, Tensor(d!) nstep, Tensor(e!) abs_trace, Tensor(f!) rel_trace, "
        "int m, float beta, float lam, float tol, bool stop_rel, int max_iter) -> (int, int)");
  m.def("anderson_vjp_solve(Tensor g0, Tensor add, Tensor[] saved, Tensor[] params, int groups, Tensor(a!) best_x, "
        "Tensor(b!) best_res, Tensor(c!) converged, Tensor(d!) nstep, Tensor(e!) abs_trace, Tensor(f!) rel_trace, "
        "int m, float beta, float lam, float tol, bool stop_rel, int max_iter) -> (int, int)");
}

TORCH_LIBRARY_IMPL(deqfuse, CPU, m) {
  m.impl("anderson_cell_solve", &deqfuse::anderson_cell_solve_cpu);
  m.impl("anderson_vjp_solve", &deqfuse::anderson_vjp_solve_cpu);
}

// Not differentiable (the solvers call them under no_grad); with grad enabled a backward raises.
TORCH_LIBRARY_IMPL(deqfuse, Autograd, m) {
  m.impl("anderson_cell_solve", torch::autograd::autogradNotImplementedFallback());
  m.impl("anderson_vjp_solve", torch::autograd::autogradNotImplementedFallback());
}

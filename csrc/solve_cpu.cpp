// Whole Anderson solves of the fusion cell on the CPU, one op call per solve. The loop of deqfuse/solvers.py (`anderson` driven by `run`) for the two maps the
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
// Layout (the kernel plan's `layout`, CpuPlan::fm): where the plan allows it, both solves run each chunk
// feature-major, its samples in SIMD lanes (solve_loop_fm, cell_fm_avx512.h: float32, tile GEMMs, GroupNorm
// group width 16 or 8), else row by row.
//
// Threads: run_team (OpenMP's team, or the SolvePool on a loaded machine), no barrier per step: threads take
// chunks of consecutive samples
// from a shared counter and solve each to the end (solve_loop's schedule comment). The solve stops when no sample is
// active or after max_iter steps. Returns (steps run = the last step any sample was active + 1, rows
// evaluated).
//
// Layout: z0 / g0 / best_x [B, L] with L = (N+1) D; x [B, N, D]; xf [B, D]; add [B, L]; params / saved
// as the cell ops (cell_cpu.cpp); best_res [B], abs/rel traces [T >= max_iter, B] (float for float32
// states, double for float64), converged [B] bool, nstep [B] int32 -- the buffers of solvers.Results,
// initialised by the caller (best_x = z0, best_res = inf, traces NaN, flags false, nstep 0) and updated in
// place. The Anderson state (iterate; rings X / G [C, m, L], Gram [C, m, m] per thread for its chunk of C
// samples) lives inside the call.
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <ATen/ATen.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <cstdlib>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <limits>
#include <memory>
#include <mutex>
#include <pthread.h>
#include <thread>
#include <string>
#include <utility>
#include <vector>

#include "cpu/anderson_cpu_kernels.h"
#include "cell_check.h"
#include "cpu/cell_cpu_kernels.h"
#include "cpu/cell_fm_avx512.h"

namespace deqfuse {
namespace {

constexpr int64_t kBlock = kMaxBlockRows;  // rows per cell evaluation (cell_cpu_kernels.h: intermediates in cache)

// The 2N + 2 D x D weights a map reads each step (the forward's transposed copies or the weights themselves).
template <typename T>
int64_t cell_weight_bytes(const Cell<T>& c) { return (int64_t)sizeof(T) * (2 * c.N + 2) * c.D * c.D; }

// The forward map on a block of rows (see forward_block for zin / out / b0 / rows).
template <typename T>
struct CellMap {
  const Cell<T>& c;
  const T *xp, *xfp;
  void operator()(const T* zin, T* out, int64_t b0, int64_t M, const int64_t* rows, T* scratch) const {
    c.rows->forward_block(c, zin, xp, xfp, out, false, b0, M, rows, scratch);
  }
  int64_t row_bytes() const { return (int64_t)sizeof(T) * c.ZS; }  // x [N, D] and xf [D] per sample
  int64_t weight_bytes() const { return cell_weight_bytes(c); }
};

// The adjoint map g -> J^T g + add on a block of rows.
template <typename T>
struct VjpMap {
  const Cell<T>& c;
  const T* addp;
  void operator()(const T* gin, T* out, int64_t b0, int64_t M, const int64_t* rows, T* scratch) const {
    c.rows->vjp_block(c, gin, addp, out, b0, M, rows, scratch, Keep<T>());
  }
  // per sample: the 13 saved tensors (5 [N, D], 3 [N, G], 4 [D], 1 [G]) and add [L]
  int64_t row_bytes() const { return (int64_t)sizeof(T) * ((5 * c.N + 4) * c.D + (3 * c.N + 1) * c.G + c.ZS); }
  int64_t weight_bytes() const { return cell_weight_bytes(c); }
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

// The solve's schedule. A sample's trajectory does not depend on the other samples (the map is row-wise,
// the Anderson state per sample), so the batch is cut into chunks of consecutive samples and each chunk is
// solved to the end before the next: its rings, Gram matrices and the map's intermediates stay in the
// core's L2 for all its steps (step-major over the whole batch, the rings alone -- 2 m L values per sample,
// ~1 MB at B = 128, L = 192, m = 5 -- left L2 every step). Threads take chunks from a shared counter (no
// barrier per step; a thread whose chunk converges early takes the next). Chunk size: the largest whose
// working set (row_bytes per sample) fits in half of what the cell's weights leave of L2 -- kBlock where
// the weights take more than half of L2 or the GEMMs go through the BLAS --, at most kBlock (one map call
// per step), at least 8, in whole 8-sample units; the count a multiple of the thread count, the sizes equal
// to within a unit (threads that finish early take the next chunk). DEQFUSE_SOLVE_CHUNK (read per call;
// tests, benchmarks) sets that largest size instead of the L2 rule (in units of 1 when not a multiple of 8).
struct Chunks {
  int64_t count, B, unit;  // chunk c: samples [begin(c), begin(c + 1)), whole units but the batch's tail
  int64_t begin(int64_t c) const { return std::min(B, unit * (((B + unit - 1) / unit) * c / count)); }
};

inline int64_t l2_bytes() {
  static const int64_t v = [] {
    const long s = sysconf(_SC_LEVEL2_CACHE_SIZE);
    return s > 0 ? (int64_t)s : (int64_t)512 * 1024;  // unknown: the smallest L2 of the x86 CPUs we run on
  }();
  return v;
}

// U: the samples of a unit (8: the Anderson step's groups, two GEMM row tiles; 16 for the feature-major solve: a
// 16-lane vector, so a chunk has no padding lanes).
// forced: CpuPlan::chunk (0: by cache size).
inline Chunks solve_chunks(int64_t B, int64_t row_bytes, int64_t weight_bytes, bool tile_gemm, int64_t forced, int nt,
                           int64_t U = 8) {
  const int64_t l2 = l2_bytes();
  // Weights that leave L2 little room are streamed once per chunk and step, and a BLAS GEMM packs its
  // operands on every call: then the largest chunks amortise them (RESULTS.md, 2026-12-04 evening).
  int64_t rows = !tile_gemm || weight_bytes > l2 / 2 ? kBlock
                                                     : (l2 - weight_bytes) / 2 / std::max<int64_t>(1, row_bytes);
  rows = std::max<int64_t>(U, std::min<int64_t>(kBlock, rows)) / U * U;
  if (forced) rows = std::min<int64_t>(kBlock, forced);
  // Chunks of whole U-sample units (rows: the Anderson step's groups, two GEMM row tiles), so the GEMMs run no
  // 1- or 2-row tail tiles every step.
  const int64_t unit = rows % U == 0 ? U : 1, units = (B + unit - 1) / unit, per = rows / unit;
  int64_t count = (units + per - 1) / per;
  count = std::min<int64_t>(units, (count + nt - 1) / nt * nt);
  return {std::max<int64_t>(1, count), B, unit};
}

inline int64_t round_up(int64_t n, int64_t q) { return (n + q - 1) / q * q; }
template <typename T>
T* align64(T* p) { return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~(uintptr_t)63); }


// Per sample, what a solve keeps besides the map's inputs: rings X, G and Gram, the iterate, f(x), best iterate,
// gathered copy, step scratch, cell scratch (the chunk rule's row_bytes, with the map's own).
template <typename T>
int64_t solve_state_bytes(int64_t m, int64_t L, int64_t D) {
  return (int64_t)sizeof(T) * ((2 * m + 5) * L + m * m + 5 * D);
}

// The rows a solve evaluated and its steps (the last step any sample was active + 1), summed over threads.
struct SolveCount {
  std::atomic<int64_t> rows{0}, steps{0};
  void add(int64_t r, int64_t st) {
    rows.fetch_add(r, std::memory_order_relaxed);
    for (int64_t s = steps.load(); s < st && !steps.compare_exchange_weak(s, st);) {
    }
  }
  std::pair<int64_t, int64_t> result() const { return {steps.load(), rows.load()}; }
};

// The solves' thread team on a loaded machine (run_team): a pool of persistent threads that wait on a condition
// variable (asleep, not spinning, when idle). run(nt, body) runs body(tid) on this thread (tid 0) and on up to nt - 1 pool
// threads, each with its own tid < nt; the bodies take their work (chunks) from a shared counter, so any team
// size finishes it. A pool thread that has not started when this thread's body returns is not waited for (the
// job is closed to it): a parked or busy thread holds back at most the chunk it is working on, never the whole
// solve; and no thread spins on a loaded machine. Every thread of a team runs its BLAS calls single-threaded.
// After fork() the child starts with an empty pool.
class SolvePool {
 public:
  template <typename Body>
  void run(int nt, const Body& body) {
    BlasSingleThread blas;
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (nt <= 1 || !busy.owns_lock()) {  // a solve from another thread holds the pool: this one runs alone
      body(0);
      return;
    }
    const std::function<void(int)> job = [&body](int tid) { body(tid); };
    {
      std::lock_guard<std::mutex> lock(mu_);
      while ((int)workers_.size() < nt - 1) workers_.emplace_back([this] { loop(); });
      job_ = &job;
      open_ = nt - 1;
      next_tid_ = 1;
      ++generation_;
    }
    wake_.notify_all();
    body(0);
    std::unique_lock<std::mutex> lock(mu_);
    open_ = 0;  // closed: threads not started yet stay out
    done_.wait(lock, [this] { return running_ == 0; });
    job_ = nullptr;
  }

  static SolvePool& get() {
    static SolvePool* pool = [] {
      auto* p = new SolvePool();  // never destroyed: its threads sleep until the process exits
      pthread_atfork(nullptr, nullptr, [] { new (&SolvePool::get()) SolvePool(); });  // (the child's copy: no threads)
      return p;
    }();
    return *pool;
  }

 private:
  void loop() {
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
    BlasSingleThread blas;
    int64_t seen = 0;
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen && open_ > 0; });
      seen = generation_;
      const int tid = next_tid_++;
      --open_;
      ++running_;
      const std::function<void(int)>* job = job_;
      lock.unlock();
      (*job)(tid);
      lock.lock();
      if (--running_ == 0) done_.notify_all();
    }
  }

  std::mutex run_mu_, mu_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int)>* job_ = nullptr;
  int64_t generation_ = 0;
  int open_ = 0, next_tid_ = 1, running_ = 0;
};

// The solves left to run on the SolvePool before run_team tries OpenMP's team again; in a child process after
// fork() always the pool (libgomp's team does not survive a fork: a parallel region there never ends). The fork
// handler is registered when the extension loads.
constexpr int kAlwaysPool = std::numeric_limits<int>::max();
std::atomic<int> pool_solves_left{0};
[[maybe_unused]] const bool fork_handler = (pthread_atfork(nullptr, nullptr, [] { pool_solves_left.store(kAlwaysPool); }), true);

// Runs body(tid) for tid < nt (tid 0 on this thread); the bodies take chunks from a shared counter. Where OpenMP
// is there, in OpenMP's team: its threads are the ones torch's own ops keep awake (they spin for a while after each
// parallel region), which a sleeping pool thread would wait behind. A team thread that starts after this thread's
// body returned does nothing. On a loaded machine a team thread can lag the others (a busy neighbour holds its
// CPU): when the last one finishes later than max(0.5 ms, half this thread's time) after this thread (more than
// the last chunk of a quiet team), the next kPoolSolves solves run on the SolvePool, whose threads are not waited
// for unless they started (RESULTS.md "The CPU solve's thread team").
template <typename Body>
void run_team(int nt, const Body& body) {
#ifdef _OPENMP
  constexpr int kPoolSolves = 32;
  auto& left = pool_solves_left;
  if (nt > 1 && !omp_in_parallel() && left.load(std::memory_order_relaxed) <= 0) {
    using clock = std::chrono::steady_clock;
    const auto t0 = clock::now();
    std::atomic<bool> closed{false};
    std::atomic<int64_t> last_ns{0};
    int64_t mine_ns = 0;
#pragma omp parallel num_threads(nt)
    {
      BlasSingleThread blas;
      const int tid = omp_get_thread_num();
      if (tid == 0) {
        body(0);
        closed.store(true, std::memory_order_release);
        mine_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - t0).count();
      } else {
        if (!closed.load(std::memory_order_acquire)) body(tid);
        const int64_t ns = std::chrono::duration_cast<std::chrono::nanoseconds>(clock::now() - t0).count();
        for (int64_t v = last_ns.load(); v < ns && !last_ns.compare_exchange_weak(v, ns);) {
        }
      }
    }
    if (last_ns.load() - mine_ns > std::max<int64_t>(500000, mine_ns / 2)) left.store(kPoolSolves);
    return;
  }
  if (nt > 1 && left.load(std::memory_order_relaxed) != kAlwaysPool) left.fetch_sub(1, std::memory_order_relaxed);
#endif
  SolvePool::get().run(nt, body);
}

// The solve loop (module comment). x: the iterate [B, L], updated in place; D: the cell width (scratch).
// The chunks are sized from the map: row_bytes (what it reads per sample besides the iterate and the
// Anderson state), weight_bytes (what it reads whatever the rows) and its cell's GEMM kernel (Cell::kn).
template <typename T, typename Map>
std::pair<int64_t, int64_t> solve_loop(const Map& map, T* x, const OutPtrs<T>& o, int64_t B, int64_t L, int64_t D,
                                       const SolveArgs& a) {
  const int64_t m = a.m;
  bool* cv = o.converged;
  // BLAS GEMMs never throw: the region is entered only with them (the at::mm fallback may throw and must
  // not be called inside an OpenMP region), else the loop runs on this thread.
  int nt = 1;
#ifdef _OPENMP
  if (sgemm_ && dgemm_) nt = solve_threads(B);
#endif
  const Chunks ch =
      solve_chunks(B, solve_state_bytes<T>(m, L, D) + map.row_bytes(), map.weight_bytes(), map.c.kn(),
                   map.c.plan.chunk, nt);
  int64_t C = 0;  // the largest chunk
  for (int64_t c = 0; c < ch.count; ++c) C = std::max(C, ch.begin(c + 1) - ch.begin(c));
  nt = (int)std::min<int64_t>(nt, ch.count);
  // per thread: rings X, G [C, m, L] and Gram [C, m, m] (uninitialised: a step reads only the n = min(k + 1,
  // m) slots written so far), then zg, fx [C, L], the cell's scratch and the step's g [kStepRows, L]
  // Each thread's block starts at a 64-byte boundary, so every buffer has the same alignment whichever thread
  // runs a chunk: the BLAS (float64, widths without tile kernels) may round differently at another alignment,
  // and the chunks go to threads in no fixed order -- values must not depend on it.
  const int64_t ring = C * m * L;
  const int64_t per_thread = round_up(2 * ring + C * m * m + 2 * C * L + cell_scratch_size(C, D) + kStepRows * L,
                                      64 / (int64_t)sizeof(T));
  std::unique_ptr<T[]> store(new T[per_thread * nt + 64 / sizeof(T)]);
  T* const scratch = align64(store.get());
  std::atomic<int64_t> next{0};
  SolveCount count;

  auto body = [&](int tid) {
    T* X = scratch + per_thread * tid;
    T* Gr = X + ring;
    T* GG = Gr + ring;
    T* zg = GG + C * m * m;
    T* fx = zg + C * L;
    T* cs = fx + C * L;
    T* gp = cs + cell_scratch_size(C, D);
    int64_t act[kBlock];
    int64_t my_rows = 0, my_steps = 0;
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < ch.count;) {
      const int64_t b0 = ch.begin(c), b1 = ch.begin(c + 1);
      for (int64_t k = 0; k < a.max_iter; ++k) {
        int64_t M = 0;  // the chunk's samples still moving at step k
        for (int64_t b = b0; b < b1; ++b)
          if (!cv[b]) act[M++] = b;
        if (M == 0) break;
        my_steps = std::max(my_steps, k + 1);
        my_rows += M;
        const int slot = (int)(k % m), n = (int)std::min<int64_t>(k + 1, m);
        const StepConst<T> sc{L, (int)m, slot, n, k, (T)a.beta, (T)a.lam, a.tol, a.stop_rel, true};  // own rings
        if (act[M - 1] - act[0] == M - 1) {
          map(x + act[0] * L, fx, act[0], M, nullptr, cs);
        } else {
          for (int64_t r = 0; r < M; ++r) std::copy(x + act[r] * L, x + (act[r] + 1) * L, zg + r * L);
          map(zg, fx, 0, M, act, cs);
        }
        for (int64_t r0 = 0; r0 < M; r0 += kStepRows) {  // the Anderson step, kStepRows samples at a time
          const int R = (int)std::min<int64_t>(kStepRows, M - r0);
          AndersonRow<T, T, T> rw[kStepRows];
          for (int q = 0; q < R; ++q) {
            const int64_t r = r0 + q, b = act[r], lb = b - b0;  // lb: the sample's place in the chunk's rings
            rw[q] = {x + b * L, fx + r * L, X + lb * m * L, Gr + lb * m * L, GG + lb * m * m, o.best_x + b * L,
                     o.best_res + b, cv + b, o.nstep + b, o.abs_trace + k * B + b, o.rel_trace + k * B + b};
          }
          anderson_rows<T, T, T>(rw, R, sc, gp);
        }
      }
    }
    count.add(my_rows, my_steps);
  };
  run_team(nt, body);
  return count.result();
}

#ifdef DEQFUSE_FM_SOLVE
// A feature-major map's per-sample input: `rows` rows, sample b's row r at src[(r / blk) B blk + b blk + r % blk]
// (a [B, rows] tensor: blk = rows; an [N, B, X] one: blk = X, rows = N X).
struct FmInput {
  const float* src;
  int64_t blk, rows;
};

// The forward map (CellMap) feature-major: inputs x [N D] and x_f [D] rows.
template <int NW>
struct FmCellMap {
  const Cell<float>& c;
  const float *x, *xf;
  static constexpr int kScratch = 4;
  std::vector<FmInput> inputs() const { return {{x, c.N * c.D, c.N * c.D}, {xf, c.D, c.D}}; }
  void operator()(const float* zT, float* fT, const float* const* in, float* const* scr, int64_t S, int64_t P,
                  int V) const {
    cell_forward_fm<NW>(c, zT, in[0], in[1], fT, scr, S, P, V);
  }
  int64_t row_bytes() const { return CellMap<float>{c, x, xf}.row_bytes(); }
};

// The adjoint map (VjpMap) feature-major: inputs the saved tensors and add (cell_fm_avx512.h: kFmVjpInputs).
template <int NW>
struct FmVjpMap {
  const Cell<float>& c;
  const float* add;
  static constexpr int kScratch = 5;
  std::vector<FmInput> inputs() const {
    const int64_t N = c.N, D = c.D, G = c.G;
    return {{c.yh1, D, N * D}, {c.rs1, G, N * G}, {c.g1s, D, N * D}, {c.yh2, D, N * D}, {c.rs2, G, N * G},
            {c.us, D, N * D},  {c.yh3, D, N * D}, {c.rs3, G, N * G}, {c.zfs, D, D},     {c.gas, D, D},
            {c.a3s, D, D},     {c.yhf, D, D},     {c.rsf, G, G},     {add, c.ZS, c.ZS}};
  }
  void operator()(const float* gT, float* oT, const float* const* in, float* const* scr, int64_t S, int64_t P,
                  int V) const {
    cell_vjp_fm<NW>(c, gT, in, oT, scr, S, P, V);
  }
  int64_t row_bytes() const { return VjpMap<float>{c, add}.row_bytes(); }
};

// A whole solve with each chunk feature-major (cell_fm_avx512.h): the loop of solve_loop -- same chunks,
// same per-sample contract and floats -- with the chunk's samples in SIMD lanes: its state transposed in once
// (z0, best_x, the map's inputs), its best iterates transposed out when a sample freezes or at the end. A chunk of C
// samples has 16 V lanes (V = ceil(C / 16)); a step evaluates the V vectors holding samples still moving, and
// when these fit in fewer vectors the moving samples' lanes are moved to the front (the state arrays; at most 3
// times per chunk). Frozen and padding lanes are evaluated, not stored.
// Layout: each array is V panels of [rows][16] (row stride 16, panel stride P): a kernel's walk over one vector's
// rows is contiguous. P and the arrays' starts are 64 bytes off multiples of 4 KB (P = 16 (L + 1), arrays
// 16 more apart): rings slots and arrays a multiple of 4 KB apart made the mixing's loads wait on its ring
// stores to the same 4 KB offsets (4K aliasing).
template <typename FmMap>
std::pair<int64_t, int64_t> solve_loop_fm(const FmMap& map, const float* z0, const OutPtrs<float>& o, int64_t B,
                                          const SolveArgs& a) {
  const Cell<float>& c = map.c;
  const int64_t D = c.D, L = c.ZS, m = a.m;
  const std::vector<FmInput> ins = map.inputs();
  const int NI = (int)ins.size(), NS = FmMap::kScratch;
  TORCH_INTERNAL_ASSERT(NI <= kFmVjpInputs && NS <= 5, "solve_loop_fm: the body's in / scr arrays are too small");
  bool* cv = o.converged;
  int nt = 1;
#ifdef _OPENMP
  nt = solve_threads(B);  // nothing here throws
#endif
  const Chunks ch = solve_chunks(B, solve_state_bytes<float>(m, L, D) + map.row_bytes(), cell_weight_bytes(c), true,
                                 c.plan.chunk, nt, 16);
  int64_t C = 0;
  for (int64_t q = 0; q < ch.count; ++q) C = std::max(C, ch.begin(q + 1) - ch.begin(q));
  nt = (int)std::min<int64_t>(nt, ch.count);
  const int64_t VM = (C + 15) / 16, S = 16, P = 16 * (L + 1), AS = VM * P + 16;  // AS: one array's stride
  auto at = [&](int64_t r, int64_t lane) { return r * S + (lane / 16) * P + lane % 16; };
  // per thread: x, f(x), g, best [L]; rings X, G [m][L] (slot stride AS); the map's inputs and scratch arrays
  // (every array AS values), then the Gram matrices [C][m][m]
  const int64_t per_thread = round_up((4 + 2 * m + NI + NS) * AS + C * m * m, 16);
  std::unique_ptr<float[]> store(new float[per_thread * nt + 16]);
  float* const base = align64(store.get());
  std::atomic<int64_t> next{0};
  SolveCount count;

  auto body = [&](int tid) {
    float* xT = base + per_thread * tid;
    float *fT = xT + AS, *gT = fT + AS, *bT = gT + AS, *XT = bT + AS, *GT = XT + m * AS, *inb = GT + m * AS;
    float* in[kFmVjpInputs];
    float* scr[5];
    for (int q = 0; q < NI; ++q) in[q] = inb + q * AS;
    for (int q = 0; q < NS; ++q) scr[q] = inb + (NI + q) * AS;
    float* GG = inb + (NI + NS) * AS;
    int64_t my_rows = 0, my_steps = 0;
    int lane[64];  // lane -> sample of the chunk (-1: none)
    float sums[64][3 + kMaxM];
    float alpha[kMaxM][64];
    for (int64_t ci; (ci = next.fetch_add(1, std::memory_order_relaxed)) < ch.count;) {
      const int64_t b0 = ch.begin(ci), Cc = ch.begin(ci + 1) - b0;
      for (int64_t s = 0; s < 16 * VM; ++s) {  // transpose in (padding lanes: zeros)
        const bool live = s < Cc;
        lane[s] = live ? (int)s : -1;
        const int64_t b = b0 + s;
        for (int64_t l = 0; l < L; ++l) {
          xT[at(l, s)] = live ? z0[b * L + l] : 0.0f;
          bT[at(l, s)] = live ? o.best_x[b * L + l] : 0.0f;
        }
        for (int q = 0; q < NI; ++q) {
          const FmInput& e = ins[q];
          for (int64_t l = 0; l < e.rows; ++l)
            in[q][at(l, s)] = live ? e.src[(l / e.blk) * B * e.blk + b * e.blk + l % e.blk] : 0.0f;
        }
      }
      auto flush = [&](int s) {  // lane s's best iterate -> best_x
        float* dst = o.best_x + (b0 + lane[s]) * L;
        for (int64_t l = 0; l < L; ++l) dst[l] = bT[at(l, s)];
      };
      auto moving = [&](int s) { return lane[s] >= 0 && !cv[b0 + lane[s]]; };
      int V = (int)VM;
      for (int64_t k = 0; k < a.max_iter; ++k) {
        int M = 0;
        for (int s = 0; s < 16 * V; ++s) M += moving(s);
        if (M == 0) break;
        my_steps = std::max(my_steps, k + 1);
        my_rows += M;
        if ((M + 15) / 16 < V) {  // compact: the moving lanes to the front, in order
          int src[64], n2 = 0;
          for (int s = 0; s < 16 * V; ++s)
            if (moving(s)) src[n2++] = s;
          auto move = [&](float* arr, int64_t R) {
            for (int64_t r = 0; r < R; ++r)
              for (int d = 0; d < n2; ++d) arr[at(r, d)] = arr[at(r, src[d])];
          };
          move(xT, L);
          move(bT, L);
          for (int64_t j = 0; j < m; ++j) {
            move(XT + j * AS, L);
            move(GT + j * AS, L);
          }
          for (int q = 0; q < NI; ++q) move(in[q], ins[q].rows);
          for (int d = 0; d < 16 * V; ++d) lane[d] = d < n2 ? lane[src[d]] : -1;
          V = (n2 + 15) / 16;
        }
        const int slot = (int)(k % m), n = (int)std::min<int64_t>(k + 1, m);
        map(xT, fT, in, scr, S, P, V);
        for (int v = 0; v < V; ++v) gram_fm(xT, fT, GT, AS, gT, L, S, P, v, (int)m, slot, n, sums);
        // the bookkeeping of anderson_rows per moving lane
        __mmask16 better[4] = {0, 0, 0, 0}, live[4] = {0, 0, 0, 0};
        float* GGs[64];
        int lv[64], na = 0, frozen[64], nf = 0;
        for (int s = 0; s < 16 * V; ++s) {
          if (!moving(s)) continue;
          const int64_t b = b0 + lane[s];
          const int fl = record_residual<float>(sums[s][0], sums[s][1], a.stop_rel, a.tol, k, o.abs_trace + k * B + b,
                                                o.rel_trace + k * B + b, o.best_res + b, o.nstep + b, cv + b);
          if (fl & 1) better[s / 16] |= (__mmask16)(1u << (s % 16));
          if (fl & 2) {  // converged now: frozen, no history update
            frozen[nf++] = s;
            continue;
          }
          float* gg = GG + lane[s] * m * m;
          store_gram_row(gg, sums[s], (int)m, slot);
          GGs[na] = gg;
          lv[na++] = s;
          live[s / 16] |= (__mmask16)(1u << (s % 16));
        }
        blend_rows_fm(bT, xT, better, L, S, P, V);
        for (int q = 0; q < nf; ++q) flush(frozen[q]);
        if (na == 0) continue;
        for (int j = 0; j < m; ++j) std::fill(alpha[j], alpha[j] + 16 * V, 0.0f);
        for (int q0 = 0; q0 < na; q0 += kStepRows) {  // the weights, kStepRows samples at a time
          const int nq = std::min(kStepRows, na - q0);
          float al[kStepRows][kMaxM];
          anderson_weights_rows<float>(GGs + q0, nq, (int)m, n, (float)a.lam, al);
          for (int q = 0; q < nq; ++q)
            for (int j = 0; j < m; ++j) alpha[j][lv[q0 + q]] = al[q][j];
        }
        mix_fm_all(xT, XT, GT, AS, gT, alpha, live, L, S, P, V, slot, n, (float)a.beta);
      }
      for (int s = 0; s < 16 * V; ++s)
        if (moving(s)) flush(s);  // max_iter reached
    }
    count.add(my_rows, my_steps);
  };
  run_team(nt, body);
  return count.result();
}
#endif

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

// The solve feature-major where the cell's plan says so (CpuPlan::fm), with the map FmMap<NW>{c, args...} from the start state
// start [B, L]: true when it ran (res: its steps and rows). FmVjpMap needs c built with its transposed weights.
template <template <int> class FmMap, typename T, typename... Args>
bool solve_fm(const Cell<T>& c, const at::Tensor& start, const SolveBuffers& out, int64_t B, const SolveArgs& a,
              std::tuple<int64_t, int64_t>& res, Args... args) {
#ifdef DEQFUSE_FM_SOLVE
  if constexpr (std::is_same_v<T, float>) {
    const int nw = c.plan.fm;
    if (!nw || !c.w1t) return false;
    const float* zp = start.data_ptr<float>();
    const auto r = nw == 16 ? solve_loop_fm(FmMap<16>{c, args...}, zp, out.ptrs<float>(), B, a)
                            : solve_loop_fm(FmMap<8>{c, args...}, zp, out.ptrs<float>(), B, a);
    res = {r.first, r.second};
    return true;
  }
#endif
  (void)c, (void)start, (void)out, (void)B, (void)a, (void)res, ((void)args, ...);
  return false;
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
    if (solve_fm<FmCellMap>(c, zc, out, B, a, res, xc.data_ptr<scalar_t>(), xfc.data_ptr<scalar_t>())) return;
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
    const Cell<scalar_t> c(B, N, D, groups, p, sv, /*forward=*/select_plan<scalar_t>(D, groups, B).fm != 0);  // W^T for fm
    if (solve_fm<FmVjpMap>(c, gc, out, B, a, res, ac.data_ptr<scalar_t>())) return;
    res = solve_from<scalar_t>(VjpMap<scalar_t>{c, ac.data_ptr<scalar_t>()}, gc, out, B, L, D, a);
  });
  return res;
}

// The kernel plan of the cell ops and whole solves of width D in G groups in float64 (dbl) or float32 on this CPU,
// as the kernels choose it at each call (with what PlanForce forces now): "gemm=... rows=... layout=..." and
// " chunk=N" when forced (bindings.cpp: cell_plan; deqfuse.cpu_plan; SolverStats.plan).
std::string cell_plan(int64_t D, int64_t G, bool dbl, int64_t B) {
  TORCH_CHECK_VALUE(D > 0 && G > 0 && D % G == 0, "cpu_plan: dim must be a positive multiple of groups, got dim=",
                    D, " groups=", G);
  return plan_name(dbl ? select_plan<double>(D, G, B) : select_plan<float>(D, G, B));
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

// Dynamic-routing kernels (contracts: deqfuse/reference/routing.py). The point of having them in C++ is launch cost: routed inference at small
// batches is a chain of tiny kernels, and a C++ launch costs a few microseconds of host time.
// Kernel templates only: also compiled stand-alone by tests/nvcc_compile.py.
#pragma once
#include <c10/macros/Macros.h>  // CUDA_KERNEL_ASSERT

#include <cstdint>

namespace deqfuse {

constexpr int kRouteThreads = 1024;
constexpr int kMaxExperts = 64;
constexpr int kMaxRowSources = 8;  // tensors moved by one gather launch

// One block. Pass 1: histogram of the choices (shared atomics) -> counts and group starts. Pass 2,
// kRouteThreads samples at a time: each sample's rank among the earlier samples of its group
// (__match_any_sync inside a warp, per-warp counts scanned across warps) -> order[start + rank] = i.
// A stable counting sort. Choices outside [0, E) are dropped (counts then sum to less than B).
template <typename idx_t>
__global__ void __launch_bounds__(kRouteThreads) group_by_choice_kernel(const idx_t* __restrict__ choice, int64_t B,
                                                                      int E, int64_t* __restrict__ order,
                                                                      int32_t* __restrict__ counts) {
  constexpr int kW = kRouteThreads / 32;
  __shared__ int hist[kMaxExperts];
  __shared__ int base[kMaxExperts];
  __shared__ int wcnt[kMaxExperts][kW];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  if (tid < E) hist[tid] = 0;
  __syncthreads();
  for (int64_t i = tid; i < B; i += kRouteThreads) {
    const int64_t c = (int64_t)choice[i];
    if (c >= 0 && c < E) atomicAdd(&hist[c], 1);
  }
  __syncthreads();
  if (tid == 0) {
    int run = 0;
    for (int e = 0; e < E; ++e) {
      base[e] = run;
      run += hist[e];
      counts[e] = hist[e];
    }
  }
  __syncthreads();
  for (int64_t c0 = 0; c0 < B; c0 += kRouteThreads) {
    for (int t = tid; t < E * kW; t += kRouteThreads) wcnt[t / kW][t % kW] = 0;
    __syncthreads();
    const int64_t i = c0 + tid;
    int c = -1;
    if (i < B) {
      const int64_t v = (int64_t)choice[i];
      c = (v >= 0 && v < E) ? (int)v : -1;
    }
    const unsigned same = __match_any_sync(0xffffffffu, c);
    const int rank = __popc(same & ((1u << lane) - 1u));
    if (c >= 0 && rank == 0) wcnt[c][warp] = __popc(same);
    __syncthreads();
    if (tid < E) {  // exclusive scan over the warps; the group's start moves past this chunk
      int run = base[tid];
      for (int w = 0; w < kW; ++w) {
        const int v = wcnt[tid][w];
        wcnt[tid][w] = run;
        run += v;
      }
      base[tid] = run;
    }
    __syncthreads();
    if (c >= 0) order[wcnt[c][warp] + rank] = i;
    __syncthreads();
  }
}

// Row moves of up to kMaxRowSources tensors at once, as raw bytes in the widest word that the row size
// and the base addresses allow (16 bytes for fp32 rows of a multiple of 4).
struct RowMoves {
  const char* src[kMaxRowSources];
  char* dst[kMaxRowSources];
  int64_t row_bytes[kMaxRowSources];
  int word[kMaxRowSources];
  int n;
};

template <typename W>
__device__ __forceinline__ void copy_bytes(const char* s, char* d, int64_t bytes) {
  const W* sw = reinterpret_cast<const W*>(s);
  W* dw = reinterpret_cast<W*>(d);
  for (int64_t t = threadIdx.x; t < bytes / (int64_t)sizeof(W); t += blockDim.x) dw[t] = sw[t];
}

struct alignas(16) Word16 {
  uint32_t v[4];
};
struct alignas(8) Word8 {
  uint32_t v[2];
};

// GATHER: dst_k[r] = src_k[idx[r]]; else (scatter): dst_k[idx[r]] = src_k[r]. One block per r. An
// index outside [0, bound) (bound: rows of src when gathering, of dst when scattering) is a device-side
// assert, as in torch's own index_select on CUDA (no silent partial result), and moves nothing.
template <bool GATHER>
__global__ void move_rows_kernel(RowMoves a, const int64_t* __restrict__ idx, int64_t bound) {
  const int64_t r = blockIdx.x, j = idx[r];
  CUDA_KERNEL_ASSERT(j >= 0 && j < bound && "gather_rows_multi / scatter_rows: idx out of range");
  if (j < 0 || j >= bound) return;
  const int64_t sr = GATHER ? j : r, dr = GATHER ? r : j;
  for (int k = 0; k < a.n; ++k) {
    const char* s = a.src[k] + sr * a.row_bytes[k];
    char* d = a.dst[k] + dr * a.row_bytes[k];
    switch (a.word[k]) {
      case 16: copy_bytes<Word16>(s, d, a.row_bytes[k]); break;
      case 8: copy_bytes<Word8>(s, d, a.row_bytes[k]); break;
      case 4: copy_bytes<uint32_t>(s, d, a.row_bytes[k]); break;
      case 2: copy_bytes<uint16_t>(s, d, a.row_bytes[k]); break;
      default: copy_bytes<uint8_t>(s, d, a.row_bytes[k]); break;
    }
  }
}

}  // namespace deqfuse

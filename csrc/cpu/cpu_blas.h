// Row-major GEMMs on raw pointers for the C++ CPU ops, called from inside at::parallel_for on one
// thread's block of rows (so the whole cell runs in one parallel region, each block in cache).
//
// The BLAS is the one PyTorch itself links (MKL on x86-64 wheels: libtorch_cpu exports the Fortran
// symbols sgemm_/dgemm_). They are declared weak: if this torch build does not export them, the
// pointers are null and the GEMMs go through at::mm on tensors wrapping the same memory (slower:
// dispatcher overhead per call, but the same result contract). blas_backend() says which is in use.
#pragma once
#include <ATen/ATen.h>

extern "C" {
void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const float* alpha,
            const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
            const int* ldc) __attribute__((weak));
void dgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k, const double* alpha,
            const double* a, const int* lda, const double* b, const int* ldb, const double* beta, double* c,
            const int* ldc) __attribute__((weak));
int MKL_Set_Num_Threads_Local(int n) __attribute__((weak));  // (MKL's C API; mkl_set_num_threads_local is its Fortran one)
}

namespace deqfuse {

// Makes this thread's BLAS calls single-threaded while it lives (a thread that is one of several working in
// parallel outside an OpenMP region: MKL would otherwise start a team of torch's thread count from it, and round
// by that team's blocking); the thread's previous setting comes back after.
class BlasSingleThread {
 public:
  BlasSingleThread() : prev_(MKL_Set_Num_Threads_Local ? MKL_Set_Num_Threads_Local(1) : 0) {}
  ~BlasSingleThread() {
    if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(prev_);
  }

 private:
  int prev_;
};

inline const char* blas_backend() { return (sgemm_ && dgemm_) ? "blas (sgemm_/dgemm_ of torch's BLAS)" : "at::mm"; }

// The one BLAS call: C[M, Nc] (row stride ldc) = beta * C + op(A) op(B), all row-major, op(A) [M, K],
// op(B) [K, Nc]; ta / tb: A is stored as [K, M] / B as [Nc, K] (row strides lda / ldb). All sizes are
// small enough for int (checked by the ops: B, D < 2^31).
template <typename T>
inline void gemm_rm(bool ta, bool tb, int64_t M, int64_t Nc, int64_t K, const T* A, int64_t lda, const T* B,
                    int64_t ldb, T beta, T* C, int64_t ldc) {
  if (M == 0 || Nc == 0) return;
  if (K == 0) {  // C = beta C
    for (int64_t r = 0; r < M; ++r)
      for (int64_t j = 0; j < Nc; ++j) C[r * ldc + j] = beta == (T)0 ? (T)0 : beta * C[r * ldc + j];
    return;
  }
  const int m = (int)Nc, n = (int)M, k = (int)K, la = (int)lda, lb = (int)ldb, lc = (int)ldc;
  const char cb = tb ? 'T' : 'N', ca = ta ? 'T' : 'N';
  const T one = 1;
  // column-major view: C^T [Nc, M] = op(B)^T [Nc, K] . op(A)^T [K, M]
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_) return sgemm_(&cb, &ca, &m, &n, &k, &one, B, &lb, A, &la, &beta, C, &lc);
  } else {
    if (dgemm_) return dgemm_(&cb, &ca, &m, &n, &k, &one, B, &lb, A, &la, &beta, C, &lc);
  }
  const auto opt = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor a = at::from_blob(const_cast<T*>(A), ta ? at::IntArrayRef{K, M} : at::IntArrayRef{M, K}, {lda, 1}, opt);
  at::Tensor b = at::from_blob(const_cast<T*>(B), tb ? at::IntArrayRef{Nc, K} : at::IntArrayRef{K, Nc}, {ldb, 1}, opt);
  at::Tensor c = at::from_blob(C, {M, Nc}, {ldc, 1}, opt);
  at::Tensor prod = at::mm(ta ? a.t() : a, tb ? b.t() : b);
  if (beta == (T)0) c.copy_(prod);
  else c.mul_(beta).add_(prod);
}

// C[M, Nc] (row stride ldc) = beta * C + A[M, K] (row stride lda) @ op(W), W row-major:
//   trans_w = true : op(W) = W^T with W [Nc, K]   (a Linear: y = a W^T)
//   trans_w = false: op(W) = W   with W [K, Nc]   (its VJP: da = dy W)
template <typename T>
inline void gemm_rows(int64_t M, int64_t Nc, int64_t K, const T* A, int64_t lda, const T* W, bool trans_w,
                      T beta, T* C, int64_t ldc) {
  gemm_rm<T>(false, trans_w, M, Nc, K, A, lda, W, trans_w ? K : Nc, beta, C, ldc);
}

// C[M, Nc] (row stride ldc) = beta * C + A^T B, with A [K, M] (row stride lda) and B [K, Nc] (row stride ldb)
// row-major: the weight gradient of a Linear over K rows (dW = dY^T X), or a slice of its output rows
// when A points at a column offset of dY.
template <typename T>
inline void gemm_tn(int64_t M, int64_t Nc, int64_t K, const T* A, int64_t lda, const T* B, int64_t ldb, T beta, T* C,
                    int64_t ldc) {
  gemm_rm<T>(true, false, M, Nc, K, A, lda, B, ldb, beta, C, ldc);
}

}  // namespace deqfuse

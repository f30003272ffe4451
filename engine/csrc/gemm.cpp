// Skinny matmul for decode steps: out[M, N] = x[M, K] @ w[N, K]^T for small M (a few to a few
// dozen rows), reading the weight rows in place (no packing pass over the weight, which is
// what makes small-M GEMM memory-bound work twice). Threads split the weight rows.
//
// Each output element is one 8-lane running sum over K followed by a fixed horizontal sum, so
// its value does not depend on M, on its row's neighbours or on the thread split: a sequence
// gets bit-identical results whether it decodes alone or in a batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

#include "simd.h"

#ifndef PF_TILES
#define PF_TILES 2
#endif

namespace {

#ifdef HM_AVX2
constexpr int64_t kPrefetchTiles = PF_TILES;

// Sums of a0..a3 (each 8 lanes) as one 4-lane vector [sum a0, sum a1, sum a2, sum a3].
inline __m128 hsum4x8(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 s01 = _mm256_hadd_ps(a0, a1);  // a0 pairs, a1 pairs (per 128-bit lane)
  const __m256 s23 = _mm256_hadd_ps(a2, a3);
  const __m256 s = _mm256_hadd_ps(s01, s23);  // per lane: [a0, a1, a2, a3] partials
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

inline float hsum1x8(__m256 a) {
  const __m128 s = hsum4x8(a, a, a, a);
  return _mm_cvtss_f32(s);
}

// At every 16th float of a pass over K: one cache line of each of the 4 weight rows at `pf`
// (the rows a later tile reads), or nothing when `pf` is null.
inline void prefetch_4_rows(const float* pf, int64_t K, int64_t k) {
  if (pf != nullptr && (k & 15) == 0) {
    _mm_prefetch(reinterpret_cast<const char*>(pf + k), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(pf + K + k), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(pf + 2 * K + k), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(pf + 3 * K + k), _MM_HINT_T0);
  }
}

// Rows n0..n0+3 of w against rows m0..m0+1 of x. `pf`: the next weight rows to prefetch
// (4 * K floats), or null.
inline void tile_4x2(const float* x0, const float* x1, const float* w0, int64_t K, float* o0, float* o1,
                     const float* pf) {
  const float* w1 = w0 + K;
  const float* w2 = w1 + K;
  const float* w3 = w2 + K;
  __m256 a00 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps(), a02 = _mm256_setzero_ps(), a03 = _mm256_setzero_ps();
  __m256 a10 = _mm256_setzero_ps(), a11 = _mm256_setzero_ps(), a12 = _mm256_setzero_ps(), a13 = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    prefetch_4_rows(pf, K, k);
    const __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
    const __m256 v2 = _mm256_loadu_ps(w2 + k), v3 = _mm256_loadu_ps(w3 + k);
    const __m256 u0 = _mm256_loadu_ps(x0 + k), u1 = _mm256_loadu_ps(x1 + k);
    a00 = _mm256_fmadd_ps(u0, v0, a00); a01 = _mm256_fmadd_ps(u0, v1, a01);
    a02 = _mm256_fmadd_ps(u0, v2, a02); a03 = _mm256_fmadd_ps(u0, v3, a03);
    a10 = _mm256_fmadd_ps(u1, v0, a10); a11 = _mm256_fmadd_ps(u1, v1, a11);
    a12 = _mm256_fmadd_ps(u1, v2, a12); a13 = _mm256_fmadd_ps(u1, v3, a13);
  }
  _mm_storeu_ps(o0, hsum4x8(a00, a01, a02, a03));
  _mm_storeu_ps(o1, hsum4x8(a10, a11, a12, a13));
}

// Rows n0..n0+3 of w (held in registers) against rows m0..m0+2 of x: twelve sums in flight.
inline void tile_4x3(const float* x0, const float* x1, const float* x2, const float* w0, int64_t K, float* o0,
                     float* o1, float* o2, const float* pf) {
  const float* w1 = w0 + K;
  const float* w2 = w1 + K;
  const float* w3 = w2 + K;
  __m256 a00 = _mm256_setzero_ps(), a01 = _mm256_setzero_ps(), a02 = _mm256_setzero_ps(), a03 = _mm256_setzero_ps();
  __m256 a10 = _mm256_setzero_ps(), a11 = _mm256_setzero_ps(), a12 = _mm256_setzero_ps(), a13 = _mm256_setzero_ps();
  __m256 a20 = _mm256_setzero_ps(), a21 = _mm256_setzero_ps(), a22 = _mm256_setzero_ps(), a23 = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    prefetch_4_rows(pf, K, k);
    const __m256 v0 = _mm256_loadu_ps(w0 + k), v1 = _mm256_loadu_ps(w1 + k);
    const __m256 v2 = _mm256_loadu_ps(w2 + k), v3 = _mm256_loadu_ps(w3 + k);
    __m256 u = _mm256_loadu_ps(x0 + k);
    a00 = _mm256_fmadd_ps(u, v0, a00); a01 = _mm256_fmadd_ps(u, v1, a01);
    a02 = _mm256_fmadd_ps(u, v2, a02); a03 = _mm256_fmadd_ps(u, v3, a03);
    u = _mm256_loadu_ps(x1 + k);
    a10 = _mm256_fmadd_ps(u, v0, a10); a11 = _mm256_fmadd_ps(u, v1, a11);
    a12 = _mm256_fmadd_ps(u, v2, a12); a13 = _mm256_fmadd_ps(u, v3, a13);
    u = _mm256_loadu_ps(x2 + k);
    a20 = _mm256_fmadd_ps(u, v0, a20); a21 = _mm256_fmadd_ps(u, v1, a21);
    a22 = _mm256_fmadd_ps(u, v2, a22); a23 = _mm256_fmadd_ps(u, v3, a23);
  }
  _mm_storeu_ps(o0, hsum4x8(a00, a01, a02, a03));
  _mm_storeu_ps(o1, hsum4x8(a10, a11, a12, a13));
  _mm_storeu_ps(o2, hsum4x8(a20, a21, a22, a23));
}

inline void tile_4x1(const float* x0, const float* w0, int64_t K, float* o0, const float* pf) {
  const float* w1 = w0 + K;
  const float* w2 = w1 + K;
  const float* w3 = w2 + K;
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) {
    prefetch_4_rows(pf, K, k);
    const __m256 u0 = _mm256_loadu_ps(x0 + k);
    a0 = _mm256_fmadd_ps(u0, _mm256_loadu_ps(w0 + k), a0);
    a1 = _mm256_fmadd_ps(u0, _mm256_loadu_ps(w1 + k), a1);
    a2 = _mm256_fmadd_ps(u0, _mm256_loadu_ps(w2 + k), a2);
    a3 = _mm256_fmadd_ps(u0, _mm256_loadu_ps(w3 + k), a3);
  }
  _mm_storeu_ps(o0, hsum4x8(a0, a1, a2, a3));
}

inline float dot_1x1(const float* x0, const float* w0, int64_t K) {
  __m256 a = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(x0 + k), _mm256_loadu_ps(w0 + k), a);
  return hsum1x8(a);
}
#endif

}  // namespace

bool skinny_linear_supported() {
#ifdef HM_AVX2
  return true;
#else
  return false;
#endif
}

// x [M, K] @ w[N, K]^T -> [M, N]; both contiguous float32, K a multiple of 8.
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K] and w [N, K] expected");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && w.scalar_type() == torch::kFloat32 && x.is_contiguous() &&
                  w.is_contiguous() && x.device().is_cpu() && w.device().is_cpu(),
              "x and w must be contiguous float32 CPU tensors");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
#ifdef HM_AVX2
  TORCH_CHECK(K % 8 == 0, "K must be a multiple of 8");
  auto out = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t n_tiles = N / 4;
  // rows of w per task: enough work (~32k multiply-adds) to be worth a thread
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(1, M * K / 4));
  at::parallel_for(0, n_tiles + (N % 4 ? 1 : 0), grain, [&](int64_t tb, int64_t te) {
    float tmp0[4], tmp1[4], tmp2[4];
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n0 = t * 4;
      if (n0 + 4 <= N) {
        const float* w0 = wp + n0 * K;
        // the first pass over these rows fetches the rows PF_TILES tiles ahead
        const float* pf = kPrefetchTiles > 0 && n0 + 4 * (kPrefetchTiles + 1) <= N ? w0 + 4 * kPrefetchTiles * K : nullptr;
        int64_t m = 0;
        for (; m + 3 <= M; m += 3) {
          tile_4x3(xp + m * K, xp + (m + 1) * K, xp + (m + 2) * K, w0, K, tmp0, tmp1, tmp2, m == 0 ? pf : nullptr);
          for (int j = 0; j < 4; ++j) {
            op[m * N + n0 + j] = tmp0[j];
            op[(m + 1) * N + n0 + j] = tmp1[j];
            op[(m + 2) * N + n0 + j] = tmp2[j];
          }
        }
        for (; m + 2 <= M; m += 2) {
          tile_4x2(xp + m * K, xp + (m + 1) * K, w0, K, tmp0, tmp1, m == 0 ? pf : nullptr);
          for (int j = 0; j < 4; ++j) {
            op[m * N + n0 + j] = tmp0[j];
            op[(m + 1) * N + n0 + j] = tmp1[j];
          }
        }
        if (m < M) {
          tile_4x1(xp + m * K, w0, K, tmp0, m == 0 ? pf : nullptr);
          for (int j = 0; j < 4; ++j) op[m * N + n0 + j] = tmp0[j];
        }
      } else {
        for (int64_t n = n0; n < N; ++n)
          for (int64_t m = 0; m < M; ++m) op[m * N + n] = dot_1x1(xp + m * K, wp + n * K, K);
      }
    }
  });
  return out;
#else
  TORCH_CHECK(false, "skinny_linear needs AVX2 + FMA; use torch.nn.functional.linear");
  return torch::Tensor();
#endif
}

// x [M, K] @ w[N, K]^T -> [M, N] for many rows (prefill chunks): the weight's rows are split
// into one contiguous share per thread, each multiplied by a single-threaded BLAS GEMM into its
// columns of the output. For these shapes that beats letting the BLAS split one GEMM itself.
torch::Tensor split_linear(torch::Tensor x, torch::Tensor w) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K] and w [N, K] expected");
  const int64_t M = x.size(0), N = w.size(0);
  const int64_t parts = std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(1, N / 64));
  if (parts <= 1) return at::linear(x, w);
  auto out = torch::empty({M, N}, x.options());
  at::parallel_for(0, parts, 1, [&](int64_t b, int64_t e) {
    c10::InferenceMode guard;  // (worker threads do not inherit the caller's mode)
    for (int64_t i = b; i < e; ++i) {
      const int64_t c0 = N * i / parts / 16 * 16, c1 = i + 1 == parts ? N : N * (i + 1) / parts / 16 * 16;
      auto o = out.narrow(1, c0, c1 - c0);
      at::mm_out(o, x, w.narrow(0, c0, c1 - c0).t());
    }
  });
  return out;
}

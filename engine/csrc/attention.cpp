// Paged attention kernels for the CPU, read straight from the KV blocks (float32 or bfloat16;
// the math is fp32 either way).
//
// The cache of one layer is the strided view [num_blocks, block_size, kv_heads, head_dim] of
// the node's KV region (layout [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]):
// rows inside a block are contiguous, blocks are `stride(0)` floats apart. Nothing is gathered.
//
// decode_attention: one query token per sequence. Work is split over (sequence, kv head);
// each task scores its group of query heads against every key of the sequence, takes the
// softmax over those scores, then sums the values -- K and V are each read once. When there
// are too few such tasks to share evenly among the threads (batch 1: 3 kv heads on 2 threads),
// each task's keys are split into ranges on different threads and the partial results
// combined (flash-decoding's split-K: each range keeps its own max, rescaled at the end).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

// Fewer key-head dot products than this in a decode step: no split (see decode_splits).
constexpr int64_t kSplitMinWork = 2048;

#ifdef HM_AVX2
using hm::exp8;
using hm::hsum8;
#endif

// In place: p[i] = exp(p[i] - max) for i < n (entries up to the next multiple of 8 must be
// writable; they hold -inf-like padding). Returns the sum over i < n; the max goes to *max_out.
inline float softmax_numerators(float* p, int64_t n, int64_t n_pad, float* max_out) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, p[i]);
  *max_out = m;
#ifdef HM_AVX2
  for (int64_t i = n; i < n_pad; ++i) p[i] = -1e30f;
  const __m256 vm = _mm256_set1_ps(m);
  __m256 acc = _mm256_setzero_ps();
  for (int64_t i = 0; i < n_pad; i += 8) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + i), vm));
    _mm256_storeu_ps(p + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  return hsum8(acc);  // the padding adds < 1e-37 to a sum >= 1
#else
  (void)n_pad;
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    p[i] = std::exp(p[i] - m);
    s += p[i];
  }
  return s;
#endif
}

#ifdef HM_AVX512
// attend_range's phases 1 and 3 for head_dim 64 in 512-bit registers, each key / value row
// widened once for all `group` query heads (the 256-bit path widens it once per head), with
// the same arithmetic: a score's two 8-lane partial sums (dims 0-7, 16-23, 32-39, 48-55 and
// 8-15, 24-31, 40-47, 56-63, each in that order) are the low and high halves of one 16-lane
// sum, added and reduced as hsum8; each value dimension accumulates p_t * v_t in token order.
template <typename T>
inline void scores64(const float* q, int64_t q_head_stride, const T* kb, int64_t row_stride, int64_t tn,
                     int64_t group, float scale, float* s0, int64_t n_pad) {
  for (int64_t t = 0; t < tn; ++t) {
    const T* kt = kb + t * row_stride;
    const __m512 k0 = hm::load16(kt), k1 = hm::load16(kt + 16), k2 = hm::load16(kt + 32), k3 = hm::load16(kt + 48);
    for (int64_t j = 0; j < group; ++j) {
      const float* qj = q + j * q_head_stride;
      __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qj), k0);
      a = _mm512_fmadd_ps(_mm512_loadu_ps(qj + 16), k1, a);
      a = _mm512_fmadd_ps(_mm512_loadu_ps(qj + 32), k2, a);
      a = _mm512_fmadd_ps(_mm512_loadu_ps(qj + 48), k3, a);
      const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
      s0[j * n_pad + t] = hsum8(_mm256_add_ps(_mm512_castps512_ps256(a), hi)) * scale;
    }
  }
}

// acc[j * 64 ..] += sum_t p[j][t] v_t for query heads j < JN (p: j's row of n_pad scores at pj0).
template <int JN, typename T>
inline void values64(const float* pj0, int64_t n_pad, const T* vb, int64_t row_stride, int64_t tn, float* acc) {
  __m512 r[JN][4];
  for (int j = 0; j < JN; ++j)
    for (int c = 0; c < 4; ++c) r[j][c] = _mm512_loadu_ps(acc + j * 64 + 16 * c);
  for (int64_t t = 0; t < tn; ++t) {
    const T* vt = vb + t * row_stride;
    const __m512 v0 = hm::load16(vt), v1 = hm::load16(vt + 16), v2 = hm::load16(vt + 32), v3 = hm::load16(vt + 48);
    for (int j = 0; j < JN; ++j) {
      const __m512 p = _mm512_set1_ps(pj0[j * n_pad + t]);
      r[j][0] = _mm512_fmadd_ps(p, v0, r[j][0]);
      r[j][1] = _mm512_fmadd_ps(p, v1, r[j][1]);
      r[j][2] = _mm512_fmadd_ps(p, v2, r[j][2]);
      r[j][3] = _mm512_fmadd_ps(p, v3, r[j][3]);
    }
  }
  for (int j = 0; j < JN; ++j)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(acc + j * 64 + 16 * c, r[j][c]);
}
#endif

// One (sequence, kv head) task over the cached tokens of blocks [b_begin, b_end) (the last
// block holding up to token `ctx`): `group` query heads score those keys, take softmax
// numerators against the range's own max, and sum the values -- K and V are each read once.
// Leaves per head j: acc[j * hd ..] = sum_t exp(s_jt - mx[j]) v_t and sum[j] = sum_t exp(s_jt - mx[j]).
// T: the cache's element type (float or c10::BFloat16); the math is fp32 either way.
template <typename T>
void attend_range(const float* q, int64_t q_head_stride, const T* k_base, const T* v_base, int64_t block_stride,
                  int64_t row_stride, const int64_t* table, int64_t block_size, int64_t b_begin, int64_t b_end,
                  int64_t ctx, int64_t group, int64_t hd, float scale, std::vector<float>& scratch, float* acc,
                  float* mx, float* sum) {
  const int64_t first = b_begin * block_size;
  const int64_t n = std::min(b_end * block_size, ctx) - first;
  const int64_t n_pad = (n + 7) / 8 * 8;
  scratch.resize(static_cast<size_t>(group * n_pad));
  float* scores = scratch.data();

  // 1. scores[j][t] = scale * q_j . k_t
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t t0 = b * block_size - first;
    const int64_t tn = std::min(block_size, n - t0);
    const T* kb = k_base + table[b] * block_stride;
#ifdef HM_AVX512
    if (hd == 64) {
      scores64(q, q_head_stride, kb, row_stride, tn, group, scale, scores + t0, n_pad);
      continue;
    }
#endif
    for (int64_t j = 0; j < group; ++j) {
      const float* qj = q + j * q_head_stride;
      float* sj = scores + j * n_pad + t0;
#ifdef HM_AVX2
      if (hd % 8 == 0) {
        for (int64_t t = 0; t < tn; ++t) {
          const T* kt = kb + t * row_stride;
          __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(qj), hm::load8(kt));
          __m256 a1 = _mm256_setzero_ps();
          int64_t d = 8;
          for (; d + 8 < hd; d += 16) {
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + d), hm::load8(kt + d), a1);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + d + 8), hm::load8(kt + d + 8), a0);
          }
          for (; d < hd; d += 8) a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + d), hm::load8(kt + d), a1);
          sj[t] = hsum8(_mm256_add_ps(a0, a1)) * scale;
        }
        continue;
      }
#endif
      for (int64_t t = 0; t < tn; ++t) {
        const T* kt = kb + t * row_stride;
        float s = 0.f;
        for (int64_t d = 0; d < hd; ++d) s += qj[d] * hm::to_f(kt[d]);
        sj[t] = s * scale;
      }
    }
  }

  // 2. softmax numerators and their sums
  for (int64_t j = 0; j < group; ++j) sum[j] = softmax_numerators(scores + j * n_pad, n, n_pad, mx + j);

  // 3. acc[j] = sum_t p[j][t] * v_t
  std::fill(acc, acc + group * hd, 0.f);
  for (int64_t b = b_begin; b < b_end; ++b) {
    const int64_t t0 = b * block_size - first;
    const int64_t tn = std::min(block_size, n - t0);
    const T* vb = v_base + table[b] * block_stride;
#ifdef HM_AVX512
    if (hd == 64) {
      for (int64_t j0 = 0; j0 < group; j0 += 4) {  // up to 4 heads' sums (16 registers) at a time
        const float* pj0 = scores + j0 * n_pad + t0;
        float* aj0 = acc + j0 * hd;
        switch (std::min<int64_t>(4, group - j0)) {
          case 4: values64<4>(pj0, n_pad, vb, row_stride, tn, aj0); break;
          case 3: values64<3>(pj0, n_pad, vb, row_stride, tn, aj0); break;
          case 2: values64<2>(pj0, n_pad, vb, row_stride, tn, aj0); break;
          default: values64<1>(pj0, n_pad, vb, row_stride, tn, aj0); break;
        }
      }
      continue;
    }
#endif
    for (int64_t j = 0; j < group; ++j) {
      const float* pj = scores + j * n_pad + t0;
      float* aj = acc + j * hd;
#ifdef HM_AVX2
      if (hd == 64) {  // the whole row in eight registers
        __m256 r[8];
        for (int c = 0; c < 8; ++c) r[c] = _mm256_loadu_ps(aj + 8 * c);
        for (int64_t t = 0; t < tn; ++t) {
          const T* vt = vb + t * row_stride;
          const __m256 p = _mm256_set1_ps(pj[t]);
          for (int c = 0; c < 8; ++c) r[c] = _mm256_fmadd_ps(p, hm::load8(vt + 8 * c), r[c]);
        }
        for (int c = 0; c < 8; ++c) _mm256_storeu_ps(aj + 8 * c, r[c]);
        continue;
      }
#endif
      for (int64_t t = 0; t < tn; ++t) {
        const T* vt = vb + t * row_stride;
        const float p = pj[t];
        for (int64_t d = 0; d < hd; ++d) aj[d] += p * hm::to_f(vt[d]);
      }
    }
  }
}

// `attend_range` over all `ctx` tokens, normalized into out[j * out_head_stride ..].
template <typename T>
void attend_one(const float* q, int64_t q_head_stride, float* out, int64_t out_head_stride, const T* k_base,
                const T* v_base, int64_t block_stride, int64_t row_stride, const int64_t* table, int64_t block_size,
                int64_t ctx, int64_t group, int64_t hd, float scale, std::vector<float>& scratch) {
  thread_local std::vector<float> part;
  part.resize(static_cast<size_t>(group * hd + 2 * group));
  float *acc = part.data(), *mx = acc + group * hd, *sum = mx + group;
  attend_range(q, q_head_stride, k_base, v_base, block_stride, row_stride, table, block_size, 0,
               (ctx + block_size - 1) / block_size, ctx, group, hd, scale, scratch, acc, mx, sum);
  for (int64_t j = 0; j < group; ++j) {
    const float inv = 1.f / sum[j];
    for (int64_t d = 0; d < hd; ++d) out[j * out_head_stride + d] = acc[j * hd + d] * inv;
  }
}

#ifdef HM_AVX2
// Prefill: four query rows of one head (rows sorted by context length `clen`; a short block
// repeats its last row) against keys [0, clen[3]) of one kv head. head_dim % 16 == 0.
// Scores are kept as [key][row] so one 8-lane vector holds two keys of all four rows.
template <typename T>
void attend_rows4(const float* const q[4], float* const o[4], int nrows, const int64_t clen[4],
                  const T* k_base, const T* v_base, int64_t block_stride, int64_t row_stride,
                  const int64_t* table, int64_t block_size, int64_t hd, float scale, std::vector<float>& scratch) {
  const int64_t cmax = clen[3];
  const int64_t npad = (cmax + 1) / 2 * 2;
  scratch.resize(static_cast<size_t>(npad * 4));
  float* S = scratch.data();
  const int64_t nblocks = (cmax + block_size - 1) / block_size;

  // 1. S[t][r] = scale * q_r . k_t, two keys at a time (eight independent sums in flight)
  const __m256 vscale = _mm256_set1_ps(scale);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t t0 = b * block_size, tn = std::min(block_size, cmax - t0);
    const T* kb = k_base + table[b] * block_stride;
    int64_t t = 0;
    for (; t + 2 <= tn; t += 2) {
      const T* ka = kb + t * row_stride;
      const T* kc = ka + row_stride;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps(), b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
      for (int64_t d = 0; d < hd; d += 8) {
        const __m256 x = hm::load8(ka + d), y = hm::load8(kc + d);
        __m256 qv = _mm256_loadu_ps(q[0] + d);
        a0 = _mm256_fmadd_ps(qv, x, a0); b0 = _mm256_fmadd_ps(qv, y, b0);
        qv = _mm256_loadu_ps(q[1] + d);
        a1 = _mm256_fmadd_ps(qv, x, a1); b1 = _mm256_fmadd_ps(qv, y, b1);
        qv = _mm256_loadu_ps(q[2] + d);
        a2 = _mm256_fmadd_ps(qv, x, a2); b2 = _mm256_fmadd_ps(qv, y, b2);
        qv = _mm256_loadu_ps(q[3] + d);
        a3 = _mm256_fmadd_ps(qv, x, a3); b3 = _mm256_fmadd_ps(qv, y, b3);
      }
      // lanes: [a0 a1 a2 a3 | b0 b1 b2 b3] = S[t][0..3], S[t+1][0..3]
      const __m256 sa = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
      const __m256 sb = _mm256_hadd_ps(_mm256_hadd_ps(b0, b1), _mm256_hadd_ps(b2, b3));
      const __m256 lo = _mm256_permute2f128_ps(sa, sb, 0x20), hi = _mm256_permute2f128_ps(sa, sb, 0x31);
      _mm256_storeu_ps(S + 4 * (t0 + t), _mm256_mul_ps(_mm256_add_ps(lo, hi), vscale));
    }
    for (; t < tn; ++t) {
      const T* kt = kb + t * row_stride;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
      for (int64_t d = 0; d < hd; d += 8) {
        const __m256 x = hm::load8(kt + d);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q[0] + d), x, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q[1] + d), x, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(q[2] + d), x, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(q[3] + d), x, a3);
      }
      const __m256 sa = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
      const __m128 r4 = _mm_add_ps(_mm256_castps256_ps128(sa), _mm256_extractf128_ps(sa, 1));
      _mm_storeu_ps(S + 4 * (t0 + t), _mm_mul_ps(r4, _mm256_castps256_ps128(vscale)));
    }
  }
  // 2. softmax numerators per row; keys past a row's length (and the pad) count as zero
  for (int r = 0; r < 4; ++r)
    for (int64_t t = clen[r]; t < npad; ++t) S[4 * t + r] = -1e30f;
  __m256 vmax = _mm256_loadu_ps(S);
  for (int64_t i = 8; i < 4 * npad; i += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(S + i));
  const __m256 vm = _mm256_max_ps(vmax, _mm256_permute2f128_ps(vmax, vmax, 0x01));  // rows r and r + 4 lanes
  for (int64_t i = 0; i < 4 * npad; i += 8) _mm256_storeu_ps(S + i, exp8(_mm256_sub_ps(_mm256_loadu_ps(S + i), vm)));
  for (int r = 0; r < 4; ++r)
    for (int64_t t = clen[r]; t < npad; ++t) S[4 * t + r] = 0.f;
  __m256 vsum = _mm256_setzero_ps();
  for (int64_t i = 0; i < 4 * npad; i += 8) vsum = _mm256_add_ps(vsum, _mm256_loadu_ps(S + i));
  float l[8];
  _mm256_storeu_ps(l, vsum);
  float inv[4];
  for (int r = 0; r < 4; ++r) inv[r] = 1.f / (l[r] + l[r + 4]);

  // 3. o_r = sum_t p[t][r] v_t / l_r, sixteen dims at a time
  for (int64_t d = 0; d < hd; d += 16) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    for (int64_t b = 0; b < nblocks; ++b) {
      const int64_t t0 = b * block_size, tn = std::min(block_size, cmax - t0);
      const T* vb = v_base + table[b] * block_stride + d;
      for (int64_t t = 0; t < tn; ++t) {
        const T* vt = vb + t * row_stride;
        const float* pt = S + 4 * (t0 + t);
        const __m256 v0 = hm::load8(vt), v1 = hm::load8(vt + 8);
        __m256 p = _mm256_broadcast_ss(pt);
        c00 = _mm256_fmadd_ps(p, v0, c00); c01 = _mm256_fmadd_ps(p, v1, c01);
        p = _mm256_broadcast_ss(pt + 1);
        c10 = _mm256_fmadd_ps(p, v0, c10); c11 = _mm256_fmadd_ps(p, v1, c11);
        p = _mm256_broadcast_ss(pt + 2);
        c20 = _mm256_fmadd_ps(p, v0, c20); c21 = _mm256_fmadd_ps(p, v1, c21);
        p = _mm256_broadcast_ss(pt + 3);
        c30 = _mm256_fmadd_ps(p, v0, c30); c31 = _mm256_fmadd_ps(p, v1, c31);
      }
    }
    const __m256 c[4][2] = {{c00, c01}, {c10, c11}, {c20, c21}, {c30, c31}};
    for (int r = 0; r < nrows; ++r) {
      const __m256 f = _mm256_set1_ps(inv[r]);
      _mm256_storeu_ps(o[r] + d, _mm256_mul_ps(c[r][0], f));
      _mm256_storeu_ps(o[r] + d + 8, _mm256_mul_ps(c[r][1], f));
    }
  }
}
#endif

void check_kv_cache(const torch::Tensor& c, const char* name) {
  TORCH_CHECK(c.dim() == 4 && (c.scalar_type() == torch::kFloat32 || c.scalar_type() == torch::kBFloat16) &&
                  c.device().is_cpu(),
              name, " must be a float32 or bfloat16 CPU tensor [num_blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(c.stride(3) == 1 && c.stride(2) == c.size(3) && c.stride(1) == c.size(2) * c.size(3),
              name, ": each block's rows must be contiguous");
}

// What both attention kernels need of their query, output and cache tensors.
void check_attention_operands(const torch::Tensor& out, const torch::Tensor& q, const torch::Tensor& k_cache,
                              const torch::Tensor& v_cache) {
  check_kv_cache(k_cache, "k_cache");
  check_kv_cache(v_cache, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "k_cache and v_cache must have the same shape, strides and dtype");
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.stride(2) == 1, "q must be float32 [n, heads, head_dim]");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == torch::kFloat32 && out.stride(2) == 1,
              "out must be float32 shaped like q");
}

// f(T()) with T the cache's element type: float or c10::BFloat16.
template <typename F>
void dispatch_kv(const torch::Tensor& cache, F&& f) {
  if (cache.scalar_type() == torch::kBFloat16) {
    f(c10::BFloat16());
  } else {
    f(0.f);
  }
}

}  // namespace

// How many key ranges each (sequence, kv head) task of a decode step is split into, so that
// every thread gets the same share: 1 when the tasks already spread evenly over the threads,
// when there are plenty of them, or when the step is too small to be worth waking the
// others for; else enough ranges (of >= 4 blocks each) for tasks x splits to fill the threads.
static int64_t decode_splits(int64_t tasks, int64_t work, const int64_t* lens, int64_t n, int64_t block_size) {
  const int64_t threads = at::get_num_threads();
  if (threads < 2 || work < kSplitMinWork || tasks % threads == 0 || tasks >= 8 * threads) return 1;
  int64_t min_blocks = std::numeric_limits<int64_t>::max();
  for (int64_t s = 0; s < n; ++s) min_blocks = std::min(min_blocks, (lens[s] + block_size - 1) / block_size);
  int64_t a = tasks, b = threads;
  while (b) std::swap(a %= b, b);  // a = gcd(tasks, threads)
  return std::max<int64_t>(1, std::min(threads / a, min_blocks / 4));
}

// Item i of a decode step's attention: split i % splits of the keys of task i / splits (sequence
// s, kv head g), its partial result (group x head_dim sums, group maxima, group sums) into `pr`.
// q: sequence s's rows at q + s * q_s (heads q_h apart).
template <typename T>
void decode_item(int64_t i, int64_t splits, int64_t kvh, int64_t group, int64_t hd, const float* q, int64_t q_s,
                 int64_t q_h, const T* kp, const T* vp, int64_t bstride, int64_t rstride, const int64_t* tables,
                 int64_t max_blocks, const int64_t* lens, int64_t block_size, float scale, std::vector<float>& scratch,
                 float* pr) {
  const int64_t task = i / splits, sp = i % splits;
  const int64_t s = task / kvh, g = task % kvh;
  const int64_t nblocks = (lens[s] + block_size - 1) / block_size;
  const int64_t per = (nblocks + splits - 1) / splits;
  const int64_t b0 = std::min(nblocks, sp * per), b1 = std::min(nblocks, b0 + per);
  if (b0 == b1) {  // an empty range: weight 0 in the combination
    std::fill(pr, pr + group * hd, 0.f);
    std::fill(pr + group * hd, pr + group * hd + group, -std::numeric_limits<float>::infinity());
    std::fill(pr + group * hd + group, pr + group * hd + 2 * group, 0.f);
    return;
  }
  attend_range(q + s * q_s + g * group * q_h, q_h, kp + g * hd, vp + g * hd, bstride, rstride,
               tables + s * max_blocks, block_size, b0, b1, lens[s], group, hd, scale, scratch, pr, pr + group * hd,
               pr + group * hd + group);
}

// The split of the keys of a sequence with `len` tokens that holds its last block.
inline int64_t last_split(int64_t len, int64_t block_size, int64_t splits) {
  const int64_t nblocks = (len + block_size - 1) / block_size;
  return (nblocks - 1) / ((nblocks + splits - 1) / splits);
}

// One task's output heads (o: its first query head, heads o_h apart) from its splits' partial
// results p0 (`part` floats each): out = sum_i exp(mx_i - M) acc_i / sum_i exp(mx_i - M) sum_i
// (M: their max).
inline void combine_task(const float* p0, int64_t splits, int64_t group, int64_t hd, float* o, int64_t o_h) {
  const int64_t part = group * hd + 2 * group;
  for (int64_t j = 0; j < group; ++j) {
    float* oj = o + j * o_h;
    if (splits == 1) {
      const float inv = 1.f / p0[group * hd + group + j];
      for (int64_t d = 0; d < hd; ++d) oj[d] = p0[j * hd + d] * inv;
      continue;
    }
    float M = -std::numeric_limits<float>::infinity();
    for (int64_t sp = 0; sp < splits; ++sp) M = std::max(M, p0[sp * part + group * hd + j]);
    float l = 0.f;
    std::fill(oj, oj + hd, 0.f);
    for (int64_t sp = 0; sp < splits; ++sp) {
      const float* pr = p0 + sp * part;
      const float m = pr[group * hd + j];
      if (m == -std::numeric_limits<float>::infinity()) continue;
      const float w = std::exp(m - M);
      l += w * pr[group * hd + group + j];
      for (int64_t d = 0; d < hd; ++d) oj[d] += w * pr[j * hd + d];
    }
    const float inv = 1.f / l;
    for (int64_t d = 0; d < hd; ++d) oj[d] *= inv;
  }
}

// out[s, h] = softmax(scale * q[s, h] . K_s) V_s over the first context_lens[s] tokens of
// sequence s, whose blocks are block_tables[s]. q, out: [n, heads, head_dim] (rows may be
// strided, the last dim contiguous).
void decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                      torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  check_attention_operands(out, q, k_cache, v_cache);
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.scalar_type() == torch::kInt64 && block_tables.is_contiguous(),
              "block_tables must be contiguous int64 [n, max_blocks]");
  TORCH_CHECK(context_lens.dim() == 1 && context_lens.scalar_type() == torch::kInt64 && context_lens.is_contiguous(),
              "context_lens must be contiguous int64 [n]");
  const int64_t n = q.size(0), heads = q.size(1), hd = q.size(2);
  const int64_t nb = k_cache.size(0), block_size = k_cache.size(1), kvh = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == hd, "head_dim of q and cache differ");
  TORCH_CHECK(heads % kvh == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(block_tables.size(0) == n && context_lens.size(0) == n, "one table row and length per query");
  const int64_t max_blocks = block_tables.size(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  int64_t total = 0;
  for (int64_t s = 0; s < n; ++s) {
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= max_blocks * block_size, "context length ", lens[s],
                " out of range for ", max_blocks, " blocks");
    for (int64_t b = 0; b < (lens[s] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tables[s * max_blocks + b] >= 0 && tables[s * max_blocks + b] < nb, "block id out of range");
    total += lens[s];
  }
  const int64_t group = heads / kvh;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t tasks = n * kvh;
  const int64_t splits = decode_splits(tasks, total * heads, lens, n, block_size);
  // Partial results of each (task, split): group x head_dim sums, then group maxima and group sums.
  const int64_t part = group * hd + 2 * group;
  std::vector<float> parts(static_cast<size_t>(tasks * splits * part));
  dispatch_kv(k_cache, [&](auto tag) {
    using T = decltype(tag);
    const T* kp = static_cast<const T*>(k_cache.data_ptr());
    const T* vp = static_cast<const T*>(v_cache.data_ptr());
    const int64_t q_s = q.stride(0), q_h = q.stride(1);
    const int64_t bstride = k_cache.stride(0), rstride = k_cache.stride(1);
    // Below ~64k key-head dot products a layer's attention takes a few tens of microseconds:
    // cheaper on one thread than waking the others (unless it was split across them).
    const int64_t grain = splits == 1 && total * heads < 65536 ? tasks : 1;
    at::parallel_for(0, tasks * splits, grain, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> scratch;
      for (int64_t i = begin; i < end; ++i)
        decode_item(i, splits, kvh, group, hd, qp, q_s, q_h, kp, vp, bstride, rstride, tables, max_blocks, lens,
                    block_size, static_cast<float>(scale), scratch, parts.data() + i * part);
    });
  });
  const int64_t o_s = out.stride(0), o_h = out.stride(1);
  for (int64_t task = 0; task < tasks; ++task)
    combine_task(parts.data() + task * splits * part, splits, group, hd,
                 op + (task / kvh) * o_s + (task % kvh) * group * o_h, o_h);
}

// One prefill chunk: q [n, heads, head_dim] are the last n of `context_len` tokens whose K/V are
// already in the blocks `block_table`; row i attends causally to tokens [0, context_len - n + i].
void prefill_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                       torch::Tensor block_table, int64_t context_len, double scale) {
  check_attention_operands(out, q, k_cache, v_cache);
  TORCH_CHECK(block_table.dim() == 1 && block_table.scalar_type() == torch::kInt64 && block_table.is_contiguous(),
              "block_table must be contiguous int64 [num_blocks]");
  const int64_t n = q.size(0), heads = q.size(1), hd = q.size(2);
  const int64_t nb = k_cache.size(0), block_size = k_cache.size(1), kvh = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == hd && heads % kvh == 0, "q does not fit the cache's heads");
  const int64_t past = context_len - n;
  TORCH_CHECK(n >= 1 && past >= 0 && context_len <= block_table.size(0) * block_size,
              "context length ", context_len, " does not fit ", n, " queries and ", block_table.size(0), " blocks");
  const int64_t* table = block_table.data_ptr<int64_t>();
  for (int64_t b = 0; b < (context_len + block_size - 1) / block_size; ++b)
    TORCH_CHECK(table[b] >= 0 && table[b] < nb, "block id out of range");
  const int64_t group = heads / kvh;
  const float* qp = q.data_ptr<float>();
  float* op = out.data_ptr<float>();
  dispatch_kv(k_cache, [&](auto tag) {
    using T = decltype(tag);
    const T* kp = static_cast<const T*>(k_cache.data_ptr());
    const T* vp = static_cast<const T*>(v_cache.data_ptr());
    const int64_t q_s = q.stride(0), q_h = q.stride(1), o_s = out.stride(0), o_h = out.stride(1);
    const int64_t bstride = k_cache.stride(0), rstride = k_cache.stride(1);
    const float sc = static_cast<float>(scale);
#ifdef HM_AVX2
    if (hd % 16 == 0) {
      const int64_t nrb = (n + 3) / 4;
      // Tasks (row block, head); row blocks in the order 0, last, 1, last-1, ... so that each
      // thread's contiguous share holds as many long rows as short ones.
      at::parallel_for(0, nrb * heads, 1, [&](int64_t begin, int64_t end) {
        thread_local std::vector<float> scratch;
        for (int64_t task = begin; task < end; ++task) {
          const int64_t k = task / heads, h = task % heads;
          const int64_t rb = (k % 2 == 0) ? k / 2 : nrb - 1 - k / 2;
          const int64_t r0 = rb * 4;
          const int nrows = static_cast<int>(std::min<int64_t>(4, n - r0));
          const float* qr[4];
          float* orow[4];
          int64_t clen[4];
          for (int r = 0; r < 4; ++r) {
            const int64_t i = r0 + std::min(r, nrows - 1);
            qr[r] = qp + i * q_s + h * q_h;
            orow[r] = op + i * o_s + h * o_h;
            clen[r] = past + i + 1;
          }
          const int64_t g = h / group;
          attend_rows4(qr, orow, nrows, clen, kp + g * hd, vp + g * hd, bstride, rstride, table, block_size, hd,
                       sc, scratch);
        }
      });
      return;
    }
#endif
    at::parallel_for(0, n * kvh, 1, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> scratch;
      for (int64_t task = begin; task < end; ++task) {
        const int64_t i = task / kvh, g = task % kvh;
        attend_one(qp + i * q_s + g * group * q_h, q_h, op + i * o_s + g * group * o_h, o_h, kp + g * hd,
                   vp + g * hd, bstride, rstride, table, block_size, past + i + 1, group, hd, sc, scratch);
      }
    });
  });
}

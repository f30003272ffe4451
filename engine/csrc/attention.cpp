// Paged attention kernels for the CPU (fp32), read straight from the KV blocks.
//
// The cache of one layer is the strided view [num_blocks, block_size, kv_heads, head_dim] of
// the node's KV region (layout [num_blocks, num_layers, 2, block_size, kv_heads, head_dim]):
// rows inside a block are contiguous, blocks are `stride(0)` floats apart. Nothing is gathered.
//
// decode_attention: one query token per sequence. Work is split over (sequence, kv head);
// each task scores its group of query heads against every key of the sequence, takes the
// softmax over those scores, then sums the values -- K and V are each read once.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "simd.h"

namespace {

#ifdef HM_AVX2
using hm::exp8;
using hm::hsum8;
#endif

// In place: p[i] = exp(p[i] - max) for i < n (entries up to the next multiple of 8 must be
// writable; they hold -inf-like padding). Returns the sum over i < n.
inline float softmax_numerators(float* p, int64_t n, int64_t n_pad) {
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t i = 0; i < n; ++i) m = std::max(m, p[i]);
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

// One (sequence, kv head) task: `group` query heads attend over `ctx` cached tokens.
void attend_one(const float* q, int64_t q_head_stride, float* out, int64_t out_head_stride,
                const float* k_base, const float* v_base, int64_t block_stride, int64_t row_stride,
                const int64_t* table, int64_t block_size, int64_t ctx, int64_t group, int64_t hd,
                float scale, std::vector<float>& scratch) {
  const int64_t n_pad = (ctx + 7) / 8 * 8;
  scratch.resize(static_cast<size_t>(group * n_pad + group * hd));
  float* scores = scratch.data();
  float* acc = scores + group * n_pad;
  const int64_t nblocks = (ctx + block_size - 1) / block_size;

  // 1. scores[j][t] = scale * q_j . k_t
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t t0 = b * block_size;
    const int64_t tn = std::min(block_size, ctx - t0);
    const float* kb = k_base + table[b] * block_stride;
    for (int64_t j = 0; j < group; ++j) {
      const float* qj = q + j * q_head_stride;
      float* sj = scores + j * n_pad + t0;
#ifdef HM_AVX2
      if (hd % 8 == 0) {
        for (int64_t t = 0; t < tn; ++t) {
          const float* kt = kb + t * row_stride;
          __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(qj), _mm256_loadu_ps(kt));
          __m256 a1 = _mm256_setzero_ps();
          int64_t d = 8;
          for (; d + 8 < hd; d += 16) {
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + d), _mm256_loadu_ps(kt + d), a1);
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + d + 8), _mm256_loadu_ps(kt + d + 8), a0);
          }
          for (; d < hd; d += 8) a1 = _mm256_fmadd_ps(_mm256_loadu_ps(qj + d), _mm256_loadu_ps(kt + d), a1);
          sj[t] = hsum8(_mm256_add_ps(a0, a1)) * scale;
        }
        continue;
      }
#endif
      for (int64_t t = 0; t < tn; ++t) {
        const float* kt = kb + t * row_stride;
        float s = 0.f;
        for (int64_t d = 0; d < hd; ++d) s += qj[d] * kt[d];
        sj[t] = s * scale;
      }
    }
  }

  // 2. softmax numerators and their sums
  std::vector<float> inv(static_cast<size_t>(group));
  for (int64_t j = 0; j < group; ++j) inv[j] = 1.f / softmax_numerators(scores + j * n_pad, ctx, n_pad);

  // 3. acc[j] = sum_t p[j][t] * v_t
  std::fill(acc, acc + group * hd, 0.f);
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t t0 = b * block_size;
    const int64_t tn = std::min(block_size, ctx - t0);
    const float* vb = v_base + table[b] * block_stride;
    for (int64_t j = 0; j < group; ++j) {
      const float* pj = scores + j * n_pad + t0;
      float* aj = acc + j * hd;
#ifdef HM_AVX2
      if (hd == 64) {  // the whole row in eight registers
        __m256 r[8];
        for (int c = 0; c < 8; ++c) r[c] = _mm256_loadu_ps(aj + 8 * c);
        for (int64_t t = 0; t < tn; ++t) {
          const float* vt = vb + t * row_stride;
          const __m256 p = _mm256_set1_ps(pj[t]);
          for (int c = 0; c < 8; ++c) r[c] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vt + 8 * c), r[c]);
        }
        for (int c = 0; c < 8; ++c) _mm256_storeu_ps(aj + 8 * c, r[c]);
        continue;
      }
#endif
      for (int64_t t = 0; t < tn; ++t) {
        const float* vt = vb + t * row_stride;
        const float p = pj[t];
        for (int64_t d = 0; d < hd; ++d) aj[d] += p * vt[d];
      }
    }
  }
  for (int64_t j = 0; j < group; ++j) {
    float* oj = out + j * out_head_stride;
    const float* aj = acc + j * hd;
    for (int64_t d = 0; d < hd; ++d) oj[d] = aj[d] * inv[j];
  }
}

void check_kv_cache(const torch::Tensor& c, const char* name) {
  TORCH_CHECK(c.dim() == 4 && c.scalar_type() == torch::kFloat32 && c.device().is_cpu(),
              name, " must be a float32 CPU tensor [num_blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(c.stride(3) == 1 && c.stride(2) == c.size(3) && c.stride(1) == c.size(2) * c.size(3),
              name, ": each block's rows must be contiguous");
}

}  // namespace

// out[s, h] = softmax(scale * q[s, h] . K_s) V_s over the first context_lens[s] tokens of
// sequence s, whose blocks are block_tables[s]. q, out: [n, heads, head_dim] (rows may be
// strided, the last dim contiguous).
void decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                      torch::Tensor block_tables, torch::Tensor context_lens, double scale) {
  check_kv_cache(k_cache, "k_cache");
  check_kv_cache(v_cache, "v_cache");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides(),
              "k_cache and v_cache must have the same shape and strides");
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == torch::kFloat32 && q.stride(2) == 1, "q must be float32 [n, heads, head_dim]");
  TORCH_CHECK(out.sizes() == q.sizes() && out.scalar_type() == torch::kFloat32 && out.stride(2) == 1,
              "out must be float32 shaped like q");
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
  const float* kp = k_cache.data_ptr<float>();
  const float* vp = v_cache.data_ptr<float>();
  const int64_t q_s = q.stride(0), q_h = q.stride(1), o_s = out.stride(0), o_h = out.stride(1);
  const int64_t bstride = k_cache.stride(0), rstride = k_cache.stride(1);
  const int64_t tasks = n * kvh;
  // Below ~64k key-head dot products a layer's attention takes a few tens of microseconds:
  // cheaper on one thread than waking the others.
  const int64_t grain = total * heads < 65536 ? tasks : 1;
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> scratch;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t s = task / kvh, g = task % kvh;
      attend_one(qp + s * q_s + g * group * q_h, q_h, op + s * o_s + g * group * o_h, o_h,
                 kp + g * hd, vp + g * hd, bstride, rstride, tables + s * max_blocks, block_size,
                 lens[s], group, hd, static_cast<float>(scale), scratch);
    }
  });
}

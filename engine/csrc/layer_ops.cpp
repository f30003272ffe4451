// Fused per-token operations of a Llama layer for the CPU (fp32), one call each instead of
// several torch ops: RMSNorm (optionally after the residual add), RoPE applied in place to the
// fused QKV rows together with the K/V write into the paged cache (float32 or bfloat16), and
// SiLU(gate) * up.
// Each follows the torch reference in engine/model.py operation by operation (built with
// -ffp-contract=off, so no multiply-add is fused behind its back); only the order of the sum
// inside RMSNorm differs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "simd.h"

namespace {

constexpr int64_t kRowGrain = 64;  // rows per task: a few rows are not worth waking threads

void check_rows(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == torch::kFloat32 && t.device().is_cpu() && t.is_contiguous(),
              name, " must be a contiguous float32 CPU matrix");
}

void norm_row(const float* x, const float* w, float* out, int64_t d, float eps) {
  float ss = 0.f;
  int64_t i = 0;
#ifdef HM_AVX2
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  for (; i + 16 <= d; i += 16) {
    const __m256 v0 = _mm256_loadu_ps(x + i), v1 = _mm256_loadu_ps(x + i + 8);
    a0 = _mm256_add_ps(a0, _mm256_mul_ps(v0, v0));
    a1 = _mm256_add_ps(a1, _mm256_mul_ps(v1, v1));
  }
  ss = hm::hsum8(_mm256_add_ps(a0, a1));
#endif
  for (; i < d; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
  for (i = 0; i < d; ++i) out[i] = w[i] * (x[i] * r);
}

// One head rotated (rotate-half RoPE, cos/sin rows c, s of 2 * half): out = x * c + cat(-x2, x1) * s
// (out may be x).
inline void rope_head(const float* x, float* out, const float* c, const float* s, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half];
    out[i] = x1 * c[i] - x2 * s[i];
    out[i + half] = x2 * c[i + half] + x1 * s[i + half];
  }
}

// K / V rows of one token (n floats each) into a cache slot: bfloat16 (nearest even, as torch's
// .to(torch.bfloat16)) or float32.
inline void write_kv_row(const float* kr, const float* vr, char* kd, char* vd, int64_t n, bool bf16) {
  if (bf16) {
    auto* kb = reinterpret_cast<c10::BFloat16*>(kd);
    auto* vb = reinterpret_cast<c10::BFloat16*>(vd);
    for (int64_t i = 0; i < n; ++i) {
      kb[i] = c10::BFloat16(kr[i]);
      vb[i] = c10::BFloat16(vr[i]);
    }
  } else {
    std::memcpy(kd, kr, sizeof(float) * n);
    std::memcpy(vd, vr, sizeof(float) * n);
  }
}

// o[i] = silu(g[i]) * u[i] for i < n.
inline void silu_mul_row(const float* g, const float* u, float* o, int64_t n) {
  int64_t i = 0;
#ifdef HM_AVX2
  const __m256 one = _mm256_set1_ps(1.f);
  for (; i + 8 <= n; i += 8) {
    const __m256 x = _mm256_loadu_ps(g + i);
    const __m256 e8 = hm::exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
    const __m256 silu = _mm256_div_ps(x, _mm256_add_ps(one, e8));
    _mm256_storeu_ps(o + i, _mm256_mul_ps(silu, _mm256_loadu_ps(u + i)));
  }
#endif
  for (; i < n; ++i) o[i] = (g[i] / (1.f + std::exp(-g[i]))) * u[i];
}

torch::Tensor norm_rows(torch::Tensor x, const torch::Tensor& w, double eps, const float* delta) {
  check_rows(x, "x");
  const int64_t n = x.size(0), d = x.size(1);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == d && w.scalar_type() == torch::kFloat32 && w.is_contiguous(),
              "weight must be float32 [", d, "]");
  auto out = torch::empty_like(x);
  float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, n, kRowGrain, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* xr = xp + r * d;
      if (delta != nullptr) {
        const float* dr = delta + r * d;
        for (int64_t i = 0; i < d; ++i) xr[i] = xr[i] + dr[i];
      }
      norm_row(xr, wp, op + r * d, d, static_cast<float>(eps));
    }
  });
  return out;
}

}  // namespace

// w * x / sqrt(mean(x^2) + eps) for each row of x [n, d].
torch::Tensor rms_norm(torch::Tensor x, torch::Tensor w, double eps) { return norm_rows(x, w, eps, nullptr); }

// x += delta (in place, the residual stream), then rms_norm(x).
torch::Tensor add_rms_norm(torch::Tensor x, torch::Tensor delta, torch::Tensor w, double eps) {
  check_rows(delta, "delta");
  TORCH_CHECK(delta.sizes() == x.sizes(), "delta must be shaped like x");
  return norm_rows(x, w, eps, delta.data_ptr<float>());
}

// qkv [T, (heads + 2 * kv_heads) * head_dim]: rotate the q and k heads in place (rotate-half
// RoPE with cos/sin tables [max_pos, head_dim] at `positions`), then copy each token's k and v
// heads into its slot (slot_blocks[t], slot_offsets[t]) of the per-layer caches
// [num_blocks, block_size, kv_heads, head_dim].
void rope_write_kv(torch::Tensor qkv, torch::Tensor positions, torch::Tensor cos, torch::Tensor sin,
                   torch::Tensor k_cache, torch::Tensor v_cache, torch::Tensor slot_blocks,
                   torch::Tensor slot_offsets, int64_t heads, int64_t kv_heads) {
  check_rows(qkv, "qkv");
  check_rows(cos, "cos");
  check_rows(sin, "sin");
  const int64_t T = qkv.size(0), hd = cos.size(1), half = hd / 2, max_pos = cos.size(0);
  TORCH_CHECK(hd % 2 == 0 && sin.sizes() == cos.sizes(), "cos/sin must be [max_pos, even head_dim]");
  TORCH_CHECK(qkv.size(1) == (heads + 2 * kv_heads) * hd, "qkv width does not match the heads");
  for (const auto* t : {&positions, &slot_blocks, &slot_offsets})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == T && t->scalar_type() == torch::kInt64 && t->is_contiguous(),
                "positions and slots must be contiguous int64 [T]");
  for (const auto* c : {&k_cache, &v_cache})
    TORCH_CHECK(c->dim() == 4 && (c->scalar_type() == torch::kFloat32 || c->scalar_type() == torch::kBFloat16) &&
                    c->size(2) == kv_heads && c->size(3) == hd && c->stride(3) == 1 && c->stride(2) == hd &&
                    c->stride(1) == kv_heads * hd,
                "caches must be float32 or bfloat16 [num_blocks, block_size, kv_heads, head_dim] with contiguous rows");
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes() && k_cache.strides() == v_cache.strides() &&
                  k_cache.scalar_type() == v_cache.scalar_type(),
              "k_cache and v_cache must match");
  const int64_t nb = k_cache.size(0), bs = k_cache.size(1), width = qkv.size(1);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* sb = slot_blocks.data_ptr<int64_t>();
  const int64_t* so = slot_offsets.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < max_pos && sb[t] >= 0 && sb[t] < nb && so[t] >= 0 && so[t] < bs,
                "position or slot out of range at token ", t);
  float* base = qkv.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const bool bf16 = k_cache.scalar_type() == torch::kBFloat16;
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const int64_t esize = k_cache.element_size();
  const int64_t bstride = k_cache.stride(0), rstride = k_cache.stride(1);
  at::parallel_for(0, T, kRowGrain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      float* row = base + t * width;
      const float* c = cp + pos[t] * hd;
      const float* s = sp + pos[t] * hd;
      for (int64_t h = 0; h < heads + kv_heads; ++h) rope_head(row + h * hd, row + h * hd, c, s, half);
      const int64_t slot = (sb[t] * bstride + so[t] * rstride) * esize;
      write_kv_row(row + heads * hd, row + (heads + kv_heads) * hd, kc + slot, vc + slot, kv_heads * hd, bf16);
    }
  });
}

// gu [T, 2 * inter] (gate then up) -> silu(gate) * up, [T, inter].
torch::Tensor silu_mul(torch::Tensor gu) {
  check_rows(gu, "gu");
  const int64_t T = gu.size(0), inter = gu.size(1) / 2;
  TORCH_CHECK(gu.size(1) % 2 == 0, "gu must hold gate and up halves");
  auto out = torch::empty({T, inter}, gu.options());
  const float* gp = gu.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, T, kRowGrain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const float* g = gp + t * 2 * inter;
      silu_mul_row(g, g + inter, op + t * inter, inter);
    }
  });
  return out;
}

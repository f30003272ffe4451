// GEMMs of the quantized weight forms (engine/quant.py), AVX-512 (VNNI + BF16):
//   y[M, N] = x[M, K] (float32) @ W[N, K]^T, output float32.
//
// bf16_linear: W bfloat16; x rounded to bfloat16 (nearest even), products summed in fp32 by
//   VDPBF16PS.
// int8_linear: W int8 per output row with scale ws[n]; x quantized per row exactly as
//   engine.quant.quantize_int8_rows does (q = rne(x * (127 / absmax)), xs = absmax / 127); the
//   int32 sums are exact, so y[m, n] = (float(acc) * xs[m]) * ws[n] equals the torch reference
//   bit for bit. Small M: VPDPBUSD over (q + 128) as unsigned bytes, minus 128 * rowsum(W);
//   large M (prefill): oneDNN's int8 GEMM (at::_int_mm) on the same codes.
// w8a16_linear: W int8 with a scale per row and per 32 (or any multiple of 32) input columns (the
//   LM head's "w8a16" form); x quantized per row to int16 (q = rne(x * (32767 / absmax)),
//   xs = absmax / 32767), each code split into its two bytes and each byte row multiplied by
//   VPDPBUSD (no widening of the weights); the integer sums are exact, their scaling by the group
//   scales is fp32 (fp8b's arithmetic on exact group sums): y = xs[m] * sum_g ws[n, g] * acc_g.
// fp8_linear: W E4M3 codes per output row with scale ws[n]; x quantized per row to E4M3
//   (round to nearest even, as torch's float8_e4m3fn cast) with xs = absmax / 448. E4M3 values
//   are exact in bfloat16, so the weights are upcast through a 128-entry table and multiplied
//   by VDPBF16PS: an emulation of an FP8 GEMM with fp32 accumulation (no CPU here has FP8 math).
//
// The tiled kernels read each weight row once, in place (4 rows x up to 3 tokens per tile, the
// tile's rows staying in L1 while the token rows stream by); threads split the weight rows.
// bf16 and fp8 use them at every M (their output stays fp32: oneDNN's bf16 GEMM would round it
// to bf16, which flips near-tied logits); int8 beyond 64 rows goes to oneDNN (exact int32).
// K must be a multiple of 64 (int8) or 32 (bf16, fp8).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd.h"

namespace {

constexpr int64_t kSkinnyMaxRows = 64;  // int8 beyond: oneDNN's blocked GEMM

void check_x(const torch::Tensor& x, const torch::Tensor& w, c10::ScalarType wtype, const char* wname) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "x [M, K] and w [N, K] expected");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && x.is_contiguous() && x.device().is_cpu(),
              "x must be a contiguous float32 CPU matrix");
  TORCH_CHECK(w.scalar_type() == wtype && w.is_contiguous() && w.device().is_cpu(), "w must be a contiguous ", wname,
              " CPU matrix");
}

void check_scale(const torch::Tensor& s, int64_t n, c10::ScalarType t, const char* name) {
  TORCH_CHECK(s.dim() == 1 && s.size(0) == n && s.scalar_type() == t && s.is_contiguous(), name, " must be [N] ",
              t == torch::kFloat32 ? "float32" : "int32");
}

// Rows per task so that a task is worth a thread (~32k multiply-adds).
int64_t tile_grain(int64_t M, int64_t K) { return std::max<int64_t>(1, 8192 / std::max<int64_t>(1, M * K / 4)); }

// Absmax of each row of x and the int8 codes q = rne(x * (127 / absmax)) (0 where absmax is 0).
// `bias` is added to each code (128 for the unsigned VNNI operand, 0 for at::_int_mm).
void quantize_row_int8(const float* xr, int64_t K, int bias, uint8_t* qr, float* scale) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  *scale = amax / 127.f;
  for (int64_t k = 0; k < K; ++k) {
    float v = std::nearbyint(xr[k] * inv);
    v = std::min(127.f, std::max(-127.f, v));
    qr[k] = static_cast<uint8_t>(static_cast<int>(v) + bias);
  }
}

void quantize_rows_int8(const float* x, int64_t M, int64_t K, int bias, uint8_t* q, float* scale) {
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) quantize_row_int8(x + m * K, K, bias, q + m * K, scale + m);
  });
}

// Absmax of each row of x and the int16 codes q = rne(x * (32767 / absmax)) (0 where absmax is 0),
// written as their low bytes lo[m * K + k] = q & 0xFF (unsigned) and high bytes hi[..] = q >> 8
// (signed).
void quantize_row_int16(const float* xr, int64_t K, uint8_t* lo, int8_t* hi, float* scale) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
  const float inv = amax > 0.f ? 32767.f / amax : 0.f;
  *scale = amax / 32767.f;
  for (int64_t k = 0; k < K; ++k) {
    float v = std::nearbyint(xr[k] * inv);
    v = std::min(32767.f, std::max(-32767.f, v));
    const int q = static_cast<int>(v);
    lo[k] = static_cast<uint8_t>(q & 0xFF);
    hi[k] = static_cast<int8_t>(q >> 8);
  }
}

void quantize_rows_int16(const float* x, int64_t M, int64_t K, uint8_t* lo, int8_t* hi, float* scale) {
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) quantize_row_int16(x + m * K, K, lo + m * K, hi + m * K, scale + m);
  });
}

// Per row and per `group` consecutive columns: absmax, signed codes q = rne(x * (127 / absmax)),
// scale[m * G + g] = absmax / 127 (G = K / group), as engine.quant.quantize_int8_groups, and
// each group's code sum qsum[m * G + g].
// One row of quantize_groups_int8 (K columns, G = K / group scales and code sums).
void quantize_row_groups_int8(const float* xr0, int64_t K, int64_t group, int8_t* q, float* scale, int32_t* qsum) {
  for (int64_t g = 0; g < K / group; ++g) {
    const float* xr = xr0 + g * group;
    float amax = 0.f;
    for (int64_t k = 0; k < group; ++k) amax = std::max(amax, std::fabs(xr[k]));
    const float inv = amax > 0.f ? 127.f / amax : 0.f;
    scale[g] = amax / 127.f;
    int8_t* qr = q + g * group;
    int32_t sum = 0;
    for (int64_t k = 0; k < group; ++k) {
      float v = std::nearbyint(xr[k] * inv);
      v = std::min(127.f, std::max(-127.f, v));
      qr[k] = static_cast<int8_t>(v);
      sum += qr[k];
    }
    qsum[g] = sum;
  }
}

void quantize_groups_int8(const float* x, int64_t M, int64_t K, int64_t group, int8_t* q, float* scale,
                          int32_t* qsum) {
  const int64_t G = K / group;
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m)
      quantize_row_groups_int8(x + m * K, K, group, q + m * K, scale + m * G, qsum + m * G);
  });
}

// v rounded to the nearest E4M3 value (ties to even), |v| <= 448.
inline float round_e4m3(float v) {
  const float a = std::fabs(v);
  float r;
  if (a < 0.015625f) {  // below 2^-6: the subnormal grid, steps of 2^-9
    r = std::nearbyint(a * 512.f) / 512.f;
  } else {  // 3 mantissa bits: round the fp32 mantissa at bit 20, ties to even
    uint32_t bits;
    std::memcpy(&bits, &a, 4);
    bits += 0x7FFFFu + ((bits >> 20) & 1u);
    bits &= 0xFFF00000u;
    std::memcpy(&r, &bits, 4);
  }
  return std::copysign(r, v);
}

inline uint16_t bf16_bits_exact(float v) {  // v has at most 8 significant bits
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  return static_cast<uint16_t>(bits >> 16);
}

// x rows quantized to E4M3 per row (scale = absmax / 448), written as bfloat16 bits.
void quantize_rows_fp8_as_bf16(const float* x, int64_t M, int64_t K, uint16_t* q, float* scale) {
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m) {
      const float* xr = x + m * K;
      float amax = 0.f;
      for (int64_t k = 0; k < K; ++k) amax = std::max(amax, std::fabs(xr[k]));
      const float inv = amax > 0.f ? 448.f / amax : 0.f;
      scale[m] = amax / 448.f;
      for (int64_t k = 0; k < K; ++k)
        q[m * K + k] = bf16_bits_exact(round_e4m3(std::min(448.f, std::max(-448.f, xr[k] * inv))));
    }
  });
}

// bfloat16 bits of the E4M3 value of each 7-bit magnitude code (0x7F, NaN, maps to 480).
struct E4M3Table {
  alignas(64) uint16_t v[128];
  E4M3Table() {
    for (int c = 0; c < 128; ++c) {
      const int e = c >> 3, m = c & 7;
      const float f = e == 0 ? std::ldexp(static_cast<float>(m), -9) : std::ldexp(1.f + m / 8.f, e - 7);
      v[c] = bf16_bits_exact(f);
    }
  }
};
const E4M3Table kE4M3;

#ifdef HM_AVX512

// One cache line at `off` of each of nr weight rows from `pf` (a later tile's), or nothing when
// pf is null. As inline asm: GCC 12 dropped every _mm_prefetch / __builtin_prefetch of this
// translation unit (objdump found no prefetcht0 in the extension), so the int8 GEMVs ran on the
// hardware prefetcher alone; with the hint, 120 layer GEMVs of SmolLM2's shapes (106 MB, M = 1)
// went from 9.2 to 3.2 ms on 2 threads (load ~4.9).
inline void prefetch_rows(const void* pf, int64_t row_bytes, int64_t off, int nr) {
  if (pf != nullptr && (off & 63) == 0)
    for (int n = 0; n < nr; ++n)
      asm volatile("prefetcht0 %0" : : "m"(*(static_cast<const char*>(pf) + n * row_bytes + off)));
}

// Rows w0..w0+NR-1 (each K bytes) against MR token rows of unsigned codes: exact int32 sums.
template <int NR, int MR>
inline void vnni_tile(const uint8_t* const xs[MR], const int8_t* w0, int64_t K, int32_t out[MR][NR],
                      const int8_t* pf) {
  __m512i acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 64) {
    prefetch_rows(pf, K, k, NR);
    __m512i wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = _mm512_loadu_si512(w0 + n * K + k);
    for (int m = 0; m < MR; ++m) {
      const __m512i xv = _mm512_loadu_si512(xs[m] + k);
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_dpbusd_epi32(acc[m][n], xv, wv[n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) out[m][n] = _mm512_reduce_add_epi32(acc[m][n]);
}

// As vnni_tile, with one activation scale per `group` columns. Here the weights are the
// unsigned operand (w ^ 0x80 = w + 128 as a byte) and the activation codes the signed one, so
// each group's sum carries 128 * the token's code sum over the group (`qsum[m][g]`), taken back
// off by starting lane 0 from -128 * qsum -- exact, and no per-weight-group sums to store or read. The exact group sums
// are scaled by the token's group scale and summed in fp32 lanes: out = sum_g xs[m][g] * acc_g
// (the weights' scale not applied).
template <int NR, int MR>
inline void vnni_group_tile(const int8_t* const xq[MR], const float* const xs[MR], const int32_t* const qsum[MR],
                            const int8_t* w0, int64_t K, int64_t group, float out[MR][NR], const int8_t* pf) {
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t g0 = 0, g = 0; g0 < K; g0 += group, ++g) {
    __m512i gacc[MR][NR];  // start from -128 * qsum in lane 0: the sums come out exact
    for (int m = 0; m < MR; ++m) {
      const __m512i neg_corr = _mm512_maskz_set1_epi32(1, -128 * qsum[m][g]);
      for (int n = 0; n < NR; ++n) gacc[m][n] = neg_corr;
    }
    for (int64_t k = g0; k < g0 + group; k += 64) {
      prefetch_rows(pf, K, k, NR);
      __m512i wv[NR];
      for (int n = 0; n < NR; ++n) wv[n] = _mm512_xor_si512(_mm512_loadu_si512(w0 + n * K + k), flip);
      for (int m = 0; m < MR; ++m) {
        const __m512i xv = _mm512_loadu_si512(xq[m] + k);
        for (int n = 0; n < NR; ++n) gacc[m][n] = _mm512_dpbusd_epi32(gacc[m][n], wv[n], xv);
      }
    }
    for (int m = 0; m < MR; ++m) {
      const __m512 sv = _mm512_set1_ps(xs[m][g]);
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(gacc[m][n]), sv, acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) out[m][n] = _mm512_reduce_add_ps(acc[m][n]);
}

// NR int8 weight rows (a scale per `gs` columns, gs % 32 == 0, G = K / gs a row) against MR
// token rows of int16 codes q = 256 * (hi - 128) + lo, given as two unsigned byte rows
// (lo = q & 0xFF, hi = (q >> 8) + 128). Each 64-column step: VPDPBUSD of lo by the weights, and
// of the weights as unsigned bytes (w + 128 = w ^ 0x80) by hi - 128 (signed) less 128 * the
// lane's sum of hi - 128; both exact, and each lane's 256 * hi-part + lo-part (4 products, at
// most 2^24 in magnitude) is exact in fp32: scaled by its group's weight scale (lanes 0-7:
// columns k..k+31, lanes 8-15: k+32..k+63) and summed in fp32 lanes. out: without x's scale.
// G32: gs == 32 (the default), each step's two scales adjacent, read without a division.
template <int NR, int MR, bool G32>
inline void w8a16_tile(const uint8_t* const lo[MR], const int8_t* const hi[MR], const int8_t* w0, const float* s0,
                       int64_t K, int64_t gs, float out[MR][NR], const int8_t* pf) {
  const int64_t G = K / gs;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  const __m512i half_idx = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 64) {
    prefetch_rows(pf, K, k, NR);
    __m512i wv[NR], wu[NR];
    __m512 sv[NR];
    for (int n = 0; n < NR; ++n) {
      wv[n] = _mm512_loadu_si512(w0 + n * K + k);
      wu[n] = _mm512_xor_si512(wv[n], flip);
      const float* sr = s0 + n * G;
      const __m128 pair = G32 ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(sr + (k >> 5))))
                              : _mm_set_ps(0.f, 0.f, sr[(k + 32) / gs], sr[k / gs]);
      sv[n] = _mm512_permutexvar_ps(half_idx, _mm512_castps128_ps512(pair));
    }
    for (int m = 0; m < MR; ++m) {
      const __m512i xl = _mm512_loadu_si512(lo[m] + k), xh = _mm512_loadu_si512(hi[m] + k);
      // -128 * the lane's sum of hi: the hi products start from it, so they come out exact
      const __m512i neg_corr = _mm512_sub_epi32(_mm512_setzero_si512(),
                                                _mm512_dpbusd_epi32(_mm512_setzero_si512(), flip, xh));
      for (int n = 0; n < NR; ++n) {
        const __m512i h = _mm512_dpbusd_epi32(neg_corr, wu[n], xh);  // sum w * hi
        const __m512i exact = _mm512_dpbusd_epi32(_mm512_slli_epi32(h, 8), xl, wv[n]);  // + sum w * lo
        acc[m][n] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(exact), sv[n], acc[m][n]);
      }
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) out[m][n] = _mm512_reduce_add_ps(acc[m][n]);
}

// Rows of bfloat16 bits (NR weight rows, MR token rows): fp32 sums of exact products.
// `Load` turns 32 weights at a k offset into 32 bfloat16 lanes.
template <int NR, int MR, typename Load>
inline void bf16_tile(const uint16_t* const xs[MR], int64_t K, float out[MR][NR], const Load& load) {
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    __m512i wv[NR];
    for (int n = 0; n < NR; ++n) wv[n] = load(n, k);
    for (int m = 0; m < MR; ++m) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xs[m] + k);
      for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_dpbf16_ps(acc[m][n], xv, (__m512bh)wv[n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) out[m][n] = _mm512_reduce_add_ps(acc[m][n]);
}

// The bfloat16 bits of n floats (round to nearest even); n % 16 == 0.
std::vector<uint16_t> bf16_bits(const float* x, int64_t n) {
  std::vector<uint16_t> out(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; i += 16)
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.data() + i), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(x + i)));
  return out;
}

// Drives a tile function over all (4-row weight tile) x (token rows in 3s, 2s, 1s), threads over
// weight tiles. tile(n0, nr, m0, mr, vals) fills vals[mr][nr] (float or int32); emit(m, n, v) stores.
template <typename V, typename Tile, typename Emit>
void skinny_drive(int64_t M, int64_t N, int64_t K, const Tile& tile, const Emit& emit) {
  const int64_t tiles = (N + 3) / 4;
  at::parallel_for(0, tiles, tile_grain(M, K), [&](int64_t tb, int64_t te) {
    V vals[3][4];
    for (int64_t t = tb; t < te; ++t) {
      const int64_t n0 = t * 4;
      const int nr = static_cast<int>(std::min<int64_t>(4, N - n0));
      for (int64_t m = 0; m < M;) {
        const int mr = static_cast<int>(std::min<int64_t>(3, M - m));
        tile(n0, nr, m, mr, vals);
        for (int i = 0; i < mr; ++i)
          for (int j = 0; j < nr; ++j) emit(m + i, n0 + j, vals[i][j]);
        m += mr;
      }
    }
  });
}

// Calls f.template operator()<NR, MR>() for the runtime (nr, mr) in {1..4} x {1..3}.
template <typename F>
inline void dispatch_tile(int nr, int mr, const F& f) {
#define HM_T(NR, MR) \
  if (nr == NR && mr == MR) return f(std::integral_constant<int, NR>(), std::integral_constant<int, MR>());
  HM_T(4, 3) HM_T(4, 2) HM_T(4, 1) HM_T(3, 3) HM_T(3, 2) HM_T(3, 1)
  HM_T(2, 3) HM_T(2, 2) HM_T(2, 1) HM_T(1, 3) HM_T(1, 2) HM_T(1, 1)
#undef HM_T
}

// 32 E4M3 codes -> 32 bfloat16 lanes, through the table (4 x 32 entries in registers).
struct E4M3Upcast {
  __m512i t0, t1, t2, t3;
  E4M3Upcast() {
    t0 = _mm512_load_si512(kE4M3.v);
    t1 = _mm512_load_si512(kE4M3.v + 32);
    t2 = _mm512_load_si512(kE4M3.v + 64);
    t3 = _mm512_load_si512(kE4M3.v + 96);
  }
  inline __m512i operator()(const uint8_t* p) const {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    const __m512i mag = _mm512_and_si512(v, _mm512_set1_epi16(0x7F));
    const __m512i lo = _mm512_permutex2var_epi16(t0, mag, t1);  // codes 0..63 (index bits 0..5)
    const __m512i hi = _mm512_permutex2var_epi16(t2, mag, t3);  // codes 64..127
    const __mmask32 upper = _mm512_test_epi16_mask(mag, _mm512_set1_epi16(0x40));
    const __m512i r = _mm512_mask_blend_epi16(upper, lo, hi);
    return _mm512_or_si512(r, _mm512_slli_epi16(_mm512_and_si512(v, _mm512_set1_epi16(0x80)), 8));
  }
};

// fp8b rows (E4M3 codes, a scale per `gs` input columns, gs % 32 == 0; G = K / gs scales a row)
// against MR token rows of bfloat16 bits: each group's fp32 sum of exact products is scaled by
// its weight scale and summed in fp32 lanes.
template <int NR, int MR>
inline void fp8b_tile(const uint16_t* const xs[MR], const uint8_t* w0, const float* s0, int64_t K, int64_t gs,
                      float out[MR][NR], const E4M3Upcast& up) {
  const int64_t G = K / gs;
  __m512 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) acc[m][n] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 gacc[MR][NR];
    for (int m = 0; m < MR; ++m)
      for (int n = 0; n < NR; ++n) gacc[m][n] = _mm512_setzero_ps();
    for (int64_t k = g * gs; k < (g + 1) * gs; k += 32) {
      __m512i wv[NR];
      for (int n = 0; n < NR; ++n) wv[n] = up(w0 + n * K + k);
      for (int m = 0; m < MR; ++m) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(xs[m] + k);
        for (int n = 0; n < NR; ++n) gacc[m][n] = _mm512_dpbf16_ps(gacc[m][n], xv, (__m512bh)wv[n]);
      }
    }
    for (int n = 0; n < NR; ++n) {
      const __m512 sv = _mm512_set1_ps(s0[n * G + g]);
      for (int m = 0; m < MR; ++m) acc[m][n] = _mm512_fmadd_ps(gacc[m][n], sv, acc[m][n]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int n = 0; n < NR; ++n) out[m][n] = _mm512_reduce_add_ps(acc[m][n]);
}

#endif  // HM_AVX512

}  // namespace

bool qgemm_supported() {
#ifdef HM_AVX512
  return true;
#else
  return false;
#endif
}

// x [M, K] float32 @ w [N, K] bfloat16 ^T -> [M, N] float32 (any M; K % 32 == 0).
torch::Tensor bf16_linear(torch::Tensor x, torch::Tensor w) {
  check_x(x, w, torch::kBFloat16, "bfloat16");
#ifdef HM_AVX512
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
  const std::vector<uint16_t> xb = bf16_bits(x.data_ptr<float>(), M * K);
  auto out = torch::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const auto* wp = reinterpret_cast<const uint16_t*>(w.data_ptr());
  skinny_drive<float>(M, N, K, [&](int64_t n0, int nr, int64_t m0, int mr, float (*vals)[4]) {
    dispatch_tile(nr, mr, [&](auto nr_c, auto mr_c) {
      constexpr int NR = decltype(nr_c)::value, MR = decltype(mr_c)::value;
      const uint16_t* xs[MR];
      for (int i = 0; i < MR; ++i) xs[i] = xb.data() + (m0 + i) * K;
      const uint16_t* w0 = wp + n0 * K;
      float o[MR][NR];
      bf16_tile<NR, MR>(xs, K, o, [&](int n, int64_t k) { return _mm512_loadu_si512(w0 + n * K + k); });
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) vals[i][j] = o[i][j];
    });
  }, [&](int64_t m, int64_t n, float v) { op[m * N + n] = v; });
  return out;
#else
  TORCH_CHECK(false, "bf16_linear needs AVX-512 BF16");
  return torch::Tensor();
#endif
}

// x [M, K] float32 @ (w [N, K] int8 * ws[:, None])^T with x quantized per row -> [M, N] float32.
// w_sum[n] = sum_k w[n, k] (int32).
torch::Tensor int8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor ws, torch::Tensor w_sum) {
  check_x(x, w, torch::kInt8, "int8");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_scale(ws, N, torch::kFloat32, "ws");
  check_scale(w_sum, N, torch::kInt32, "w_sum");
  auto out = torch::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const float* wsp = ws.data_ptr<float>();
  std::vector<float> xs(static_cast<size_t>(M));
#ifdef HM_AVX512
  if (M <= kSkinnyMaxRows && K % 64 == 0) {
    std::vector<uint8_t> xq(static_cast<size_t>(M * K));
    quantize_rows_int8(x.data_ptr<float>(), M, K, 128, xq.data(), xs.data());
    const int8_t* wp = w.data_ptr<int8_t>();
    const int32_t* sp = w_sum.data_ptr<int32_t>();
    skinny_drive<int32_t>(M, N, K, [&](int64_t n0, int nr, int64_t m0, int mr, int32_t (*vals)[4]) {
      dispatch_tile(nr, mr, [&](auto nr_c, auto mr_c) {
        constexpr int NR = decltype(nr_c)::value, MR = decltype(mr_c)::value;
        const uint8_t* xr[MR];
        for (int i = 0; i < MR; ++i) xr[i] = xq.data() + (m0 + i) * K;
        // the first pass over these rows prefetches the tile two ahead
        const int8_t* pf = m0 == 0 && n0 + 12 <= N ? wp + (n0 + 8) * K : nullptr;
        int32_t o[MR][NR];
        vnni_tile<NR, MR>(xr, wp + n0 * K, K, o, pf);
        for (int i = 0; i < MR; ++i)
          for (int j = 0; j < NR; ++j) vals[i][j] = o[i][j] - 128 * sp[n0 + j];
      });
    }, [&](int64_t m, int64_t n, int32_t acc) { op[m * N + n] = static_cast<float>(acc) * xs[m] * wsp[n]; });
    return out;
  }
#endif
  auto xq = torch::empty({M, K}, x.options().dtype(torch::kInt8));
  quantize_rows_int8(x.data_ptr<float>(), M, K, 0, reinterpret_cast<uint8_t*>(xq.data_ptr<int8_t>()), xs.data());
  const auto acc = at::_int_mm(xq, w.t());
  const int32_t* ap = acc.data_ptr<int32_t>();
  at::parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m)
      for (int64_t n = 0; n < N; ++n) op[m * N + n] = static_cast<float>(ap[m * N + n]) * xs[m] * wsp[n];
  });
  return out;
}

// x [M, K] float32 @ (w [N, K] int8 * ws [N, K / gs] per group of gs input columns)^T with x
// quantized per row to int16 -> [M, N] float32 (any M; K % 64 == 0, gs % 32 == 0): "w8a16".
torch::Tensor w8a16_linear(torch::Tensor x, torch::Tensor w, torch::Tensor ws) {
  check_x(x, w, torch::kInt8, "int8");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(ws.dim() == 2 && ws.size(0) == N && ws.size(1) > 0 && K % ws.size(1) == 0 &&
                  (K / ws.size(1)) % 32 == 0 && ws.scalar_type() == torch::kFloat32 && ws.is_contiguous(),
              "ws must be contiguous float32 [N, K / group] with group a multiple of 32");
#ifdef HM_AVX512
  TORCH_CHECK(K % 64 == 0, "K must be a multiple of 64");
  const int64_t G = ws.size(1), gs = K / G;
  std::vector<uint8_t> lo(static_cast<size_t>(M * K));
  std::vector<int8_t> hi(static_cast<size_t>(M * K));
  std::vector<float> xs(static_cast<size_t>(M));
  quantize_rows_int16(x.data_ptr<float>(), M, K, lo.data(), hi.data(), xs.data());
  auto out = torch::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const float* wsp = ws.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  skinny_drive<float>(M, N, K, [&](int64_t n0, int nr, int64_t m0, int mr, float (*vals)[4]) {
    dispatch_tile(nr, mr, [&](auto nr_c, auto mr_c) {
      constexpr int NR = decltype(nr_c)::value, MR = decltype(mr_c)::value;
      const uint8_t* xl[MR];
      const int8_t* xh[MR];
      for (int i = 0; i < MR; ++i) {
        xl[i] = lo.data() + (m0 + i) * K;
        xh[i] = hi.data() + (m0 + i) * K;
      }
      const int8_t* pf = m0 == 0 && n0 + 12 <= N ? wp + (n0 + 8) * K : nullptr;
      float o[MR][NR];
      if (gs == 32)
        w8a16_tile<NR, MR, true>(xl, xh, wp + n0 * K, wsp + n0 * G, K, gs, o, pf);
      else
        w8a16_tile<NR, MR, false>(xl, xh, wp + n0 * K, wsp + n0 * G, K, gs, o, pf);
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) vals[i][j] = o[i][j];
    });
  }, [&](int64_t m, int64_t n, float v) { op[m * N + n] = v * xs[m]; });
  return out;
#else
  TORCH_CHECK(false, "w8a16_linear needs AVX-512 VNNI");
  return torch::Tensor();
#endif
}

// x [M, K] float32 @ (w [N, K] int8 * ws[:, None])^T with x quantized per row and per `group`
// columns (group % 64 == 0, K % group == 0) -> [M, N] float32, any M (the tiled kernel: oneDNN
// has no per-group scales).
torch::Tensor int8_group_linear(torch::Tensor x, torch::Tensor w, torch::Tensor ws, int64_t group) {
  check_x(x, w, torch::kInt8, "int8");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(group > 0 && group % 64 == 0 && K % group == 0, "group must be a multiple of 64 dividing K");
  const int64_t G = K / group;
  check_scale(ws, N, torch::kFloat32, "ws");
#ifdef HM_AVX512
  std::vector<int8_t> xq(static_cast<size_t>(M * K));
  std::vector<float> xs(static_cast<size_t>(M * G));
  std::vector<int32_t> qs(static_cast<size_t>(M * G));
  quantize_groups_int8(x.data_ptr<float>(), M, K, group, xq.data(), xs.data(), qs.data());
  auto out = torch::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  const float* wsp = ws.data_ptr<float>();
  const int8_t* wp = w.data_ptr<int8_t>();
  skinny_drive<float>(M, N, K, [&](int64_t n0, int nr, int64_t m0, int mr, float (*vals)[4]) {
    dispatch_tile(nr, mr, [&](auto nr_c, auto mr_c) {
      constexpr int NR = decltype(nr_c)::value, MR = decltype(mr_c)::value;
      const int8_t* xr[MR];
      const float* sr[MR];
      const int32_t* qr[MR];
      for (int i = 0; i < MR; ++i) {
        xr[i] = xq.data() + (m0 + i) * K;
        sr[i] = xs.data() + (m0 + i) * G;
        qr[i] = qs.data() + (m0 + i) * G;
      }
      const int8_t* pf = m0 == 0 && n0 + 12 <= N ? wp + (n0 + 8) * K : nullptr;
      float o[MR][NR];
      vnni_group_tile<NR, MR>(xr, sr, qr, wp + n0 * K, K, group, o, pf);
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) vals[i][j] = o[i][j];
    });
  }, [&](int64_t m, int64_t n, float v) { op[m * N + n] = v * wsp[n]; });
  return out;
#else
  TORCH_CHECK(false, "int8_group_linear needs AVX-512 VNNI");
  return torch::Tensor();
#endif
}

// x [M, K] float32 @ (w [N, K] E4M3 codes (uint8) * ws[:, None])^T with x quantized per row to
// E4M3 -> [M, N] float32 (any M).
torch::Tensor fp8_linear(torch::Tensor x, torch::Tensor w, torch::Tensor ws) {
  check_x(x, w, torch::kUInt8, "uint8 (E4M3 codes)");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  check_scale(ws, N, torch::kFloat32, "ws");
#ifdef HM_AVX512
  TORCH_CHECK(K % 32 == 0, "K must be a multiple of 32");
  auto xq = torch::empty({M, K}, x.options().dtype(torch::kBFloat16));
  std::vector<float> xs(static_cast<size_t>(M));
  auto* xqp = reinterpret_cast<uint16_t*>(xq.data_ptr());
  quantize_rows_fp8_as_bf16(x.data_ptr<float>(), M, K, xqp, xs.data());
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* wsp = ws.data_ptr<float>();
  const E4M3Upcast up;
  auto out = torch::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  skinny_drive<float>(M, N, K, [&](int64_t n0, int nr, int64_t m0, int mr, float (*vals)[4]) {
    dispatch_tile(nr, mr, [&](auto nr_c, auto mr_c) {
      constexpr int NR = decltype(nr_c)::value, MR = decltype(mr_c)::value;
      const uint16_t* xr[MR];
      for (int i = 0; i < MR; ++i) xr[i] = xqp + (m0 + i) * K;
      const uint8_t* w0 = wp + n0 * K;
      float o[MR][NR];
      bf16_tile<NR, MR>(xr, K, o, [&](int n, int64_t k) { return up(w0 + n * K + k); });
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) vals[i][j] = o[i][j];
    });
  }, [&](int64_t m, int64_t n, float acc) { op[m * N + n] = acc * xs[m] * wsp[n]; });
  return out;
#else
  TORCH_CHECK(false, "fp8_linear needs AVX-512 BF16");
  return torch::Tensor();
#endif
}

// x [M, K] float32 (rounded to bfloat16) @ (w [N, K] E4M3 codes (uint8) * ws [N, K / gs] per
// group of gs input columns)^T -> [M, N] float32 (any M; gs % 32 == 0): the "fp8b" form.
torch::Tensor fp8b_linear(torch::Tensor x, torch::Tensor w, torch::Tensor ws) {
  check_x(x, w, torch::kUInt8, "uint8 (E4M3 codes)");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  TORCH_CHECK(ws.dim() == 2 && ws.size(0) == N && ws.size(1) > 0 && K % ws.size(1) == 0 &&
                  (K / ws.size(1)) % 32 == 0 && ws.scalar_type() == torch::kFloat32 && ws.is_contiguous(),
              "ws must be contiguous float32 [N, K / group] with group a multiple of 32");
#ifdef HM_AVX512
  const int64_t G = ws.size(1), gs = K / G;
  const std::vector<uint16_t> xb = bf16_bits(x.data_ptr<float>(), M * K);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const float* wsp = ws.data_ptr<float>();
  const E4M3Upcast up;
  auto out = torch::empty({M, N}, x.options());
  float* op = out.data_ptr<float>();
  skinny_drive<float>(M, N, K, [&](int64_t n0, int nr, int64_t m0, int mr, float (*vals)[4]) {
    dispatch_tile(nr, mr, [&](auto nr_c, auto mr_c) {
      constexpr int NR = decltype(nr_c)::value, MR = decltype(mr_c)::value;
      const uint16_t* xr[MR];
      for (int i = 0; i < MR; ++i) xr[i] = xb.data() + (m0 + i) * K;
      float o[MR][NR];
      fp8b_tile<NR, MR>(xr, wp + n0 * K, wsp + n0 * G, K, gs, o, up);
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) vals[i][j] = o[i][j];
    });
  }, [&](int64_t m, int64_t n, float v) { op[m * N + n] = v; });
  return out;
#else
  TORCH_CHECK(false, "fp8b_linear needs AVX-512 BF16");
  return torch::Tensor();
#endif
}

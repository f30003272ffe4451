// A decode step (up to 64 rows) of the int8 forms (w8a8: int8 layers, per token or per activation
// group; an int8 or w8a16 LM head) in ONE OpenMP parallel region (engine.model.DECODE_REGION):
// decode_step (decode_step.cpp) forks and joins the threads once per kernel, ~150 times a
// step; here every thread runs the whole step and takes its static share of each phase --
// its quarter-rows tiles of every GEMV, its items of every layer's attention -- with a barrier
// only where a phase needs the previous one's whole output (qkv -> attention -> o -> gate_up
// -> down -> the next layer). The small serial pieces between (the residual add and RMSNorm on
// `hidden` floats, RoPE of the query heads, combining attention's splits, SiLU * up, the
// activations' int8 / int16 codes) each thread computes for itself, on its own copy of the
// residual stream: all copies are the same numbers, and no barrier waits for them.
//
// Every number is computed by the same per-row code as decode_step's kernels, with the same
// attention splits (decode_splits), so the logits are the same bit for bit. The new token's K
// and V rows are written by the thread whose attention item reads the block holding them
// (before it reads them); when a slot is not its sequence's last position, one thread writes
// them all before attention instead.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdint>
#include <vector>

namespace {

// The region's barrier (in place of `omp barrier`, whose waiters spin for milliseconds): a
// waiter spins (pause) while its partners are running -- a phase's threads arrive within
// microseconds of each other -- and sleeps on a futex once kSpinUs pass without them (one was
// preempted by another process: spinning would only keep the core from it), woken by the
// last arriver. Interleaved in one process on the shared 2-core machine under the others' load
// (SmolLM2-135M w8a8, 10-call blocks): b1 median 21.8 / 22.5 ms (omp / this, 300 calls each,
// load 4.7), p90 213 / 41 ms; b8 median 226 / 79 ms, p90 897 / 94 ms (100 calls, load 5.4).
constexpr int64_t kSpinUs = 50;

// A region in which a waiter slept at half of its barriers or more had its threads preempted
// (other processes want the cores): its threads then run in lockstep with the slowest, and one
// thread alone is faster -- interleaved under the other sessions' load (~3 on 2 cores), b1
// median 7.5 ms on one thread vs 20.8 ms on two (b1 steps then sleep at 148-150 of their 150
// barriers, a clean one at 0; b8 steps that slept at 8-16 still took 19-22 ms on two threads
// vs 28 on one, hence the half). The next regions (process-wide) then run on one
// thread -- one, twice as many after each contended try of the full team, up to 256; a clean
// try ends it -- so a passing hiccup (another process's threads still spinning after their
// turn, as llama.cpp's do in bench.engine) costs one solo step and lasting load one slow step
// in hundreds. The attention splits stay those of the thread count asked for (decode_splits),
// so the logits do not depend on which ran.
constexpr int kSoloMin = 1, kSoloMax = 256;
std::atomic<int> g_solo_left{0}, g_solo_run{0};
std::atomic<int> g_last_team{0}, g_last_sleeps{0};

struct RegionBarrier {
  alignas(64) std::atomic<int> arrived{0};
  alignas(64) std::atomic<int> gen{0};
  std::atomic<int> sleepers{0};
  std::atomic<int> sleeps{0};  // futex sleeps so far (one per wait that outlasted the spin)
  int n = 1;

  void wait() {
    const int g = gen.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == n - 1) {
      arrived.store(0, std::memory_order_relaxed);
      gen.store(g + 1, std::memory_order_seq_cst);
      if (sleepers.load(std::memory_order_seq_cst) > 0)
        syscall(SYS_futex, reinterpret_cast<int*>(&gen), FUTEX_WAKE_PRIVATE, INT_MAX, nullptr, nullptr, 0);
      return;
    }
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 1; gen.load(std::memory_order_acquire) == g; ++i) {
      _mm_pause();
      if (i % 64 == 0 && std::chrono::steady_clock::now() - t0 > std::chrono::microseconds(kSpinUs)) {
        sleeps.fetch_add(1, std::memory_order_relaxed);
        sleepers.fetch_add(1, std::memory_order_seq_cst);
        while (gen.load(std::memory_order_seq_cst) == g)
          syscall(SYS_futex, reinterpret_cast<int*>(&gen), FUTEX_WAIT_PRIVATE, g, nullptr, nullptr, 0);
        sleepers.fetch_sub(1, std::memory_order_seq_cst);
        return;
      }
    }
  }
};

// Rows the region takes at most (the int8 kernels' tiled range: beyond, int8_linear is oneDNN's);
// engine.model.REGION_MAX_ROWS says up to how many it is used.
constexpr int64_t kRegionMaxRows = 64;
constexpr int64_t kRFormInt8 = 2, kRFormInt8Group = 3, kRFormW8A16 = 4;  // decode_step.cpp's numbering

#ifdef HM_AVX512

struct RegionLinear {
  int64_t form, group, N, K;
  const int8_t* w;
  const float* s;
  const int32_t* rs;  // int8: the weight rows' sums
};

// A thread's codes of the activations of one linear.
struct Codes {
  std::vector<uint8_t> u8;  // int8: q + 128; w8a16: the low bytes
  std::vector<int8_t> i8;   // int8 groups: q; w8a16: the high bytes
  std::vector<float> xs;
  std::vector<int32_t> qs;  // int8 groups: the code sums
};

// This thread's share (tid of nt: a contiguous range of 4-row weight tiles, as at::parallel_for
// would cut it) of y [M, N] = l(x [M, K]); x is quantized in full by each thread.
void region_linear(const RegionLinear& l, const float* x, int64_t M, float* y, int tid, int nt, Codes& c) {
  const int64_t N = l.N, K = l.K;
  const int64_t G = l.form == kRFormInt8Group ? K / l.group : l.form == kRFormW8A16 ? l.group : 1;
  c.xs.resize(static_cast<size_t>(M * G));
  if (l.form == kRFormInt8) {
    c.u8.resize(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m) quantize_row_int8(x + m * K, K, 128, c.u8.data() + m * K, c.xs.data() + m);
  } else if (l.form == kRFormInt8Group) {
    c.i8.resize(static_cast<size_t>(M * K));
    c.qs.resize(static_cast<size_t>(M * G));
    for (int64_t m = 0; m < M; ++m)
      quantize_row_groups_int8(x + m * K, K, l.group, c.i8.data() + m * K, c.xs.data() + m * G, c.qs.data() + m * G);
  } else {
    c.u8.resize(static_cast<size_t>(M * K));
    c.i8.resize(static_cast<size_t>(M * K));
    for (int64_t m = 0; m < M; ++m)
      quantize_row_int16(x + m * K, K, c.u8.data() + m * K, c.i8.data() + m * K, c.xs.data() + m);
  }
  const int64_t tiles = (N + 3) / 4, chunk = (tiles + nt - 1) / nt;
  const int64_t tb = std::min(tiles, tid * chunk), te = std::min(tiles, tb + chunk);
  const int8_t* wp = l.w;
  const float* wsp = l.s;
  for (int64_t t = tb; t < te; ++t) {
    const int64_t n0 = t * 4;
    const int nr = static_cast<int>(std::min<int64_t>(4, N - n0));
    for (int64_t m0 = 0; m0 < M;) {
      const int mr = static_cast<int>(std::min<int64_t>(3, M - m0));
      dispatch_tile(nr, mr, [&](auto nr_c, auto mr_c) {
        constexpr int NR = decltype(nr_c)::value, MR = decltype(mr_c)::value;
        if (l.form == kRFormInt8) {  // int8_linear
          const uint8_t* xr[MR];
          for (int i = 0; i < MR; ++i) xr[i] = c.u8.data() + (m0 + i) * K;
          const int8_t* pf = m0 == 0 && n0 + 12 <= N ? wp + (n0 + 8) * K : nullptr;
          int32_t o[MR][NR];
          vnni_tile<NR, MR>(xr, wp + n0 * K, K, o, pf);
          for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) {
              const int32_t acc = o[i][j] - 128 * l.rs[n0 + j];
              y[(m0 + i) * N + n0 + j] = static_cast<float>(acc) * c.xs[m0 + i] * wsp[n0 + j];
            }
        } else if (l.form == kRFormInt8Group) {  // int8_group_linear
          const int8_t* xr[MR];
          const float* sr[MR];
          const int32_t* qr[MR];
          for (int i = 0; i < MR; ++i) {
            xr[i] = c.i8.data() + (m0 + i) * K;
            sr[i] = c.xs.data() + (m0 + i) * G;
            qr[i] = c.qs.data() + (m0 + i) * G;
          }
          const int8_t* pf = m0 == 0 && n0 + 12 <= N ? wp + (n0 + 8) * K : nullptr;
          float o[MR][NR];
          vnni_group_tile<NR, MR>(xr, sr, qr, wp + n0 * K, K, l.group, o, pf);
          for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) y[(m0 + i) * N + n0 + j] = o[i][j] * wsp[n0 + j];
        } else {  // w8a16_linear
          const uint8_t* xl[MR];
          const int8_t* xh[MR];
          for (int i = 0; i < MR; ++i) {
            xl[i] = c.u8.data() + (m0 + i) * K;
            xh[i] = c.i8.data() + (m0 + i) * K;
          }
          const int64_t gs = K / G;
          const int8_t* pf = m0 == 0 && n0 + 12 <= N ? wp + (n0 + 8) * K : nullptr;
          float o[MR][NR];
          if (gs == 32)
            w8a16_tile<NR, MR, true>(xl, xh, wp + n0 * K, wsp + n0 * G, K, gs, o, pf);
          else
            w8a16_tile<NR, MR, false>(xl, xh, wp + n0 * K, wsp + n0 * G, K, gs, o, pf);
          for (int i = 0; i < MR; ++i)
            for (int j = 0; j < NR; ++j) y[(m0 + i) * N + n0 + j] = o[i][j] * c.xs[m0 + i];
        }
      });
      m0 += mr;
    }
  }
}

// decode_step's linear (form, group, w, s, rs) as a RegionLinear; false where the form is not
// one of the region's or the shapes do not fit its kernels.
bool region_linear_of(int64_t form, int64_t group, const torch::Tensor& w, const torch::Tensor& s,
                      const torch::Tensor& rs, RegionLinear* out) {
  if (w.dim() != 2 || w.scalar_type() != torch::kInt8 || !w.is_contiguous() || w.size(1) % 64 != 0) return false;
  const int64_t N = w.size(0), K = w.size(1);
  if (!s.is_contiguous() || s.scalar_type() != torch::kFloat32) return false;
  if (form == kRFormInt8) {
    if (s.dim() != 1 || s.size(0) != N || rs.dim() != 1 || rs.size(0) != N || rs.scalar_type() != torch::kInt32 ||
        !rs.is_contiguous())
      return false;
    *out = {form, 0, N, K, w.data_ptr<int8_t>(), s.data_ptr<float>(), rs.data_ptr<int32_t>()};
    return true;
  }
  if (form == kRFormInt8Group) {
    if (s.dim() != 1 || s.size(0) != N || group <= 0 || group % 64 != 0 || K % group != 0) return false;
    *out = {form, group, N, K, w.data_ptr<int8_t>(), s.data_ptr<float>(), nullptr};
    return true;
  }
  if (form == kRFormW8A16) {  // group: the scales a row
    if (s.dim() != 2 || s.size(0) != N || s.size(1) <= 0 || K % s.size(1) != 0 || (K / s.size(1)) % 32 != 0)
      return false;
    *out = {form, s.size(1), N, K, w.data_ptr<int8_t>(), s.data_ptr<float>(), nullptr};
    return true;
  }
  return false;
}

#endif  // HM_AVX512

}  // namespace

// The last decode_region's (threads it ran on, barrier waits that slept).
std::vector<int64_t> decode_region_last() { return {g_last_team.load(), g_last_sleeps.load()}; }

// Whether decode_region takes a step of n rows with these forms (decode_step's layout): every
// layer linear int8 (per token or per activation group of a multiple of 64), the head int8 or
// w8a16, n <= kRegionMaxRows, and this build has the AVX-512 kernels.
bool decode_region_supported(std::vector<int64_t> forms, int64_t n) {
#ifdef HM_AVX512
  if (n < 1 || n > kRegionMaxRows || forms.size() < 2 || (forms.size() - 2) % 8 != 0) return false;
  for (size_t i = 0; i + 2 < forms.size(); i += 2)
    if (forms[i] != kRFormInt8 && forms[i] != kRFormInt8Group) return false;
  const int64_t head = forms[forms.size() - 2];
  return head == kRFormInt8 || head == kRFormInt8Group || head == kRFormW8A16;
#else
  (void)forms;
  (void)n;
  return false;
#endif
}

// decode_step's step (same arguments, same logits bit for bit) in one parallel region; for the
// forms and batch sizes of decode_region_supported. x is left holding the final residual stream.
torch::Tensor decode_region(torch::Tensor x, torch::Tensor positions, torch::Tensor slot_blocks,
                            torch::Tensor slot_offsets, torch::Tensor block_tables, torch::Tensor context_lens,
                            torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> k_caches,
                            std::vector<torch::Tensor> v_caches, std::vector<torch::Tensor> weights,
                            std::vector<int64_t> forms, int64_t heads, int64_t kv_heads, double eps, double scale,
                            bool skinny) {
  (void)skinny;
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(layers >= 1 && static_cast<int64_t>(v_caches.size()) == layers &&
                  static_cast<int64_t>(weights.size()) == 14 * layers + 4 &&
                  static_cast<int64_t>(forms.size()) == 8 * layers + 2,
              "decode_region: 14 weights and 8 form fields a layer, plus the head's");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(), "x must be float32 [n, hidden]");
  const int64_t n = x.size(0), hidden = x.size(1);
  TORCH_CHECK(decode_region_supported(forms, n), "decode_region: forms or batch size not supported (",
              n, " rows)");
#ifdef HM_AVX512
  TORCH_CHECK(cos.dim() == 2 && cos.scalar_type() == torch::kFloat32 && cos.is_contiguous() &&
                  sin.sizes() == cos.sizes() && sin.scalar_type() == torch::kFloat32 && sin.is_contiguous() &&
                  cos.size(1) % 2 == 0,
              "cos/sin must be float32 [max_pos, even head_dim]");
  const int64_t hd = cos.size(1), half = hd / 2, max_pos = cos.size(0);
  const int64_t q_size = heads * hd, kv_size = kv_heads * hd, width = q_size + 2 * kv_size;
  TORCH_CHECK(heads >= 1 && kv_heads >= 1 && heads % kv_heads == 0, "query heads must be a multiple of kv heads");
  // the linears, with the shapes they must have
  std::vector<RegionLinear> lins(static_cast<size_t>(4 * layers + 1));
  for (int64_t li = 0; li <= layers; ++li)
    for (int j = 0; j < (li < layers ? 4 : 1); ++j) {
      const int64_t w0 = li < layers ? 14 * li + (j == 0 ? 1 : j == 1 ? 4 : j == 2 ? 8 : 11) : 14 * layers + 1;
      const int64_t f = li < layers ? 8 * li + 2 * j : 8 * layers;
      TORCH_CHECK(region_linear_of(forms[f], forms[f + 1], weights[w0], weights[w0 + 1], weights[w0 + 2],
                                   &lins[4 * li + j]),
                  "decode_region: linear ", j, " of layer ", li, " does not fit its kernel");
    }
  const int64_t inter = lins[2].N / 2, vocab = lins[4 * layers].N;
  for (int64_t li = 0; li < layers; ++li) {
    const RegionLinear *qkv = &lins[4 * li], *o = qkv + 1, *gu = qkv + 2, *down = qkv + 3;
    TORCH_CHECK(qkv->K == hidden && qkv->N == width && o->K == q_size && o->N == hidden && gu->K == hidden &&
                    gu->N == 2 * inter && down->K == inter && down->N == hidden,
                "decode_region: layer ", li, "'s linears do not fit the model's shapes");
    for (int64_t k : {14 * li, 14 * li + 7})
      TORCH_CHECK(weights[k].dim() == 1 && weights[k].size(0) == hidden &&
                      weights[k].scalar_type() == torch::kFloat32 && weights[k].is_contiguous(),
                  "norm weights must be float32 [hidden]");
  }
  const torch::Tensor& final_norm = weights[14 * layers];
  TORCH_CHECK(lins[4 * layers].K == hidden && final_norm.dim() == 1 && final_norm.size(0) == hidden &&
                  final_norm.scalar_type() == torch::kFloat32 && final_norm.is_contiguous(),
              "decode_region: the head does not fit");
  // caches: one layout for all layers
  for (int64_t li = 0; li < layers; ++li) {
    check_kv_cache(k_caches[li], "k_cache");
    check_kv_cache(v_caches[li], "v_cache");
    for (const auto* c : {&k_caches[li], &v_caches[li]})
      TORCH_CHECK(c->sizes() == k_caches[0].sizes() && c->strides() == k_caches[0].strides() &&
                      c->scalar_type() == k_caches[0].scalar_type(),
                  "all layers' caches must have one shape, strides and dtype");
  }
  const int64_t nb = k_caches[0].size(0), block_size = k_caches[0].size(1);
  TORCH_CHECK(k_caches[0].size(2) == kv_heads && k_caches[0].size(3) == hd, "caches do not fit the heads");
  const int64_t bstride = k_caches[0].stride(0), rstride = k_caches[0].stride(1);
  // the step's tokens: positions, slots, block tables, lengths
  for (const auto* t : {&positions, &slot_blocks, &slot_offsets, &context_lens})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == n && t->scalar_type() == torch::kInt64 && t->is_contiguous(),
                "positions, slots and context lengths must be contiguous int64 [n]");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == n && block_tables.scalar_type() == torch::kInt64 &&
                  block_tables.is_contiguous(),
              "block_tables must be contiguous int64 [n, max_blocks]");
  const int64_t max_blocks = block_tables.size(1);
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t* sb = slot_blocks.data_ptr<int64_t>();
  const int64_t* so = slot_offsets.data_ptr<int64_t>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  int64_t total = 0;
  bool own = true;  // every slot is its sequence's last position: its reader writes it
  for (int64_t s = 0; s < n; ++s) {
    TORCH_CHECK(pos[s] >= 0 && pos[s] < max_pos && sb[s] >= 0 && sb[s] < nb && so[s] >= 0 && so[s] < block_size,
                "position or slot out of range at token ", s);
    TORCH_CHECK(lens[s] >= 1 && lens[s] <= max_blocks * block_size, "context length ", lens[s],
                " out of range for ", max_blocks, " blocks");
    for (int64_t b = 0; b < (lens[s] + block_size - 1) / block_size; ++b)
      TORCH_CHECK(tables[s * max_blocks + b] >= 0 && tables[s * max_blocks + b] < nb, "block id out of range");
    own = own && sb[s] == tables[s * max_blocks + (lens[s] - 1) / block_size] && so[s] == (lens[s] - 1) % block_size;
    total += lens[s];
  }
  const int64_t group = heads / kv_heads, tasks = n * kv_heads;
  const int64_t splits = decode_splits(tasks, total * heads, lens, n, block_size);
  const int64_t part = group * hd + 2 * group, items = tasks * splits;
  const bool bf16 = k_caches[0].scalar_type() == torch::kBFloat16;
  const int64_t esize = k_caches[0].element_size();
  const float feps = static_cast<float>(eps), fscale = static_cast<float>(scale);
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();

  // shared: each phase's output, written in shares, read whole after a barrier
  std::vector<float> qkv(static_cast<size_t>(n * width)), parts(static_cast<size_t>(items * part));
  std::vector<float> o_out(static_cast<size_t>(n * hidden)), gu(static_cast<size_t>(n * 2 * inter));
  std::vector<float> dn(static_cast<size_t>(n * hidden));
  auto logits = torch::empty({n, vocab}, x.options());
  float* lp = logits.data_ptr<float>();
  float* xp = x.data_ptr<float>();
  int threads = static_cast<int>(std::max<int64_t>(1, at::get_num_threads()));
  if (threads > 1 && g_solo_left.load(std::memory_order_relaxed) > 0) {
    g_solo_left.fetch_sub(1, std::memory_order_relaxed);
    threads = 1;
  }
  RegionBarrier bar;

  dispatch_kv(k_caches[0], [&](auto tag) {
    using T = decltype(tag);
#pragma omp parallel num_threads(threads)
    {
      const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
#pragma omp single
      bar.n = nt;  // (single's own barrier: every thread sees it before the first bar.wait)
      std::vector<float> xr(xp, xp + n * hidden);  // this thread's copy of the residual stream
      std::vector<float> h(static_cast<size_t>(n * std::max(hidden, inter)));
      std::vector<float> q(static_cast<size_t>(n * q_size)), a(static_cast<size_t>(n * q_size));
      std::vector<float> krow(static_cast<size_t>(hd)), scratch;
      Codes codes;
      const int64_t ichunk = (items + nt - 1) / nt;
      const int64_t ib = std::min(items, tid * ichunk), ie = std::min(items, ib + ichunk);
      auto add_norm = [&](const float* delta, const float* w) {  // xr += delta (unless null); h = norm(xr)
        for (int64_t s = 0; s < n; ++s) {
          float* r = xr.data() + s * hidden;
          if (delta != nullptr)
            for (int64_t i = 0; i < hidden; ++i) r[i] = r[i] + delta[s * hidden + i];
          norm_row(r, w, h.data() + s * hidden, hidden, feps);
        }
      };
      // token s's kv head g: K rotated and V into its cache slot
      auto write_kv = [&](int64_t li, int64_t s, int64_t g) {
        const float* row = qkv.data() + s * width;
        rope_head(row + q_size + g * hd, krow.data(), cp + pos[s] * hd, sp + pos[s] * hd, half);
        const int64_t slot = (sb[s] * bstride + so[s] * rstride + g * hd) * esize;
        write_kv_row(krow.data(), row + q_size + kv_size + g * hd, static_cast<char*>(k_caches[li].data_ptr()) + slot,
                     static_cast<char*>(v_caches[li].data_ptr()) + slot, hd, bf16);
      };
      for (int64_t li = 0; li < layers; ++li) {
        const RegionLinear* L = &lins[4 * li];
        add_norm(li == 0 ? nullptr : dn.data(), weights[14 * li].data_ptr<float>());
        region_linear(L[0], h.data(), n, qkv.data(), tid, nt, codes);
        bar.wait();
        for (int64_t s = 0; s < n; ++s)
          for (int64_t hh = 0; hh < heads; ++hh)
            rope_head(qkv.data() + s * width + hh * hd, q.data() + s * q_size + hh * hd, cp + pos[s] * hd,
                      sp + pos[s] * hd, half);
        if (!own) {
#pragma omp single
          for (int64_t s = 0; s < n; ++s)
            for (int64_t g = 0; g < kv_heads; ++g) write_kv(li, s, g);
        }
        const T* kp = static_cast<const T*>(k_caches[li].data_ptr());
        const T* vp = static_cast<const T*>(v_caches[li].data_ptr());
        for (int64_t i = ib; i < ie; ++i) {
          const int64_t task = i / splits, s = task / kv_heads;
          if (own && i % splits == last_split(lens[s], block_size, splits)) write_kv(li, s, task % kv_heads);
          decode_item(i, splits, kv_heads, group, hd, q.data(), q_size, hd, kp, vp, bstride, rstride, tables,
                      max_blocks, lens, block_size, fscale, scratch, parts.data() + i * part);
        }
        bar.wait();
        for (int64_t task = 0; task < tasks; ++task)
          combine_task(parts.data() + task * splits * part, splits, group, hd,
                       a.data() + (task / kv_heads) * q_size + (task % kv_heads) * group * hd, hd);
        region_linear(L[1], a.data(), n, o_out.data(), tid, nt, codes);
        bar.wait();
        add_norm(o_out.data(), weights[14 * li + 7].data_ptr<float>());
        region_linear(L[2], h.data(), n, gu.data(), tid, nt, codes);
        bar.wait();
        for (int64_t s = 0; s < n; ++s)
          silu_mul_row(gu.data() + s * 2 * inter, gu.data() + s * 2 * inter + inter, h.data() + s * inter, inter);
        region_linear(L[3], h.data(), n, dn.data(), tid, nt, codes);
        bar.wait();
      }
      add_norm(dn.data(), final_norm.data_ptr<float>());
      region_linear(lins[4 * layers], h.data(), n, lp, tid, nt, codes);
      if (tid == 0) std::copy(xr.begin(), xr.end(), xp);
    }
  });
  const int sleeps = bar.sleeps.load(std::memory_order_relaxed), rounds = bar.gen.load();
  if (threads > 1) {
    const int run = 2 * sleeps < rounds ? 0 : std::min(kSoloMax, std::max(kSoloMin, 2 * g_solo_run.load()));
    g_solo_run.store(run, std::memory_order_relaxed);
    g_solo_left.store(run, std::memory_order_relaxed);
  }
  g_last_team.store(threads, std::memory_order_relaxed);
  g_last_sleeps.store(sleeps, std::memory_order_relaxed);
  return logits;
#else
  TORCH_CHECK(false, "decode_region needs the AVX-512 kernels");
  return torch::Tensor();
#endif
}

// A whole decode step of the model in one call (engine.model.LlamaModel._forward_decode): every
// layer, the final norm and the LM head, for a batch of decode tokens (one per sequence, no
// prefill rows). It calls the same kernels, in the same order, on the same operands as the
// layer-by-layer path (_forward_fused), so the logits are the same bit for bit; what it saves is
// the Python between them (~10 calls a layer, a few microseconds each).
//
// Each linear is given as (form, weight, scale, row sums, activation group), the forms numbered
// as kForm* below; absent tensors are empty placeholders.
#include <torch/extension.h>

#include <cstdint>
#include <vector>

namespace {

constexpr int64_t kFormF32 = 0, kFormBF16 = 1, kFormInt8 = 2, kFormInt8Group = 3, kFormW8A16 = 4, kFormFP8 = 5,
                  kFormFP8B = 6;
constexpr int64_t kSkinnyRows = 64;  // engine.model.SKINNY_MAX_ROWS

struct Linear {
  int64_t form, group;
  const torch::Tensor *w, *s, *rs;
};

torch::Tensor apply(const Linear& l, const torch::Tensor& x, bool skinny) {
  switch (l.form) {
    case kFormF32:
      return skinny && x.size(0) <= kSkinnyRows ? skinny_linear(x, *l.w) : split_linear(x, *l.w);
    case kFormBF16:
      return bf16_linear(x, *l.w);
    case kFormInt8:
      return int8_linear(x, *l.w, *l.s, *l.rs);
    case kFormInt8Group:
      return int8_group_linear(x, *l.w, *l.s, l.group);
    case kFormW8A16:
      return w8a16_linear(x, *l.w, *l.s);
    case kFormFP8:
      return fp8_linear(x, l.w->view(torch::kUInt8), *l.s);
    case kFormFP8B:
      return fp8b_linear(x, l.w->view(torch::kUInt8), *l.s);
  }
  TORCH_CHECK(false, "unknown linear form ", l.form);
  return torch::Tensor();
}

}  // namespace

// x [n, hidden] float32: the embedded tokens (the residual stream, updated in place).
// weights: per layer [ln1, qkv (w, s, rs), o (w, s, rs), ln2, gate_up (w, s, rs), down (w, s, rs)]
// (14 tensors), then [norm, head w, head s, head rs]; forms: per layer (form, group) of qkv, o,
// gate_up, down (8 ints), then the head's (form, group). k_caches / v_caches: each layer's cache
// view. Returns the logits [n, vocab].
torch::Tensor decode_step(torch::Tensor x, torch::Tensor positions, torch::Tensor slot_blocks,
                          torch::Tensor slot_offsets, torch::Tensor block_tables, torch::Tensor context_lens,
                          torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> k_caches,
                          std::vector<torch::Tensor> v_caches, std::vector<torch::Tensor> weights,
                          std::vector<int64_t> forms, int64_t heads, int64_t kv_heads, double eps, double scale,
                          bool skinny) {
  const int64_t layers = static_cast<int64_t>(k_caches.size());
  TORCH_CHECK(static_cast<int64_t>(v_caches.size()) == layers &&
                  static_cast<int64_t>(weights.size()) == 14 * layers + 4 &&
                  static_cast<int64_t>(forms.size()) == 8 * layers + 2,
              "decode_step: 14 weights and 8 form fields a layer, plus the head's");
  const int64_t n = x.size(0), hd = cos.size(1), q_size = heads * hd;
  auto lin = [&](int64_t li, int j) {
    const int64_t w0 = 14 * li + (j == 0 ? 1 : j == 1 ? 4 : j == 2 ? 8 : 11);
    return Linear{forms[8 * li + 2 * j], forms[8 * li + 2 * j + 1], &weights[w0], &weights[w0 + 1],
                  &weights[w0 + 2]};
  };
  torch::Tensor delta;
  for (int64_t li = 0; li < layers; ++li) {
    const torch::Tensor& ln1 = weights[14 * li];
    const torch::Tensor& ln2 = weights[14 * li + 7];
    torch::Tensor h = li == 0 ? rms_norm(x, ln1, eps) : add_rms_norm(x, delta, ln1, eps);
    torch::Tensor qkv = apply(lin(li, 0), h, skinny);
    rope_write_kv(qkv, positions, cos, sin, k_caches[li], v_caches[li], slot_blocks, slot_offsets, heads, kv_heads);
    torch::Tensor q = qkv.narrow(1, 0, q_size).view({n, heads, hd});
    torch::Tensor a = torch::empty({n, heads, hd}, x.options());
    decode_attention(a, q, k_caches[li], v_caches[li], block_tables, context_lens, scale);
    h = add_rms_norm(x, apply(lin(li, 1), a.view({n, q_size}), skinny), ln2, eps);
    delta = apply(lin(li, 3), silu_mul(apply(lin(li, 2), h, skinny)), skinny);
  }
  if (delta.defined()) x.add_(delta);
  const int64_t hw = 14 * layers;
  const Linear head{forms[8 * layers], forms[8 * layers + 1], &weights[hw + 1], &weights[hw + 2], &weights[hw + 3]};
  return apply(head, rms_norm(x, weights[hw], eps), skinny);
}

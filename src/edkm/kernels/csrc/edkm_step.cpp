// edkm_step: one decode step (one new token) of a Llama-architecture model, every layer, in C++.
//
// Why: at batch 1 on a CPU a decode step through Python makes ~15 tensor calls per layer, and their dispatch
// (~1-3 us each) costs a third of the packed weights' reading time on a 135 M-parameter model. Here the packed
// projections run through the same kernel as edkm_lut's gemv (one call per fused projection) and the small
// per-token work (RMSNorm, rotary embedding, KV-cache append, residuals) runs as plain loops over a few thousand
// floats; attention over the cache and the SiLU gate as a few vectorized ATen calls.
//
// Numerics: the formulas of transformers' LlamaForCausalLM in fp32 (RMSNorm with an fp64 mean of squares,
// x * cos + rotate_half(x) * sin, softmax(q k^T / sqrt(d)) v, silu(gate) * up); sums in a different order, so
// the logits equal the Python forward's to fp32 rounding (tested), not bit for bit.
//
// The model is held by the Python caller (edkm.generation.llama.LeanLlama): this object only keeps its tensors
// (the same storages: the KV cache is shared with the Python prefill path).

#include "edkm_lut.h"

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

struct Projection {
  at::Tensor packed, table, bias;  // bias: empty (numel 0) when the layer has none
  int64_t bits, rows, cols, R, C;

  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor y = edkm::packed_gemv(x, packed, table, bits, rows, cols, R, C, "auto");
    if (bias.numel()) y.add_(bias);
    return y;
  }
};

void rms_norm(const float* x, const float* w, float* out, int64_t n, double eps) {
  double ss = 0;
  for (int64_t i = 0; i < n; ++i) ss += double(x[i]) * x[i];
  const float r = float(1.0 / std::sqrt(float(ss / n) + eps));
  for (int64_t i = 0; i < n; ++i) out[i] = w[i] * (x[i] * r);
}

// x (heads, d) in place: x * cos + rotate_half(x) * sin, with rotate_half's sign already in `ssin`.
void rotate(float* x, int64_t heads, int64_t d, const float* cos, const float* ssin) {
  const int64_t half = d / 2;
  std::vector<float> t(d);
  for (int64_t h = 0; h < heads; ++h) {
    float* v = x + h * d;
    for (int64_t i = 0; i < d; ++i) t[i] = v[i] * cos[i] + v[i < half ? i + half : i - half] * ssin[i];
    std::copy(t.begin(), t.end(), v);
  }
}

class LlamaStep {
 public:
  LlamaStep(std::vector<std::vector<at::Tensor>> proj_tensors, std::vector<std::vector<int64_t>> proj_shapes,
            std::vector<at::Tensor> norms, at::Tensor keys, at::Tensor values, at::Tensor cos, at::Tensor ssin,
            int64_t heads, double eps)
      : norms_(std::move(norms)), keys_(keys), values_(values), cos_(cos), ssin_(ssin), heads_(heads), eps_(eps) {
    TORCH_CHECK(proj_tensors.size() == proj_shapes.size() && proj_tensors.size() % 4 == 1,
                "4 projections per layer and the head");
    for (size_t i = 0; i < proj_tensors.size(); ++i) {
      const auto& t = proj_tensors[i];
      const auto& s = proj_shapes[i];
      TORCH_CHECK(t.size() == 3 && s.size() == 5, "a projection is (packed, table, bias), (bits, rows, cols, R, C)");
      projs_.push_back(Projection{t[0], t[1].contiguous(), t[2], s[0], s[1], s[2], s[3], s[4]});
    }
    layers_ = int64_t(projs_.size() / 4);
    TORCH_CHECK(int64_t(norms_.size()) == 2 * layers_ + 1, "two norms per layer and the final norm");
    TORCH_CHECK(keys.dim() == 4 && keys.size(0) == layers_ && keys.is_contiguous() && values.sizes() == keys.sizes() &&
                    values.is_contiguous() && keys.scalar_type() == at::kFloat,
                "keys/values must be contiguous fp32 (layers, kv heads, max tokens, head dim)");
    kv_ = keys.size(1);
    max_ = keys.size(2);
    d_ = keys.size(3);
    TORCH_CHECK(heads_ % kv_ == 0, "query heads must be a multiple of key/value heads");
    TORCH_CHECK(cos.is_contiguous() && ssin.is_contiguous() && cos.size(0) >= max_ && cos.size(-1) == d_,
                "cos/sin must be contiguous (max tokens, head dim)");
  }

  // Logits (vocab,) of the next token after the token whose embedding is x (hidden,) at position pos.
  at::Tensor step(const at::Tensor& x_in, int64_t pos) {
    TORCH_CHECK(pos >= 0 && pos < max_, "position ", pos, " outside the cache of ", max_, " tokens");
    const int64_t hidden = x_in.numel(), qd = heads_ * d_, kd = kv_ * d_;
    at::Tensor x = x_in.to(at::kFloat).contiguous().reshape({1, hidden}).clone();
    at::Tensor h = at::empty({1, hidden}, x.options());
    float* xp = x.data_ptr<float>();
    const float* cos = cos_.data_ptr<float>() + pos * d_;
    const float* ssin = ssin_.data_ptr<float>() + pos * d_;
    for (int64_t l = 0; l < layers_; ++l) {
      rms_norm(xp, norms_[2 * l].data_ptr<float>(), h.data_ptr<float>(), hidden, eps_);
      at::Tensor qkv = projs_[4 * l](h);
      float* q = qkv.data_ptr<float>();
      rotate(q, heads_ + kv_, d_, cos, ssin);  // q and k are adjacent: one pass
      float* kc = keys_.data_ptr<float>() + l * kv_ * max_ * d_;
      float* vc = values_.data_ptr<float>() + l * kv_ * max_ * d_;
      for (int64_t g = 0; g < kv_; ++g) {
        std::copy(q + qd + g * d_, q + qd + (g + 1) * d_, kc + (g * max_ + pos) * d_);
        std::copy(q + qd + kd + g * d_, q + qd + kd + (g + 1) * d_, vc + (g * max_ + pos) * d_);
      }
      x.add_(projs_[4 * l + 1](attend(qkv, l, pos + 1)));
      rms_norm(xp, norms_[2 * l + 1].data_ptr<float>(), h.data_ptr<float>(), hidden, eps_);
      at::Tensor gu = projs_[4 * l + 2](h);
      const int64_t inter = gu.size(1) / 2;
      at::Tensor gate = gu.narrow(1, 0, inter);
      at::silu_(gate).mul_(gu.narrow(1, inter, inter));  // ATen's vectorized SiLU (exp per element)
      x.add_(projs_[4 * l + 3](gate.contiguous()));
    }
    rms_norm(xp, norms_[2 * layers_].data_ptr<float>(), h.data_ptr<float>(), hidden, eps_);
    return projs_[4 * layers_](h).reshape({-1});
  }

 private:
  // softmax(q k^T / sqrt(d)) v over the first n cached positions of layer l, grouped-query heads: (1, heads * d).
  // Three batched ATen calls (vectorized exp and products) rather than loops: at 200 cached tokens scalar
  // loops cost ~2 ms per token.
  at::Tensor attend(const at::Tensor& qkv, int64_t l, int64_t n) const {
    const int64_t group = heads_ / kv_;
    const at::Tensor q = qkv.narrow(1, 0, heads_ * d_).view({kv_, group, d_});
    const at::Tensor k = keys_.select(0, l).narrow(1, 0, n);  // (kv, n, d), strided
    const at::Tensor v = values_.select(0, l).narrow(1, 0, n);
    const at::Tensor p = at::softmax(at::bmm(q, k.transpose(1, 2)).mul_(1.0 / std::sqrt(double(d_))), -1);
    return at::bmm(p, v).view({1, heads_ * d_});
  }

  std::vector<Projection> projs_;
  std::vector<at::Tensor> norms_;
  at::Tensor keys_, values_, cos_, ssin_;
  int64_t heads_, kv_ = 0, max_ = 0, d_ = 0, layers_ = 0;
  double eps_;
};

}  // namespace

void edkm::register_step(pybind11::module& m) {
  pybind11::class_<LlamaStep>(m, "LlamaStep", "one decode step of a Llama model over packed projections")
      .def(pybind11::init<std::vector<std::vector<at::Tensor>>, std::vector<std::vector<int64_t>>,
                          std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor, at::Tensor, int64_t, double>(),
           pybind11::arg("projections"), pybind11::arg("shapes"), pybind11::arg("norms"), pybind11::arg("keys"),
           pybind11::arg("values"), pybind11::arg("cos"), pybind11::arg("signed_sin"), pybind11::arg("heads"),
           pybind11::arg("eps"))
      .def("step", &LlamaStep::step, "logits after one token (its embedding) at a position", pybind11::arg("x"),
           pybind11::arg("position"));
}

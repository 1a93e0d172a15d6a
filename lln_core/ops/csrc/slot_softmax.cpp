// Softmax parts of decode queries over stored key/value slots, with AVX-512.
//
// A decode step attends its G query heads per KV head over a few hundred to a few thousand
// stored slots (the window, the sparse cache) whose keys and values are float32 or bfloat16.
// Compiled by inductor, that is a reduction over D per (query, slot) at ~7 GFLOP/s, and it was
// the largest part of a step after the weights. Here each (row, KV head, block of slots) is one
// task: the keys are widened in registers, the block's logits stay in L1, exp is a polynomial
// with scalef, and the values are read once for all G queries. The blocks' parts are merged
// under a shared max (flash-decoding's split over the keys), so a batch of one still uses every
// thread.
//
// q [B, H, G, D] float32 (already scaled), k [B, H, N, D], v [B, H, N, Dv] float32 or bfloat16
// (each on its own: keys rotated per step are float32 beside bfloat16 values),
// bias [B, N] float32 (0 where the slot is seen, -inf where not, or any finite bias).
// Returns num [B, H, G, Dv] = sum_n exp(l_n - top) v_n, den [B, H, G] = sum_n exp(l_n - top) and
// top [B, H, G] = max_n l_n with l_n = q . k_n + bias_n; top = -inf, den = 0, num = 0 where no
// slot is seen.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>

namespace {

constexpr int64_t kBlock = 128;  // slots per task: a block's logits and rows stay in L1
constexpr int64_t kMaxGroup = 16;
constexpr int64_t kMaxDim = 256;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
#define LLN_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))

LLN_AVX512 inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }

LLN_AVX512 inline __m512 load16(const c10::BFloat16* p) {  // bfloat16 is float32's top half
  const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
}

// exp(x) for x <= 0, exact 0 below -87 (where float32's exp leaves the normal range) and at
// -inf: 2^n * 2^f with f in [-1/2, 1/2], 2^f by its degree-7 Taylor polynomial (error < 1e-8)
LLN_AVX512 inline __m512 exp_nonpositive(__m512 x) {
  const __mmask16 normal = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.f), _CMP_GT_OQ);
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(1.44269504f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.693147181f));  // ln 2^f
  __m512 p = _mm512_set1_ps(1.f / 5040.f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 720.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_maskz_mov_ps(normal, _mm512_scalef_ps(p, n));
}

struct Part {  // one block's softmax over its slots, per query: views of a shared buffer
  float* top;  // [G]
  float* den;  // [G]
  float* num;  // [G, Dv]
};

template <typename TK, typename TV>
struct Args {
  const float* q;
  const TK* k;
  const TV* v;
  const float* bias;
  int64_t H, G, N, D, Dv;
  int64_t q_b, q_h, q_g, k_b, k_h, k_n, v_b, v_h, v_n, bias_b;
};

// logits of the G queries over slots [start, end) of (b, h) -> part, by the block's own max.
// kG, kD16 > 0: G and D / 16 = Dv / 16 known at compile time (the sums stay in registers)
template <typename TK, typename TV, int kG, int kD16>
LLN_AVX512 void block_part(const Args<TK, TV>& a, int64_t b, int64_t h, int64_t start, int64_t end,
                           Part& part) {
  alignas(64) float logits[kMaxGroup][kBlock + 16];
  const int64_t len = end - start;
  const float* bias = a.bias + b * a.bias_b;
  const float* q = a.q + b * a.q_b + h * a.q_h;
  const int64_t G = kG > 0 ? kG : a.G;
  const int64_t d16 = kG > 0 ? kD16 : a.D / 16, dv16 = kG > 0 ? kD16 : a.Dv / 16;
  for (int64_t g = 0; g < G; ++g) part.top[g] = kNegInf;
  for (int64_t i = 0; i < len; ++i) {
    const float bn = bias[start + i];
    if (bn == kNegInf) {
      for (int64_t g = 0; g < G; ++g) logits[g][i] = kNegInf;
      continue;
    }
    const TK* krow = a.k + b * a.k_b + h * a.k_h + (start + i) * a.k_n;
    __m512 key[kMaxDim / 16];
    for (int64_t j = 0; j < d16; ++j) key[j] = load16(krow + 16 * j);
    for (int64_t g = 0; g < G; ++g) {
      const float* qg = q + g * a.q_g;
      __m512 acc = _mm512_mul_ps(load16(qg), key[0]);
      for (int64_t j = 1; j < d16; ++j) acc = _mm512_fmadd_ps(load16(qg + 16 * j), key[j], acc);
      const float l = _mm512_reduce_add_ps(acc) + bn;
      logits[g][i] = l;
      part.top[g] = std::max(part.top[g], l);
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    std::fill(part.num + g * a.Dv, part.num + (g + 1) * a.Dv, 0.f);
    part.den[g] = 0.f;
    if (part.top[g] == kNegInf) continue;
    const __m512 top = _mm512_set1_ps(part.top[g]);
    __m512 den = _mm512_setzero_ps();
    for (int64_t i = 0; i < len; i += 16) {
      const __mmask16 tail = len - i >= 16 ? 0xFFFF : (__mmask16)((1u << (len - i)) - 1);
      const __m512 l = _mm512_mask_loadu_ps(_mm512_set1_ps(kNegInf), tail, &logits[g][i]);
      const __m512 w = exp_nonpositive(_mm512_sub_ps(l, top));
      _mm512_mask_storeu_ps(&logits[g][i], tail, w);
      den = _mm512_add_ps(den, w);
    }
    part.den[g] = _mm512_reduce_add_ps(den);
  }
  if constexpr (kG > 0) {  // the G x Dv sums in registers
    __m512 acc[kG][kD16];
    for (int g = 0; g < kG; ++g)
      for (int j = 0; j < kD16; ++j) acc[g][j] = _mm512_setzero_ps();
    for (int64_t i = 0; i < len; ++i) {
      if (bias[start + i] == kNegInf) continue;  // weight 0: its value is not read
      const TV* vrow = a.v + b * a.v_b + h * a.v_h + (start + i) * a.v_n;
      __m512 value[kD16];
      for (int j = 0; j < kD16; ++j) value[j] = load16(vrow + 16 * j);
      for (int g = 0; g < kG; ++g) {
        const __m512 w = _mm512_set1_ps(logits[g][i]);
        for (int j = 0; j < kD16; ++j) acc[g][j] = _mm512_fmadd_ps(w, value[j], acc[g][j]);
      }
    }
    for (int g = 0; g < kG; ++g)
      for (int j = 0; j < kD16; ++j) _mm512_storeu_ps(part.num + g * a.Dv + 16 * j, acc[g][j]);
  } else {
    for (int64_t i = 0; i < len; ++i) {
      if (bias[start + i] == kNegInf) continue;
      const TV* vrow = a.v + b * a.v_b + h * a.v_h + (start + i) * a.v_n;
      __m512 value[kMaxDim / 16];
      for (int64_t j = 0; j < dv16; ++j) value[j] = load16(vrow + 16 * j);
      for (int64_t g = 0; g < G; ++g) {
        const __m512 w = _mm512_set1_ps(logits[g][i]);
        float* num = part.num + g * a.Dv;
        for (int64_t j = 0; j < dv16; ++j)
          _mm512_storeu_ps(num + 16 * j, _mm512_fmadd_ps(w, value[j], load16(num + 16 * j)));
      }
    }
  }
}

template <typename TK, typename TV>
using BlockFn = void (*)(const Args<TK, TV>&, int64_t, int64_t, int64_t, int64_t, Part&);

// the compiled-in shape for (G, D = Dv): G x D / 16 sums of up to 24 registers; else generic
template <typename TK, typename TV>
BlockFn<TK, TV> block_for(int64_t G, int64_t D, int64_t Dv) {
  if (D == Dv && D == 64) {
    switch (G) {
      case 1: return block_part<TK, TV, 1, 4>;
      case 2: return block_part<TK, TV, 2, 4>;
      case 3: return block_part<TK, TV, 3, 4>;
      case 4: return block_part<TK, TV, 4, 4>;
      case 5: return block_part<TK, TV, 5, 4>;
      case 6: return block_part<TK, TV, 6, 4>;
    }
  }
  if (D == Dv && D == 128) {
    switch (G) {
      case 1: return block_part<TK, TV, 1, 8>;
      case 2: return block_part<TK, TV, 2, 8>;
      case 3: return block_part<TK, TV, 3, 8>;
    }
  }
  return block_part<TK, TV, 0, 0>;
}

template <typename TK, typename TV>
void run(const Args<TK, TV>& a, int64_t B, float* num, float* den, float* top) {
  const BlockFn<TK, TV> block_fn = block_for<TK, TV>(a.G, a.D, a.Dv);
  const int64_t blocks = std::max<int64_t>((a.N + kBlock - 1) / kBlock, 1);
  const int64_t tasks = B * a.H * blocks, per_task = a.G * (a.Dv + 2);
  std::unique_ptr<float[]> buffer(new float[tasks * per_task]);
  auto part_of = [&](int64_t task) {
    float* base = buffer.get() + task * per_task;
    return Part{base, base + a.G, base + 2 * a.G};
  };
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / blocks, block = task % blocks;
      const int64_t start = block * kBlock, stop = std::min(start + kBlock, a.N);
      Part part = part_of(task);
      block_fn(a, bh / a.H, bh % a.H, start, stop, part);
    }
  });
  for (int64_t bh = 0; bh < B * a.H; ++bh) {  // merge the blocks under their shared max
    for (int64_t g = 0; g < a.G; ++g) {
      float best = kNegInf;
      for (int64_t j = 0; j < blocks; ++j) best = std::max(best, part_of(bh * blocks + j).top[g]);
      float* out = num + (bh * a.G + g) * a.Dv;
      std::fill(out, out + a.Dv, 0.f);
      float total = 0.f;
      if (best != kNegInf) {
        for (int64_t j = 0; j < blocks; ++j) {
          const Part part = part_of(bh * blocks + j);
          if (part.top[g] == kNegInf) continue;
          const float w = std::exp(part.top[g] - best);
          total += w * part.den[g];
          for (int64_t d = 0; d < a.Dv; ++d) out[d] += w * part.num[g * a.Dv + d];
        }
      }
      den[bh * a.G + g] = total;
      top[bh * a.G + g] = best;
    }
  }
}

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> slot_softmax(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& bias) {
  TORCH_CHECK(supported(), "slot_softmax needs AVX-512 (avx512f/bw/vl/dq)");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && bias.dim() == 2,
              "slot_softmax: q [B, H, G, D], k [B, H, N, D], v [B, H, N, Dv], bias [B, N]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && bias.scalar_type() == at::kFloat,
              "slot_softmax: q and bias are float32");
  const auto stored = [](const at::Tensor& t) {
    return t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16;
  };
  TORCH_CHECK(stored(k) && stored(v), "slot_softmax: k and v are float32 or bfloat16");
  const int64_t B = q.size(0), H = q.size(1), G = q.size(2), D = q.size(3);
  const int64_t N = k.size(2), Dv = v.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == H && k.size(3) == D && v.size(0) == B &&
                  v.size(1) == H && v.size(2) == N && bias.size(0) == B && bias.size(1) == N,
              "slot_softmax: shapes do not match");
  TORCH_CHECK(G >= 1 && G <= kMaxGroup, "slot_softmax: 1 to 16 queries per KV head");
  TORCH_CHECK(D % 16 == 0 && Dv % 16 == 0 && D > 0 && Dv > 0 && D <= kMaxDim && Dv <= kMaxDim,
              "slot_softmax: head dims are multiples of 16 up to 256");
  const at::Tensor qc = q.stride(3) == 1 ? q : q.contiguous();
  const at::Tensor kc = k.stride(3) == 1 ? k : k.contiguous();
  const at::Tensor vc = v.stride(3) == 1 ? v : v.contiguous();
  const at::Tensor bc = bias.stride(1) == 1 ? bias : bias.contiguous();
  auto num = at::empty({B, H, G, Dv}, q.options());
  auto den = at::empty({B, H, G}, q.options());
  auto top = at::empty({B, H, G}, q.options());
  auto launch = [&](auto* k_ptr, auto* v_ptr) {
    using TK = std::remove_const_t<std::remove_pointer_t<decltype(k_ptr)>>;
    using TV = std::remove_const_t<std::remove_pointer_t<decltype(v_ptr)>>;
    Args<TK, TV> a{qc.data_ptr<float>(), k_ptr, v_ptr, bc.data_ptr<float>(), H, G, N, D, Dv,
              qc.stride(0), qc.stride(1), qc.stride(2), kc.stride(0), kc.stride(1), kc.stride(2),
              vc.stride(0), vc.stride(1), vc.stride(2), bc.stride(0)};
    run(a, B, num.data_ptr<float>(), den.data_ptr<float>(), top.data_ptr<float>());
  };
  // keys rotated per step (grouped far positions) are float32 beside bfloat16 values
  auto with_value = [&](auto* k_ptr) {
    if (v.scalar_type() == at::kFloat)
      launch(k_ptr, vc.data_ptr<float>());
    else
      launch(k_ptr, vc.data_ptr<c10::BFloat16>());
  };
  if (B * H > 0) {
    if (k.scalar_type() == at::kFloat)
      with_value(kc.data_ptr<float>());
    else
      with_value(kc.data_ptr<c10::BFloat16>());
  }
  return {num, den, top};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lln, m) {
  m.def("slot_softmax(Tensor q, Tensor k, Tensor v, Tensor bias) -> (Tensor, Tensor, Tensor)");
  m.def("slot_softmax_supported() -> bool", &supported);
}

TORCH_LIBRARY_IMPL(lln, CPU, m) { m.impl("slot_softmax", &slot_softmax); }

// int8 weights x float32 activations for the rows of a decode step, with AVX-512 VNNI.
//
// y[m, n] = scale[n] * sum_k x[m, k] * w[n, k], w int8 per output channel. The activations are
// quantized on the fly to int8 in groups of 4 (one float32 scale per group: max |x| / 127), so
// that VNNI's vpdpbusd multiplies 64 weight bytes by 64 activation bytes in one instruction and
// each of its 16 int32 lanes (one group) is scaled on its own: PyTorch's _weight_int8pack_mm
// widens every weight to float32 first and is compute bound at about half this CPU's memory
// bandwidth. vpdpbusd takes one unsigned operand: |q| goes in, and the sign of q moves onto
// the weight (a masked negation; weights are in [-127, 127]).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;    // weight bytes per vpdpbusd: 16 lanes of 4
constexpr int64_t kGroup = 4;     // activations per scale: one int32 lane
constexpr int64_t kRows = 8;      // output channels per inner loop
constexpr int64_t kPrefetch = 8;  // rows ahead whose weights are prefetched
constexpr int64_t kMaxRows = 4;   // activation rows per pass over a group of weight rows
#define LLN_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// x [M, K] -> q int8 [M, nb * 64] (zero-padded) and scales [M, nb * 16], one per group of 4:
// 16 values at a time, the group maxima by two swaps within each 128-bit lane (one group)
LLN_VNNI void quantize_activations(const float* x, int64_t M, int64_t K, int8_t* q, float* scales) {
  const int64_t padded = (K + kBlock - 1) / kBlock * kBlock;
  const __m512 one = _mm512_set1_ps(1.f), int8_max = _mm512_set1_ps(127.f);
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < padded; k += 16) {
      const __mmask16 mask = k >= K ? 0 : K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(mask, x + m * K + k);
      __m512 amax = _mm512_abs_ps(v);
      amax = _mm512_max_ps(amax, _mm512_permute_ps(amax, 0xB1));  // swap neighbours
      amax = _mm512_max_ps(amax, _mm512_permute_ps(amax, 0x4E));  // swap pairs
      const __mmask16 zero = _mm512_cmp_ps_mask(amax, _mm512_setzero_ps(), _CMP_EQ_OQ);
      const __m512 scale = _mm512_mask_blend_ps(zero, _mm512_div_ps(amax, int8_max), one);
      const __m512 rounded = _mm512_roundscale_ps(_mm512_div_ps(v, scale), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + m * padded + k), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(rounded)));
      _mm512_mask_compressstoreu_ps(scales + (m * padded + k) / kGroup, 0x1111, scale);
    }
  }
}

struct Args {
  const int8_t* q;       // [M, nb * 64]
  const float* xscale;   // [M, nb * 16]
  const int8_t* w;       // [N, K]
  const float* wscale;   // [N]
  float* out;            // [M, N]
  int64_t K, N, nb;
};

// weight rows [n, n + R) against activation rows [m0, m0 + M)
template <int M, int R, bool kPrefetchAhead>
LLN_VNNI void dot_rows(const Args& a, int64_t m0, int64_t n) {
  __m512 acc[R][M];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  const __m512i zero = _mm512_setzero_si512();
  const int8_t* q = a.q + m0 * a.nb * kBlock;
  const float* xscale = a.xscale + m0 * a.nb * (kBlock / kGroup);
  for (int64_t b = 0; b < a.nb; ++b) {
    const int64_t k = b * kBlock;
    const __mmask64 mask = a.K - k >= kBlock ? ~0ULL : (1ULL << (a.K - k)) - 1;
    __m512i xabs[M];
    __mmask64 xneg[M];
    __m512 xs[M];
    for (int m = 0; m < M; ++m) {
      const __m512i xq = _mm512_loadu_si512(q + m * a.nb * kBlock + k);
      xneg[m] = _mm512_movepi8_mask(xq);
      xabs[m] = _mm512_abs_epi8(xq);
      xs[m] = _mm512_loadu_ps(xscale + (m * a.nb + b) * (kBlock / kGroup));
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* row = a.w + (n + r) * a.K + k;
      if constexpr (kPrefetchAhead) _mm_prefetch(reinterpret_cast<const char*>(row + kPrefetch * a.K), _MM_HINT_T0);
      const __m512i wv = _mm512_maskz_loadu_epi8(mask, row);
      for (int m = 0; m < M; ++m) {
        const __m512i ws = _mm512_mask_sub_epi8(wv, xneg[m], zero, wv);
        const __m512i dot = _mm512_dpbusd_epi32(zero, xabs[m], ws);
        acc[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), xs[m], acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M; ++m)
      a.out[(m0 + m) * a.N + n + r] = _mm512_reduce_add_ps(acc[r][m]) * a.wscale[n + r];
}

// weight rows [n, n + R) against every activation row, kMaxRows at a time: the first pass
// streams the weights from memory (prefetching ahead), the others find them in L1
template <int R, bool kPrefetchAhead>
LLN_VNNI void dot_all_rows(const Args& a, int64_t M, int64_t n) {
  for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
    const bool first = m0 == 0;
    switch (std::min<int64_t>(kMaxRows, M - m0)) {
      case 1: first ? dot_rows<1, R, kPrefetchAhead>(a, m0, n) : dot_rows<1, R, false>(a, m0, n); break;
      case 2: first ? dot_rows<2, R, kPrefetchAhead>(a, m0, n) : dot_rows<2, R, false>(a, m0, n); break;
      case 3: first ? dot_rows<3, R, kPrefetchAhead>(a, m0, n) : dot_rows<3, R, false>(a, m0, n); break;
      default: first ? dot_rows<4, R, kPrefetchAhead>(a, m0, n) : dot_rows<4, R, false>(a, m0, n); break;
    }
  }
}

LLN_VNNI void gemv(const Args& a, int64_t M) {
  // each thread takes a contiguous run of rows: one forward stream through the weights
  at::parallel_for(0, (a.N + kRows - 1) / kRows, 4, [&](int64_t g0, int64_t g1) {
    int64_t n = g0 * kRows;
    const int64_t end = std::min(a.N, g1 * kRows);
    for (; n + kRows + kPrefetch <= end; n += kRows) dot_all_rows<kRows, true>(a, M, n);
    for (; n + kRows <= end; n += kRows) dot_all_rows<kRows, false>(a, M, n);
    for (; n < end; ++n) dot_all_rows<1, false>(a, M, n);
  });
}

bool supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
}

at::Tensor int8_gemv(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale) {
  static const bool cpu_has_vnni = supported();
  TORCH_CHECK(cpu_has_vnni, "int8_gemv: this CPU has no AVX-512 VNNI");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && scale.dim() == 1, "int8_gemv: x [M, K], w [N, K], scale [N]");
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "int8_gemv: CPU tensors");
  TORCH_CHECK(w.scalar_type() == at::kChar, "int8_gemv: int8 weights");
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0), nb = (K + kBlock - 1) / kBlock;
  TORCH_CHECK(M >= 1, "int8_gemv: at least one row");
  TORCH_CHECK(w.size(1) == K && scale.size(0) == N, "int8_gemv: shapes do not match");
  const auto xf = x.to(at::kFloat).contiguous();
  const auto wc = w.contiguous();
  const auto sf = scale.to(at::kFloat).contiguous();
  // the quantized activations: scratch of the calling thread (a step makes ~200 calls; two
  // allocations each were ~2% of an int8 decode step)
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> xscale;
  q.resize(M * nb * kBlock);
  xscale.resize(M * nb * kBlock / kGroup);
  quantize_activations(xf.data_ptr<float>(), M, K, q.data(), xscale.data());
  auto out = at::empty({M, N}, xf.options());
  const Args a{q.data(), xscale.data(), wc.data_ptr<int8_t>(), sf.data_ptr<float>(),
               out.data_ptr<float>(), K, N, nb};
  gemv(a, M);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lln, m) {
  m.def("int8_gemv(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int8_gemv_supported() -> bool", &supported);
}

TORCH_LIBRARY_IMPL(lln, CPU, m) { m.impl("int8_gemv", &int8_gemv); }

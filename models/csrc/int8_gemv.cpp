// int8 weights x float32 activations for the rows of a decode step: AVX-512 VNNI and AMX.
//
// y[m, n] = scale[n] * sum_k x[m, k] * w[n, k], w int8 per output channel. The activations are
// quantized on the fly to int8 in groups of 16 (one float32 scale per group: max |x| / 127);
// each group's dot product is exact in int32 and is scaled on its own. PyTorch's
// _weight_int8pack_mm widens every weight to float32 first and is compute bound at about half
// this CPU's memory bandwidth.
//
// int8_gemv (few rows, weights [N, K] as stored): VNNI's vpdpbusd multiplies 64 weight bytes by
// 64 activation bytes in one instruction, 16 int32 lanes of 4; it takes one unsigned operand, so
// |q| goes in and the sign of q moves onto the weight (a masked negation; weights are in
// [-127, 127]). Each lane is scaled by its group's scale.
// int8_gemm_amx (more rows, weights packed in AMX's tile layout): one tile multiply (TDPBSSD,
// signed x signed) computes 16 rows x 16 output channels x one group of 16 activations, four of
// them in flight; at 16 rows it does in 1 instruction what takes vpdpbusd 64 (plus their
// sign and scale ops), so a 16-sequence decode step stops being compute bound.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cpuid.h>
#include <csetjmp>
#include <csignal>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

namespace {

constexpr int64_t kBlock = 64;    // weight bytes per vpdpbusd: 16 lanes of 4
constexpr int64_t kGroup = 16;    // activations per scale: 4 int32 lanes
constexpr int64_t kLane = 4;      // activations per int32 lane (the scales are stored per lane)
constexpr int64_t kRows = 8;      // output channels per inner loop
constexpr int64_t kPrefetch = 8;  // rows ahead whose weights are prefetched
constexpr int64_t kMaxRows = 4;   // activation rows per pass over a group of weight rows
#define LLN_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define LLN_AMX __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512vl,avx512vnni")))

// x [M, K] -> q int8 [M, nb * 64] (zero-padded) and scales [M, nb * 16], one per lane of 4
// (each the scale of its group of kGroup: max |x| / 127, 1 for a zero group)
LLN_VNNI void quantize_activations(const float* x, int64_t M, int64_t K, int8_t* q, float* scales) {
  constexpr int64_t kChunks = kGroup / 16;
  const int64_t padded = (K + kBlock - 1) / kBlock * kBlock;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k0 = 0; k0 < padded; k0 += kGroup) {
      __m512 v[kChunks];
      __m512 amax = _mm512_setzero_ps();
      for (int64_t c = 0; c < kChunks; ++c) {
        const int64_t k = k0 + c * 16;
        const __mmask16 mask = k >= K ? 0 : K - k >= 16 ? 0xFFFF : (__mmask16)((1u << (K - k)) - 1);
        v[c] = _mm512_maskz_loadu_ps(mask, x + m * K + k);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(v[c]));
      }
      const float top = _mm512_reduce_max_ps(amax);
      const float scale = top > 0.f ? top / 127.f : 1.f;
      const __m512 step = _mm512_set1_ps(scale);
      for (int64_t c = 0; c < kChunks; ++c) {
        const __m512 rounded = _mm512_roundscale_ps(_mm512_div_ps(v[c], step), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + m * padded + k0 + c * 16), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(rounded)));
      }
      for (int64_t l = 0; l < kGroup / kLane; ++l) scales[(m * padded + k0) / kLane + l] = scale;
    }
  }
}

// x [M, K] float32 -> its int8 groups and their scales, in the calling thread's scratch (a step
// makes ~200 calls; two allocations each were ~2% of an int8 decode step); valid until the
// thread's next call
std::pair<const int8_t*, const float*> quantize_rows(const at::Tensor& xf, int64_t nb) {
  thread_local std::vector<int8_t> q;
  thread_local std::vector<float> scales;
  const int64_t M = xf.size(0), K = xf.size(1);
  q.resize(M * nb * kBlock);
  scales.resize(M * nb * kBlock / kLane);
  quantize_activations(xf.data_ptr<float>(), M, K, q.data(), scales.data());
  return {q.data(), scales.data()};
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
  const float* xscale = a.xscale + m0 * a.nb * (kBlock / kLane);
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
      xs[m] = _mm512_loadu_ps(xscale + (m * a.nb + b) * (kBlock / kLane));
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

// ---- AMX: tile multiplies of up to 16 rows x 16 output channels x kAmxK activations ----

constexpr int64_t kAmxK = kGroup;  // K per tile multiply: one scale group
constexpr int64_t kAmxN = 16;      // output channels per tile
constexpr int64_t kAmxRows = 16;   // activation rows per tile

struct TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

struct AmxArgs {
  const int8_t* q;       // [M, nb * 64] activations
  const float* xscale;   // [M, nb * 16] per lane of 4
  const int8_t* wp;      // [N / 16, Kp / kAmxK, kAmxK / 4, 16, 4] packed weights
  const float* wscale;   // [N]
  float* out;            // [M, N]
  int64_t N, nb, kblocks;
};

constexpr int64_t kAmxPrefetch = 16384;  // packed weight bytes ahead that are prefetched
constexpr int64_t kAmxChain = 4;  // tile multiplies in flight: C tiles 0-3, A 4-5, B 6-7
static_assert(kBlock / kAmxK == kAmxChain, "a padded K holds whole chains");

// one group of kAmxChain scale groups: four independent tile multiplies, stored to c
LLN_AMX inline void amx_chain(const int8_t* q, int64_t stride, const int8_t* w, int32_t* c) {
  constexpr int64_t kTile = kAmxK * kAmxN;  // packed weight bytes per tile
  for (int64_t line = 0; line < kAmxChain * kTile; line += 64)
    _mm_prefetch(reinterpret_cast<const char*>(w + kAmxPrefetch + line), _MM_HINT_T0);
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  _tile_loadd(4, q, stride); _tile_loadd(6, w, kAmxN * 4); _tile_dpbssd(0, 4, 6);
  _tile_loadd(5, q + kAmxK, stride); _tile_loadd(7, w + kTile, kAmxN * 4); _tile_dpbssd(1, 5, 7);
  _tile_loadd(4, q + 2 * kAmxK, stride); _tile_loadd(6, w + 2 * kTile, kAmxN * 4); _tile_dpbssd(2, 4, 6);
  _tile_loadd(5, q + 3 * kAmxK, stride); _tile_loadd(7, w + 3 * kTile, kAmxN * 4); _tile_dpbssd(3, 5, 7);
  constexpr int64_t kC = kAmxRows * kAmxN;
  _tile_stored(0, c, kAmxN * 4); _tile_stored(1, c + kC, kAmxN * 4);
  _tile_stored(2, c + 2 * kC, kAmxN * 4); _tile_stored(3, c + 3 * kC, kAmxN * 4);
  asm volatile("" ::: "memory");  // the compiler does not see the tile stores write c
}

// output channel groups [g0, g1) of activation rows [m0, m0 + rows), rows <= 16
LLN_AMX void amx_rows(const AmxArgs& a, int64_t m0, int64_t rows, int64_t g0, int64_t g1) {
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) { cfg.rows[t] = rows; cfg.colsb[t] = kAmxN * 4; }          // C
  for (int t = 4; t < 6; ++t) { cfg.rows[t] = rows; cfg.colsb[t] = kAmxK; }              // A
  for (int t = 6; t < 8; ++t) { cfg.rows[t] = kAmxK / 4; cfg.colsb[t] = kAmxN * 4; }     // B
  _tile_loadconfig(&cfg);
  alignas(64) int32_t c[kAmxChain][kAmxRows][kAmxN];
  const int64_t stride = a.nb * kBlock, lanes = a.nb * (kBlock / kLane);
  const int8_t* q = a.q + m0 * stride;
  const float* xscale = a.xscale + m0 * lanes;
  for (int64_t g = g0; g < g1; ++g) {
    __m512 acc[kAmxRows];
    for (int64_t m = 0; m < rows; ++m) acc[m] = _mm512_setzero_ps();
    const int8_t* w = a.wp + g * a.kblocks * kAmxK * kAmxN;
    for (int64_t b = 0; b < a.kblocks; b += kAmxChain) {
      amx_chain(q + b * kAmxK, stride, w + b * kAmxK * kAmxN, &c[0][0][0]);
      for (int64_t i = 0; i < kAmxChain; ++i) {
        const int64_t lane = (b + i) * (kAmxK / kLane);
        for (int64_t m = 0; m < rows; ++m) {
          const __m512 s = _mm512_set1_ps(xscale[m * lanes + lane]);
          acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_load_si512(c[i][m])), s, acc[m]);
        }
      }
    }
    const int64_t left = a.N - g * kAmxN;  // the last group may hold fewer than 16 channels
    const __mmask16 mask = left >= kAmxN ? 0xFFFF : (__mmask16)((1u << left) - 1);
    const __m512 ws = _mm512_maskz_loadu_ps(mask, a.wscale + g * kAmxN);
    for (int64_t m = 0; m < rows; ++m)
      _mm512_mask_storeu_ps(a.out + (m0 + m) * a.N + g * kAmxN, mask, _mm512_mul_ps(acc[m], ws));
  }
  _tile_release();
}

LLN_AMX void amx_gemm(const AmxArgs& a, int64_t M) {
  at::parallel_for(0, (a.N + kAmxN - 1) / kAmxN, 4, [&](int64_t g0, int64_t g1) {
    for (int64_t m0 = 0; m0 < M; m0 += kAmxRows) amx_rows(a, m0, std::min(kAmxRows, M - m0), g0, g1);
  });
}

sigjmp_buf amx_probe_jump;
void on_sigill(int) { siglongjmp(amx_probe_jump, 1); }

// one tile instruction under a SIGILL handler: a hypervisor may report AMX and still trap it
LLN_AMX bool amx_runs() {
  struct sigaction handler {}, previous{};
  handler.sa_handler = on_sigill;
  sigemptyset(&handler.sa_mask);
  sigaction(SIGILL, &handler, &previous);
  volatile bool ran = false;
  if (sigsetjmp(amx_probe_jump, 1) == 0) {
    TileConfig cfg;
    cfg.rows[0] = 1;
    cfg.colsb[0] = 64;
    _tile_loadconfig(&cfg);
    _tile_zero(0);
    _tile_release();
    ran = true;
  }
  sigaction(SIGILL, &previous, nullptr);
  return ran;
}

bool amx_supported() {
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
  const bool tile = edx & (1u << 24), int8 = edx & (1u << 25);
  if (!tile || !int8) return false;
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;  // Linux: ask for the tile state
  if (syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  static const bool runs = amx_runs();
  return runs;
}

at::Tensor int8_gemm_amx(const at::Tensor& x, const at::Tensor& wp, const at::Tensor& scale) {
  static const bool cpu_has_amx = amx_supported();
  TORCH_CHECK(cpu_has_amx, "int8_gemm_amx: this CPU has no AMX-INT8");
  TORCH_CHECK(x.dim() == 2 && wp.dim() == 5 && scale.dim() == 1, "int8_gemm_amx: x [M, K], packed w, scale [N]");
  TORCH_CHECK(wp.scalar_type() == at::kChar, "int8_gemm_amx: int8 weights");
  const int64_t M = x.size(0), K = x.size(1), N = scale.size(0), nb = (K + kBlock - 1) / kBlock;
  TORCH_CHECK(M >= 1, "int8_gemm_amx: at least one row");
  TORCH_CHECK(x.device().is_cpu() && wp.device().is_cpu(), "int8_gemm_amx: CPU tensors");
  TORCH_CHECK(wp.size(0) == (N + kAmxN - 1) / kAmxN && wp.size(1) * kAmxK == nb * kBlock && wp.size(2) == kAmxK / 4 &&
              wp.size(3) == kAmxN && wp.size(4) == 4, "int8_gemm_amx: shapes do not match");
  const auto xf = x.to(at::kFloat).contiguous();
  const auto wc = wp.contiguous();
  const auto sf = scale.to(at::kFloat).contiguous();
  const auto [q, xscale] = quantize_rows(xf, nb);
  auto out = at::empty({M, N}, xf.options());
  const AmxArgs a{q, xscale, wc.data_ptr<int8_t>(), sf.data_ptr<float>(), out.data_ptr<float>(),
                  N, nb, nb * kBlock / kAmxK};
  amx_gemm(a, M);
  return out;
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
  const auto [q, xscale] = quantize_rows(xf, nb);
  auto out = at::empty({M, N}, xf.options());
  const Args a{q, xscale, wc.data_ptr<int8_t>(), sf.data_ptr<float>(), out.data_ptr<float>(), K, N, nb};
  gemv(a, M);
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lln, m) {
  m.def("int8_gemv(Tensor x, Tensor w, Tensor scale) -> Tensor");
  m.def("int8_gemv_supported() -> bool", &supported);
  m.def("int8_gemm_amx(Tensor x, Tensor wp, Tensor scale) -> Tensor");
  m.def("int8_gemm_amx_supported() -> bool", &amx_supported);
}

TORCH_LIBRARY_IMPL(lln, CPU, m) {
  m.impl("int8_gemv", &int8_gemv);
  m.impl("int8_gemm_amx", &int8_gemm_amx);
}

// Small-M matmul against bfloat16 or int8 weights, an XLA FFI custom call for the CPU.
//
// y[m, n] = sum_k x[m, k] * w[k, n]      (layout kn, w [K, N])
// y[m, n] = sum_k x[m, k] * w[n, k]      (layout nk, w [N, K])
// int8 weights carry float32 scales per group of K/G consecutive k: scale[g, n] (kn) or
// scale[n, g] (nk), and y sums scale * (the group's partial dot). A 3-D w is a stack of
// layers [L, ...]; the int32 scalar `index` picks the layer, read in place.
//
// Decoding (M = 1..32) is bound by reading weights, so the kernel streams each weight once,
// widens it to float32 in registers (bf16: a 16-bit shift; int8: sign-extend + convert) and
// accumulates in float32, x staying float32. Paths, chosen at run time by CPU feature (the
// library is built without -march): AVX-512, AVX2+FMA, and plain C++ (also used for the
// edges the vector tiles do not cover). Work is split over XLA's intra-op thread pool.
//
// The vector kernels are written once, over an "ISA" traits struct (Avx512, Avx2) that wraps
// the intrinsics; each per-ISA entry point carries the target attribute and `flatten`, which
// inlines the generic body and the traits into it, so all of it compiles for that ISA.

#include "common.h"

using namespace mj;  // NOLINT: the shared helpers of common.h

namespace {

float Bf16ToF32(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
float ToF32(uint16_t v) { return Bf16ToF32(v); }
float ToF32(int8_t v) { return float(v); }
float ToF32(float v) { return v; }

// One call's operands, the layer already selected.
struct Problem {
  int64_t M, K, N;
  int64_t G;          // scale groups along K (1 for bf16, which has no scale)
  bool nk;            // layout: w [N, K] (else [K, N])
  bool int8;          // else bf16 or f32
  bool f32;           // float32 weights (no widening: read in place, at its bandwidth)
  const float* x;     // [M, K]
  const float* xp;    // nk bf16 vector paths: x with each 2W-chunk split into even, odd k
  const void* w;      // the layer's weights
  const float* s;     // the layer's scales (int8), else null
  float* y;           // [M, N]
};

// ---------------------------------------------------------------------------------------
// Plain C++ path: any shape; the "scalar" ISA, and the edges of the vector paths.

// kn, columns [c0, c1): y[:, c0:c1] = the full result there. Row-wise, so w is read in order.
template <class Wt>
void KnScalarT(const Problem& p, int64_t c0, int64_t c1) {
  const Wt* w = static_cast<const Wt*>(p.w);
  const int64_t nc = c1 - c0, gs = p.K / p.G;
  std::vector<float> part(nc);
  for (int64_t m = 0; m < p.M; ++m) {
    float* yr = p.y + m * p.N + c0;
    std::fill(yr, yr + nc, 0.f);
    for (int64_t g = 0; g < p.G; ++g) {
      std::fill(part.begin(), part.end(), 0.f);
      for (int64_t k = g * gs; k < (g + 1) * gs; ++k) {
        const float xv = p.x[m * p.K + k];
        const Wt* row = w + k * p.N + c0;
        for (int64_t j = 0; j < nc; ++j) part[j] += xv * ToF32(row[j]);
      }
      const float* s = p.s ? p.s + g * p.N + c0 : nullptr;
      for (int64_t j = 0; j < nc; ++j) yr[j] += s ? s[j] * part[j] : part[j];
    }
  }
}

// nk, rows [r0, r1) of w, i.e. outputs y[:, r0:r1].
template <class Wt>
void NkScalarT(const Problem& p, int64_t r0, int64_t r1) {
  const Wt* w = static_cast<const Wt*>(p.w);
  const int64_t gs = p.K / p.G;
  for (int64_t n = r0; n < r1; ++n) {
    const Wt* row = w + n * p.K;
    for (int64_t m = 0; m < p.M; ++m) {
      const float* xr = p.x + m * p.K;
      float total = 0.f;
      for (int64_t g = 0; g < p.G; ++g) {
        float part = 0.f;
        for (int64_t k = g * gs; k < (g + 1) * gs; ++k) part += xr[k] * ToF32(row[k]);
        total += p.s ? p.s[n * p.G + g] * part : part;
      }
      p.y[m * p.N + n] = total;
    }
  }
}

void KnScalar(const Problem& p, int64_t c0, int64_t c1) {
  p.int8 ? KnScalarT<int8_t>(p, c0, c1)
         : p.f32 ? KnScalarT<float>(p, c0, c1) : KnScalarT<uint16_t>(p, c0, c1);
}
void NkScalar(const Problem& p, int64_t r0, int64_t r1) {
  p.int8 ? NkScalarT<int8_t>(p, r0, r1)
         : p.f32 ? NkScalarT<float>(p, r0, r1) : NkScalarT<uint16_t>(p, r0, r1);
}

// ---------------------------------------------------------------------------------------
// Vector paths, generic over the ISA traits I:
//   I::W floats per vector; I::kTile kn columns per register tile; I::kMC rows of x per
//   register tile; I::kNR rows of w per nk tile on long rows, against I::kMCnk rows of x (its
//   2 * kNR * kMCnk accumulators fit the registers); and the vector operations.
//
// Memory order matters more than instruction count here: the hardware prefetchers keep up
// with a few long ascending streams, not with many short ones. Measured on the AMD EPYC
// (Zen 4), one thread, M = 1: reading 8 consecutive kn rows of 1152 bytes tile by tile gave
// 11 GB/s, the same pattern on 16 KB rows 23 GB/s; nk dots of 4 interleaved 1152-byte rows
// 9 GB/s, one row at a time 21 GB/s.

// kn: rows of w accumulated in registers per pass over the accumulators, each from its own
// stretch ("lane") of the rows, so that each lane reads one long ascending stream.
constexpr int64_t kLanes = 8;
// nk rows at least this long (bytes) are read kNR at a time (x then comes from L1 once per
// kNR rows); shorter ones one at a time, front to back. From kManyRowsM rows of x on, the
// reads of x outweigh that: kNR rows at a time (measured at [49152, 576]: M = 16 and 32
// took half the time, M = 4 half again as long).
constexpr int64_t kLongRow = 4096;
constexpr int64_t kManyRowsM = 8;

// Widen one kn tile row (I::kTile columns) to kTile / W vectors. bf16 comes out permuted:
// per 2W columns, the even columns then the odd ones (undone by KnUnpermute at the end).
template <class I>
inline void WidenRow(const uint16_t* p, typename I::F* v) {
  for (int j = 0; j < I::kTile / I::W / 2; ++j) I::Bf16x2(p + 2 * I::W * j, v[2 * j], v[2 * j + 1]);
}
template <class I>
inline void WidenRow(const float* p, typename I::F* v) {
  for (int j = 0; j < I::kTile / I::W; ++j) v[j] = I::Load(p + I::W * j);
}
template <class I>
inline void WidenRow(const int8_t* p, typename I::F* v) {
  for (int j = 0; j < I::kTile / I::W; ++j) v[j] = I::Int8(p + I::W * j);
}

// kn register tile: MC rows of x, kTile columns, kb lanes of R consecutive rows of w each
// (lane j's row r at w + j * wlane + r * N; its x at x + j * xlane + r * xrow): acc (row stride
// ldacc) += x @ w. kFold (int8 with groups): lane j's rows are in one group, whose scales
// are at srow[j] + c; with R = 1 they multiply the weights, else the sum of the R rows.
template <class I, int MC, bool kFold, int R, class Wt>
inline void KnTile(const Problem& p, int64_t kb, const float* x, int64_t xlane, int64_t xrow,
                   const Wt* w, int64_t wlane, float* acc, int64_t ldacc,
                   const float* const* srow, int64_t c) {
  using F = typename I::F;
  constexpr int V = I::kTile / I::W;
  constexpr bool kSum = kFold && R > 1;  // scale the R rows' sum q
  F a[MC][V], q[kSum ? MC : 1][V];
  for (int m = 0; m < MC; ++m)
    for (int v = 0; v < V; ++v) a[m][v] = I::Load(acc + m * ldacc + v * I::W);
  for (int64_t j = 0; j < kb; ++j) {
    if constexpr (kSum)
      for (int m = 0; m < MC; ++m)
        for (int v = 0; v < V; ++v) q[m][v] = I::Zero();
#pragma GCC unroll 1  // unrolled, the rows' loads get hoisted together and spill
    for (int r = 0; r < R; ++r) {
      F wv[V];
      WidenRow<I>(w + j * wlane + r * p.N, wv);
      if constexpr (kFold && !kSum)
        for (int v = 0; v < V; ++v) wv[v] = I::Mul(wv[v], I::Load(srow[j] + c + v * I::W));
      for (int m = 0; m < MC; ++m) {
        const F xv = I::Bcast(x[j * xlane + r * xrow + m]);
        for (int v = 0; v < V; ++v) {
          if constexpr (kSum)
            q[m][v] = I::Fma(xv, wv[v], q[m][v]);
          else
            a[m][v] = I::Fma(xv, wv[v], a[m][v]);
        }
      }
    }
    if constexpr (kSum)
      for (int v = 0; v < V; ++v) {
        const F sv = I::Load(srow[j] + c + v * I::W);
        for (int m = 0; m < MC; ++m) a[m][v] = I::Fma(sv, q[m][v], a[m][v]);
      }
  }
  for (int m = 0; m < MC; ++m)
    for (int v = 0; v < V; ++v) I::Store(acc + m * ldacc + v * I::W, a[m][v]);
}

// Runs KnTile over rows [m, M) of x, MC at a time (a smaller tile for the rest).
template <class I, int MC, bool kFold, int R, class Wt>
inline void KnTileRows(const Problem& p, int64_t m, int64_t kb, const float* x, int64_t xrow,
                       const Wt* w, int64_t wlane, float* acc, int64_t ldacc,
                       const float* const* srow, int64_t c) {
  for (; m + MC <= p.M; m += MC)
    KnTile<I, MC, kFold, R>(p, kb, x + m, p.M, xrow, w, wlane, acc + m * ldacc, ldacc, srow, c);
  if constexpr (MC > 1) {
    if (m < p.M) KnTileRows<I, MC - 1, kFold, R>(p, m, kb, x, xrow, w, wlane, acc, ldacc, srow, c);
  }
}

// kn, rows [k0, k1) of w, vector columns [0, Nv): acc[M, Nv] (row stride ldacc) += the
// partial product, in KnTile's layout. The rows are cut into L lanes (one stream each), and
// each step takes the next R rows of every lane; columns go in blocks whose accumulators
// stay in cache. With R > 1, k0 and the lane length are multiples of R.
template <class I, class Wt, bool kFold, int L, int R>
void KnRows(const Problem& p, int64_t k0, int64_t k1, int64_t Nv, float* acc, int64_t ldacc) {
  const Wt* w = static_cast<const Wt*>(p.w);
  const int64_t n = k1 - k0;
  if (n <= 0) return;
  const int64_t len = (n + L * R - 1) / (L * R) * R;  // rows per lane
  const int64_t lanes = (n + len - 1) / len, last = n - (lanes - 1) * len;
  const int64_t M = p.M, gs = p.K / p.G;
  constexpr int MC = kFold && R > 1 ? I::kMC / 2 : I::kMC;  // q doubles the registers
  const int64_t nb = std::max<int64_t>(I::kTile, (256 * 1024 / (4 * M)) / I::kTile * I::kTile);
  // x in step order: xl[i][j][m] = x[m, k0 + j * len + i]. Read in place, x's lanes and
  // rows sit a power of two apart often enough to evict each other from L1.
  thread_local std::vector<float> xl;
  xl.assign(len * L * M, 0.f);
  for (int64_t j = 0; j < lanes; ++j)
    for (int64_t i = 0; i < (j < lanes - 1 ? len : last); ++i)
      for (int64_t m = 0; m < M; ++m) xl[(i * L + j) * M + m] = p.x[m * p.K + k0 + j * len + i];
  const float* srow[L] = {};  // lane j's group's scales; the group changes every gs rows
  int64_t into[L] = {};        // rows into that group
  for (int64_t b0 = 0; b0 < Nv; b0 += nb) {
    const int64_t b1 = std::min(Nv, b0 + nb);
    if constexpr (kFold)
      for (int64_t j = 0; j < lanes; ++j) {
        srow[j] = p.s + (k0 + j * len) / gs * p.N;
        into[j] = (k0 + j * len) % gs;
      }
    for (int64_t i = 0; i < len; i += R) {
      const int64_t k = k0 + i, kb = i < last ? lanes : lanes - 1;
      if constexpr (kFold)
        if (i > 0)
          for (int64_t j = 0; j < kb; ++j)
            if ((into[j] += R) >= gs) into[j] -= gs, srow[j] += p.N;
      const float* x = xl.data() + i * L * M;
      for (int64_t c = b0; c < b1; c += I::kTile)
        KnTileRows<I, MC, kFold, R>(p, 0, kb, x, L * M, w + k * p.N + c, len * p.N, acc + c,
                                    ldacc, srow, c);
    }
  }
}

// nk register tile: MC rows of x against NR rows of w over the vector part [0, kv) of K,
// then the scalar rest. Writes y[m, n..n+NR). Two accumulators per output (so that the FMA
// latency does not bound a single stream), whatever NR and MC: each output then sums its
// products in the same order at any M, so a row of a batch gets the bits it gets alone
// (a server's batched decode step equals generate(), greedy token for token).
template <class I, int MC, int NR>
inline void NkTile(const Problem& p, int64_t m0, int64_t n) {
  using F = typename I::F;
  constexpr int W = I::W, A = 2;
  F a[MC][NR][A];
  for (int m = 0; m < MC; ++m)
    for (int r = 0; r < NR; ++r)
      for (int u = 0; u < A; ++u) a[m][r][u] = I::Zero();
  const int64_t K = p.K;
  int64_t kv;
  if (p.f32) {  // f32: A vectors of k per step, into accumulator u
    kv = K / (A * W) * (A * W);
    const float* w = static_cast<const float*>(p.w) + n * K;
    const float* x = p.x + m0 * K;
    for (int64_t k = 0; k < kv; k += A * W)
      for (int u = 0; u < A; ++u) {
        F xv[MC];
        for (int m = 0; m < MC; ++m) xv[m] = I::Load(x + m * K + k + u * W);
        for (int r = 0; r < NR; ++r) {
          const F wv = I::Load(w + r * K + k + u * W);
          for (int m = 0; m < MC; ++m) a[m][r][u] = I::Fma(xv[m], wv, a[m][r][u]);
        }
      }
  } else if (!p.int8) {  // bf16: 2W k per step, x pre-split into even and odd k
    kv = K / (2 * W) * (2 * W);
    const uint16_t* w = static_cast<const uint16_t*>(p.w) + n * K;
    const float* xp = p.xp + m0 * kv;
    for (int64_t k = 0; k < kv; k += 2 * W) {
      F xe[MC], xo[MC];
      for (int m = 0; m < MC; ++m) {
        xe[m] = I::Load(xp + m * kv + k);
        xo[m] = I::Load(xp + m * kv + k + W);
      }
      for (int r = 0; r < NR; ++r) {
        F we, wo;
        I::Bf16x2(w + r * K + k, we, wo);
        for (int m = 0; m < MC; ++m) {
          a[m][r][0] = I::Fma(xe[m], we, a[m][r][0]);
          a[m][r][A - 1] = I::Fma(xo[m], wo, a[m][r][A - 1]);
        }
      }
    }
  } else {  // int8: W k per step; with groups (K/G a multiple of W), the scale folds into w
    const int8_t* w = static_cast<const int8_t*>(p.w) + n * K;
    const float* x = p.x + m0 * K;
    const int64_t G = p.G, gs = K / G;
    kv = G > 1 ? K : K / W * W;
    F sr[NR];
    // The u-th of A vectors per step into accumulator u.
    auto step = [&](int64_t k, int u) {
      F xv[MC];
      for (int m = 0; m < MC; ++m) xv[m] = I::Load(x + m * K + k);
      for (int r = 0; r < NR; ++r) {
        F wv = I::Int8(w + r * K + k);
        if (G > 1) wv = I::Mul(wv, sr[r]);
        for (int m = 0; m < MC; ++m) a[m][r][u] = I::Fma(xv[m], wv, a[m][r][u]);
      }
    };
    if (G == 1 || gs % (A * W) == 0) {  // one loop, the scales reloaded every step
      const int64_t steps_per_group = G == 1 ? 1 : gs / (A * W);
      int64_t g = 0, in_group = 0;
      for (int64_t k = 0; k + A * W <= kv; k += A * W) {
        if (G > 1) {
          for (int r = 0; r < NR; ++r) sr[r] = I::Bcast(p.s[(n + r) * G + g]);
          if (++in_group == steps_per_group) in_group = 0, ++g;
        }
        for (int u = 0; u < A; ++u) step(k + u * W, u);
      }
      if (kv % (A * W)) step(kv / (A * W) * (A * W), 0);  // G == 1, A == 2: one W left
    } else {  // groups of an odd number of vectors
      for (int64_t g = 0; g < G; ++g) {
        for (int r = 0; r < NR; ++r) sr[r] = I::Bcast(p.s[(n + r) * G + g]);
        for (int64_t k = g * gs; k < (g + 1) * gs; k += W) step(k, 0);
      }
    }
  }
  for (int m = 0; m < MC; ++m) {
    const float* xr = p.x + (m0 + m) * K;
    for (int r = 0; r < NR; ++r) {
      float v = I::Hsum(A == 1 ? a[m][r][0] : I::Add(a[m][r][0], a[m][r][A - 1]));
      if (p.int8) {
        const int8_t* wr = static_cast<const int8_t*>(p.w) + (n + r) * K;
        for (int64_t k = kv; k < K; ++k) v += xr[k] * float(wr[k]);
        if (p.G == 1) v *= p.s[n + r];
      } else if (p.f32) {
        const float* wr = static_cast<const float*>(p.w) + (n + r) * K;
        for (int64_t k = kv; k < K; ++k) v += xr[k] * wr[k];
      } else {
        const uint16_t* wr = static_cast<const uint16_t*>(p.w) + (n + r) * K;
        for (int64_t k = kv; k < K; ++k) v += xr[k] * Bf16ToF32(wr[k]);
      }
      p.y[(m0 + m) * p.N + n + r] = v;
    }
  }
}

// Runs NkTile over all M rows of x, MC at a time (a smaller tile for the rest).
template <class I, int MC, int NR>
inline void NkTileRows(const Problem& p, int64_t m, int64_t n) {
  for (; m + MC <= p.M; m += MC) NkTile<I, MC, NR>(p, m, n);
  if constexpr (MC > 1) {
    if (m < p.M) NkTileRows<I, MC - 1, NR>(p, m, n);
  }
}

// nk, rows [r0, r1) of w.
template <class I>
void NkRows(const Problem& p, int64_t r0, int64_t r1) {
  int64_t n = r0;
  if (p.K * (p.int8 ? 1 : p.f32 ? 4 : 2) >= kLongRow || p.M >= kManyRowsM)
    for (; n + I::kNR <= r1; n += I::kNR) NkTileRows<I, I::kMCnk, I::kNR>(p, 0, n);
  for (; n < r1; ++n) NkTileRows<I, I::kMC, 1>(p, 0, n);
}

template <class I>
void KnRowsAny(const Problem& p, int64_t k0, int64_t k1, int64_t Nv, float* acc,
               int64_t ldacc) {
  if (p.f32)
    KnRows<I, float, false, kLanes, 1>(p, k0, k1, Nv, acc, ldacc);
  else if (!p.int8)
    KnRows<I, uint16_t, false, kLanes, 1>(p, k0, k1, Nv, acc, ldacc);
  else if (p.G == 1)
    KnRows<I, int8_t, false, kLanes, 1>(p, k0, k1, Nv, acc, ldacc);
  // int8 with groups: scaling each row's weights costs a load and a multiply per vector and
  // keeps L1 busy with scales, so where the groups allow, sum 8 consecutive rows of a group
  // and scale the sum; rows of kLongRow bytes are one stream each already (one lane).
  // Measured, M = 1: N = 8192 15 GB/s, N = 192 17 GB/s, N = 576 or 1536 9 GB/s either way.
  else if ((p.K / p.G) % 8 == 0 && p.N >= kLongRow)
    KnRows<I, int8_t, true, 1, 8>(p, k0, k1, Nv, acc, ldacc);
  else if ((p.K / p.G) % 8 == 0)
    KnRows<I, int8_t, true, 2, 8>(p, k0, k1, Nv, acc, ldacc);
  else
    KnRows<I, int8_t, true, kLanes, 1>(p, k0, k1, Nv, acc, ldacc);
}

#ifdef MJ_X86
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wpsabi"

#define MJ_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define MJ_AVX2 __attribute__((target("avx2,fma")))

struct Avx512 {
  static constexpr int W = 16, kTile = 64, kMC = 4, kNR = 4, kMCnk = 2;
  using F = __m512;
  MJ_AVX512 static F Zero() { return _mm512_setzero_ps(); }
  MJ_AVX512 static F Load(const float* p) { return _mm512_loadu_ps(p); }
  MJ_AVX512 static void Store(float* p, F v) { _mm512_storeu_ps(p, v); }
  MJ_AVX512 static F Bcast(float v) { return _mm512_set1_ps(v); }
  MJ_AVX512 static F Fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  MJ_AVX512 static F Mul(F a, F b) { return _mm512_mul_ps(a, b); }
  MJ_AVX512 static F Add(F a, F b) { return _mm512_add_ps(a, b); }
  MJ_AVX512 static float Hsum(F v) { return _mm512_reduce_add_ps(v); }
  // 2W bf16 -> the even-indexed ones and the odd-indexed ones as float32.
  MJ_AVX512 static void Bf16x2(const uint16_t* p, F& even, F& odd) {
    const __m512i v = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u))));
  }
  MJ_AVX512 static F Int8(const int8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p)));
  }
};

struct Avx2 {
  static constexpr int W = 8, kTile = 32, kMC = 2, kNR = 4, kMCnk = 1;
  using F = __m256;
  MJ_AVX2 static F Zero() { return _mm256_setzero_ps(); }
  MJ_AVX2 static F Load(const float* p) { return _mm256_loadu_ps(p); }
  MJ_AVX2 static void Store(float* p, F v) { _mm256_storeu_ps(p, v); }
  MJ_AVX2 static F Bcast(float v) { return _mm256_set1_ps(v); }
  MJ_AVX2 static F Fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  MJ_AVX2 static F Mul(F a, F b) { return _mm256_mul_ps(a, b); }
  MJ_AVX2 static F Add(F a, F b) { return _mm256_add_ps(a, b); }
  MJ_AVX2 static float Hsum(F v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  MJ_AVX2 static void Bf16x2(const uint16_t* p, F& even, F& odd) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)p);
    even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xFFFF0000u))));
  }
  MJ_AVX2 static F Int8(const int8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p)));
  }
};

// Per-ISA entry points: `flatten` inlines the generic bodies and the traits here.
MJ_AVX512 __attribute__((flatten)) void KnAvx512(const Problem& p, int64_t k0, int64_t k1,
                                                 int64_t Nv, float* acc, int64_t ldacc) {
  KnRowsAny<Avx512>(p, k0, k1, Nv, acc, ldacc);
}
MJ_AVX512 __attribute__((flatten)) void NkAvx512(const Problem& p, int64_t r0, int64_t r1) {
  NkRows<Avx512>(p, r0, r1);
}
MJ_AVX2 __attribute__((flatten)) void KnAvx2(const Problem& p, int64_t k0, int64_t k1,
                                             int64_t Nv, float* acc, int64_t ldacc) {
  KnRowsAny<Avx2>(p, k0, k1, Nv, acc, ldacc);
}
MJ_AVX2 __attribute__((flatten)) void NkAvx2(const Problem& p, int64_t r0, int64_t r1) {
  NkRows<Avx2>(p, r0, r1);
}

#pragma GCC diagnostic pop
#endif  // MJ_X86

// The kernels of one ISA; null kn/nk: the plain C++ path.
struct Kernels {
  int W;      // floats per vector
  int kTile;  // kn columns per register tile
  void (*kn)(const Problem&, int64_t, int64_t, int64_t, float*, int64_t);
  void (*nk)(const Problem&, int64_t, int64_t);
};

Kernels KernelsFor(int64_t isa) {
#ifdef MJ_X86
  if (isa == kAvx512) return {Avx512::W, Avx512::kTile, KnAvx512, NkAvx512};
  if (isa == kAvx2) return {Avx2::W, Avx2::kTile, KnAvx2, NkAvx2};
#endif
  return {1, 1, nullptr, nullptr};
}

// kn bf16 tiles hold, per 2W columns, the even columns then the odd ones: interleave back.
void KnUnpermute(float* y, int64_t M, int64_t N, int64_t Nv, int W) {
  float tmp[64];
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < Nv; c += 2 * W) {
      float* v = y + m * N + c;
      std::memcpy(tmp, v, sizeof(float) * 2 * W);
      for (int j = 0; j < W; ++j) v[2 * j] = tmp[j], v[2 * j + 1] = tmp[W + j];
    }
}

// Below twice this much weight, one thread (measured: 221 KB of weights ran faster on one
// thread than on two, 331 KB slower).
constexpr int64_t kBytesPerThread = 128 * 1024;
// Units of work per thread, claimed dynamically (balance against a late thread, while
// keeping the streams of one unit long).
constexpr int64_t kUnitsPerThread = 2;

ffi::Error MatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer w,
                      ffi::Buffer<ffi::F32> scale, ffi::Buffer<ffi::S32> index,
                      ffi::ResultBuffer<ffi::F32> y, int64_t nk, int64_t isa,
                      int64_t max_threads) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || (wd.size() != 2 && wd.size() != 3))
    return ffi::Error::InvalidArgument("matmul: x must be 2-D and w 2-D or 3-D");
  const bool int8 = w.element_type() == ffi::DataType::S8;
  const bool f32 = w.element_type() == ffi::DataType::F32;
  if (!int8 && !f32 && w.element_type() != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("matmul: w must be bfloat16, int8 or float32");
  const int64_t r = wd.size(), L = r == 3 ? wd[0] : 1;
  Problem p;
  p.M = xd[0];
  p.K = xd[1];
  p.N = nk ? wd[r - 2] : wd[r - 1];
  p.nk = nk != 0;
  p.int8 = int8;
  p.f32 = f32;
  if ((nk ? wd[r - 1] : wd[r - 2]) != p.K)
    return ffi::Error::InvalidArgument("matmul: x and w disagree on K");
  const int64_t layer = r == 3 ? std::clamp<int64_t>(index.typed_data()[0], 0, L - 1) : 0;
  p.G = 1;
  p.s = nullptr;
  if (int8) {
    const auto sd = scale.dimensions();
    if (int64_t(sd.size()) != r || (r == 3 && sd[0] != L))
      return ffi::Error::InvalidArgument("matmul: scale must have w's rank (and L)");
    p.G = nk ? sd[r - 1] : sd[r - 2];
    if ((nk ? sd[r - 2] : sd[r - 1]) != p.N || p.G < 1 || p.K % p.G != 0)
      return ffi::Error::InvalidArgument("matmul: scale must be [G, N] (kn) or [N, G] (nk), G | K");
    p.s = scale.typed_data() + layer * p.G * p.N;
  }
  const int64_t esize = int8 ? 1 : f32 ? 4 : 2;
  p.w = static_cast<const char*>(w.untyped_data()) + layer * p.K * p.N * esize;
  p.x = x.typed_data();
  p.y = y->typed_data();
  p.xp = nullptr;
  if (p.M == 0 || p.N == 0) return ffi::Error::Success();
  if (p.K == 0) {
    std::fill(p.y, p.y + p.M * p.N, 0.f);
    return ffi::Error::Success();
  }

  int64_t chosen = Resolve(isa);
  // nk int8 with groups needs whole vectors per group; else the plain path.
  if (p.nk && p.int8 && p.G > 1 && (p.K / p.G) % KernelsFor(chosen).W != 0) chosen = kScalar;
  const Kernels kern = KernelsFor(chosen);

  int threads = int(std::max<int64_t>(1, pool.num_threads()));
  if (max_threads > 0) threads = std::min<int>(threads, int(max_threads));
  threads = std::min(threads, 64);
  threads = int(std::min<int64_t>(threads, std::max<int64_t>(1, p.K * p.N * esize / kBytesPerThread)));

  if (p.nk) {
    // Rows of w (contiguous) are split over threads.
    thread_local std::vector<float> xp;
    if (kern.nk && !p.int8 && !p.f32) {  // x with each 2W chunk of k split into even and odd k
      const int W = kern.W;
      const int64_t kv = p.K / (2 * W) * (2 * W);
      xp.resize(p.M * kv);
      for (int64_t m = 0; m < p.M; ++m)
        for (int64_t k = 0; k < kv; k += 2 * W)
          for (int j = 0; j < W; ++j) {
            xp[m * kv + k + j] = p.x[m * p.K + k + 2 * j];
            xp[m * kv + k + W + j] = p.x[m * p.K + k + 2 * j + 1];
          }
      p.xp = xp.data();
    }
    const int64_t units = threads == 1 ? 1 : kUnitsPerThread * threads;
    const int64_t per = (p.N + units - 1) / units;
    ParallelFor(pool, threads, units, [&](int64_t i, int) {
      const int64_t r0 = std::min(p.N, i * per), r1 = std::min(p.N, r0 + per);
      if (r0 < r1) kern.nk ? kern.nk(p, r0, r1) : NkScalar(p, r0, r1);
    });
    return ffi::Error::Success();
  }

  if (!kern.kn) {  // plain path: columns split over threads
    const int64_t units = threads == 1 ? 1 : kUnitsPerThread * threads;
    const int64_t per = (p.N + units - 1) / units;
    ParallelFor(pool, threads, units, [&](int64_t i, int) {
      const int64_t c0 = std::min(p.N, i * per), c1 = std::min(p.N, c0 + per);
      if (c0 < c1) KnScalar(p, c0, c1);
    });
    return ffi::Error::Success();
  }

  // kn: the vector columns [0, Nv) split into units by rows of w (each thread then streams
  // one contiguous stretch of memory), each unit summing into its own [M, N] buffer, added up
  // in unit order at the end, so the result does not depend on which thread took which unit;
  // the last N % kTile columns by the plain path.
  const int64_t Nv = p.N / kern.kTile * kern.kTile;
  if (Nv > 0) {
    const int64_t units = threads == 1 ? 1 : kUnitsPerThread * threads;
    // int8 with groups: chunks of whole groups (KnRows may take several rows of one).
    const int64_t align = p.int8 && p.G > 1 ? p.K / p.G : 1;
    const int64_t per = ((p.K + units - 1) / units + align - 1) / align * align;
    thread_local std::vector<float> partial_buf;  // units 1.. of this call
    partial_buf.assign((units - 1) * p.M * p.N, 0.f);
    float* partial = partial_buf.data();
    std::fill(p.y, p.y + p.M * p.N, 0.f);
    ParallelFor(pool, threads, units, [&](int64_t i, int) {
      const int64_t k0 = std::min(p.K, i * per), k1 = std::min(p.K, k0 + per);
      float* acc = i == 0 ? p.y : partial + (i - 1) * p.M * p.N;
      if (k0 < k1) kern.kn(p, k0, k1, Nv, acc, p.N);
    });
    for (int64_t u = 1; u < units; ++u) {
      const float* src = partial + (u - 1) * p.M * p.N;
      for (int64_t m = 0; m < p.M; ++m)
        for (int64_t c = 0; c < Nv; ++c) p.y[m * p.N + c] += src[m * p.N + c];
    }
    if (!p.int8 && !p.f32) KnUnpermute(p.y, p.M, p.N, Nv, kern.W);
    if (p.int8 && p.G == 1)
      for (int64_t m = 0; m < p.M; ++m)
        for (int64_t c = 0; c < Nv; ++c) p.y[m * p.N + c] *= p.s[c];
  }
  if (Nv < p.N) KnScalar(p, Nv, p.N);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MistralJaxMatmul, MatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [M, K]
                                  .Arg<ffi::AnyBuffer>()         // w
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale (int8), else empty
                                  .Arg<ffi::Buffer<ffi::S32>>()  // index (3-D w)
                                  .Ret<ffi::Buffer<ffi::F32>>()  // y [M, N]
                                  .Attr<int64_t>("nk")
                                  .Attr<int64_t>("isa")
                                  .Attr<int64_t>("threads"));

// ---------------------------------------------------------------------------------------
// Rows of an embedding table, widened to float32: y[i, :] = table[ids[i], :] (times the row's
// scales for int8, per group of D/G). XLA:CPU gathers a bfloat16 table by converting all of
// it to float32 first, and hoists that convert out of a decode loop, so each call of the
// loop paid for the whole table; this reads only the rows asked for.

namespace {

template <class Wt>
void RowsT(const Wt* table, const float* scale, int64_t G, const int32_t* ids, int64_t n,
           int64_t D, float* y) {
  const int64_t gs = D / G;
  for (int64_t i = 0; i < n; ++i) {
    const Wt* row = table + int64_t(ids[i]) * D;
    float* out = y + i * D;
    for (int64_t d = 0; d < D; ++d) out[d] = ToF32(row[d]);
    if (scale)
      for (int64_t d = 0; d < D; ++d) out[d] *= scale[int64_t(ids[i]) * G + d / gs];
  }
}

ffi::Error RowsImpl(ffi::AnyBuffer table, ffi::Buffer<ffi::F32> scale,
                    ffi::Buffer<ffi::S32> ids, ffi::ResultBuffer<ffi::F32> y) {
  const auto td = table.dimensions();
  if (td.size() != 2) return ffi::Error::InvalidArgument("rows: table must be 2-D");
  const int64_t V = td[0], D = td[1], n = ids.element_count();
  const int32_t* id = ids.typed_data();
  for (int64_t i = 0; i < n; ++i)
    if (id[i] < 0 || id[i] >= V)
      return ffi::Error::InvalidArgument("rows: a token id is outside the table");
  float* out = y->typed_data();
  switch (table.element_type()) {
    case ffi::DataType::F32:
      RowsT(static_cast<const float*>(table.untyped_data()), nullptr, 1, id, n, D, out);
      break;
    case ffi::DataType::BF16:
      RowsT(static_cast<const uint16_t*>(table.untyped_data()), nullptr, 1, id, n, D, out);
      break;
    case ffi::DataType::S8: {
      const auto sd = scale.dimensions();
      if (sd.size() != 2 || sd[0] != V || sd[1] < 1 || D % sd[1] != 0)
        return ffi::Error::InvalidArgument("rows: int8 needs scales [V, G], G | D");
      RowsT(static_cast<const int8_t*>(table.untyped_data()), scale.typed_data(), sd[1], id, n,
            D, out);
      break;
    }
    default:
      return ffi::Error::InvalidArgument("rows: table must be float32, bfloat16 or int8");
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MistralJaxRows, RowsImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()         // table [V, D]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // scale [V, G] (int8), else empty
                                  .Arg<ffi::Buffer<ffi::S32>>()  // ids [n]
                                  .Ret<ffi::Buffer<ffi::F32>>()); // y [n, D]

// The ISA a call with `isa = requested` runs on this CPU (an Isa code).
extern "C" int64_t MistralJaxCpuIsa(int64_t requested) { return Resolve(requested); }

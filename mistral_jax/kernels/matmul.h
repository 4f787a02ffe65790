// The matmul kernel's shared parts (matmul.cc runs it; matmul_isa.cc compiles it per ISA): one
// call's operands (`Problem`), the plain C++ path's entry points, and the vector tiles, generic
// over an ISA traits struct (see matmul_isa.cc), which the per-ISA entry points instantiate.
//
// The vector kernels are written once, over the traits (Avx512, Avx2) that wrap the
// intrinsics; each per-ISA entry point carries the target attribute and `flatten`, which
// inlines the generic body and the traits into it, so all of it compiles for that ISA.

#pragma once

#include "common.h"

namespace mj {

inline float Bf16ToF32(uint16_t v) {
  uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float ToF32(uint16_t v) { return Bf16ToF32(v); }
inline float ToF32(int8_t v) { return float(v); }
inline float ToF32(float v) { return v; }

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

// The plain C++ path (matmul_isa.cc): any shape; the "scalar" ISA, and the edges the vector
// tiles do not cover. kn: columns [c0, c1) of y; nk: rows [r0, r1) of w, i.e. y[:, r0:r1].
void KnScalar(const Problem& p, int64_t c0, int64_t c1);
void NkScalar(const Problem& p, int64_t r0, int64_t r1);

// The kernels of one ISA; null kn/nk: the plain C++ path.
struct Kernels {
  int W;      // floats per vector
  int kTile;  // kn columns per register tile
  void (*kn)(const Problem&, int64_t, int64_t, int64_t, float*, int64_t);
  void (*nk)(const Problem&, int64_t, int64_t);
};

// The kernels of `isa` (an Isa code, already resolved for this CPU).
Kernels KernelsFor(int64_t isa);

// Internal to each file that includes this (matmul_isa.cc instantiates them), as the tiles
// were when they lived in one file: the same code, the same inlining.
namespace {

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

}  // namespace

}  // namespace mj

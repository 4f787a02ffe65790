// The matmul kernel's plain C++ path, and the vector tiles of matmul.h compiled for each ISA
// (AVX-512, AVX2+FMA), chosen at run time by CPU feature (the library is built without
// -march).

#include "matmul.h"

namespace mj {

namespace {

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

}  // namespace

void KnScalar(const Problem& p, int64_t c0, int64_t c1) {
  p.int8 ? KnScalarT<int8_t>(p, c0, c1)
         : p.f32 ? KnScalarT<float>(p, c0, c1) : KnScalarT<uint16_t>(p, c0, c1);
}
void NkScalar(const Problem& p, int64_t r0, int64_t r1) {
  p.int8 ? NkScalarT<int8_t>(p, r0, r1)
         : p.f32 ? NkScalarT<float>(p, r0, r1) : NkScalarT<uint16_t>(p, r0, r1);
}

namespace {

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

}  // namespace

Kernels KernelsFor(int64_t isa) {
#ifdef MJ_X86
  if (isa == kAvx512) return {Avx512::W, Avx512::kTile, KnAvx512, NkAvx512};
  if (isa == kAvx2) return {Avx2::W, Avx2::kTile, KnAvx2, NkAvx2};
#endif
  return {1, 1, nullptr, nullptr};
}

}  // namespace mj

// A few queries against a KV cache, read where it lies: the decode step's attention, an XLA FFI
// custom call for the CPU.
//
// XLA:CPU copies each block of the cache out before its dot (and converts a 16-bit cache to
// float32 first, all of it), and runs the loop over blocks as a while loop whose every trip
// costs several thunks: at batch 1 on SmolLM2 that was 4-7 ms of a 10-25 ms token. Here one
// call per layer reads each cache row's keys and values in place, only the slots in use.
//
// For each cache row R = first + r (r < b) and kv head j, the g * c queries of that head
// (query head j * g + i, chunk position t) attend to the chunk's own keys, then to the cache
// slots holding a sequence index: key at index e is seen by a query at index i when
// 0 <= e <= i and, with a window W, i - e < W (transformers' rule). Softmax in float32 with a
// running maximum over blocks of kBlock slots (flash attention's), the chunk's keys first. A
// row's numbers depend only on its own cache row and queries, never on the batch or the
// cache's size, so a row of a batched step gets the bits it gets alone.
//
// Layouts (as mistral_jax/model/cache.py): k [L, B, kv, h, S] (slots minor), v [L, B, kv, S, h],
// index [B, S]; int8 caches carry float32 scales [L, B, kv, S]; 16-bit float caches come as
// their bits (uint16). q [b, c, n, h], k_new / v_new [b, c, kv, h] float32, new_index and
// query_index [b, c]; out [b, c, n, h] float32.

#include <cmath>
#include <limits>

#include "common.h"

using namespace mj;  // NOLINT: the shared helpers of common.h

namespace {

enum KvType : int64_t { kF32 = 0, kBf16 = 1, kF16 = 2, kI8 = 3 };

struct F32 {
  using T = float;
  static float get(T v) { return v; }
};
struct Bf16 {
  using T = uint16_t;
  static float get(T v) {
    const uint32_t bits = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
};
struct F16 {  // IEEE half: sign, 5 exponent bits (bias 15), 10 mantissa bits
  using T = uint16_t;
  static float get(T v) {
    const uint32_t sign = uint32_t(v & 0x8000u) << 16, e = (v >> 10) & 0x1fu, m = v & 0x3ffu;
    uint32_t bits;
    if (e == 0x1f) {
      bits = sign | 0x7f800000u | (m << 13);  // inf, nan
    } else if (e != 0) {
      bits = sign | ((e + 112) << 23) | (m << 13);  // normal: rebias 15 -> 127
    } else {
      const float f = float(m) * 5.9604644775390625e-8f;  // subnormal (or zero): m * 2^-24
      std::memcpy(&bits, &f, sizeof bits);
      bits |= sign;
    }
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
};
struct I8 {
  using T = int8_t;
  static float get(T v) { return float(v); }
};

constexpr int64_t kBlock = 64;  // cache slots per step of the running softmax

struct Args {
  int64_t b, c, n, kv, h, B, S, L;
  int64_t layer, first, window;  // window 0: none
  const float* q;                // [b, c, n, h]
  const void* k;                 // [L, B, kv, h, S]
  const void* v;                 // [L, B, kv, S, h]
  const float* ks;               // [L, B, kv, S] (int8) or null
  const float* vs;
  const int32_t* index;          // [B, S]
  const float* k_new;            // [b, c, kv, h]
  const float* v_new;
  const int32_t* new_index;      // [b, c]
  const int32_t* query_index;    // [b, c]
  float* out;                    // [b, c, n, h]
};

inline bool Sees(int32_t key, int32_t query, int64_t window) {
  return key >= 0 && key <= query && (window == 0 || int64_t(query) - key < window);
}

// exp(x) for the softmax (x <= 0 there), exactly 0 below -87.3 (a masked score, -inf):
// Cephes' expf, 2^n times a degree-7 polynomial of the rest, within 2 ulp; branch-free, so
// the loops over a block vectorize (the library's expf is one call per value).
inline float Exp(float x) {
  const float lo = -87.3365447505531f, round = 12582912.f;  // 1.5 * 2^23: adding it rounds
  const float xc = std::min(std::max(x, lo), 88.3762626647949f);
  const float n = (xc * 1.44269504088896341f + round) - round;  // nearest integer
  const float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return x < lo ? 0.f : y * two_n;
}

constexpr float kMasked = -std::numeric_limits<float>::infinity();

// The running softmax of Q queries: maximum m, sum l, and the weighted values acc [Q, h].
struct Softmax {
  std::vector<float> m, l, acc;
  void reset(int64_t Q, int64_t h) {
    m.assign(Q, kMasked);
    l.assign(Q, 0.f);
    acc.assign(Q * h, 0.f);
  }
};

// Adds a block of nb keys to query qi's running softmax: srow [nb] its scores (masked:
// -inf), turned into their weights; value(s, w, acc) adds w times key s's value to acc.
template <class Value>
inline void Absorb(Softmax& st, int64_t qi, float* srow, int64_t nb, int64_t h,
                   const Value& value) {
  float top = st.m[qi];
  for (int64_t s = 0; s < nb; ++s) top = srow[s] > top ? srow[s] : top;
  if (top == kMasked) return;  // nothing seen yet
  const float rescale = Exp(st.m[qi] - top);  // 0 on the first keys seen
  st.m[qi] = top;
  float* acc = st.acc.data() + qi * h;
  for (int64_t d = 0; d < h; ++d) acc[d] *= rescale;
  float sum = 0.f;
  for (int64_t s = 0; s < nb; ++s) srow[s] = Exp(srow[s] - top);
  for (int64_t s = 0; s < nb; ++s) sum += srow[s];
  st.l[qi] = st.l[qi] * rescale + sum;
  for (int64_t s = 0; s < nb; ++s)
    if (srow[s] != 0.f) value(s, srow[s], acc);
}

// Row r, kv head j.
template <class E>
void AttendHead(const Args& a, int64_t r, int64_t j, Softmax& st, std::vector<float>& work) {
  using T = typename E::T;
  const int64_t g = a.n / a.kv, c = a.c, h = a.h, S = a.S, Q = g * c, R = a.first + r;
  const int64_t width = std::max(c, kBlock);
  work.resize(Q * h + Q * width + c * width + kBlock);
  float* qv = work.data();             // [Q, h]: query qi = i * c + t is head j * g + i at t
  float* sc = qv + Q * h;              // [Q, width] scores of a block
  float* seen = sc + Q * width;        // [c, width] 1 where query position t sees the key
  float* kf = seen + c * width;        // [kBlock] one row of a key block, as float32
  const float scale = 1.f / std::sqrt(float(h));
  for (int64_t i = 0; i < g; ++i)
    for (int64_t t = 0; t < c; ++t) {
      const float* src = a.q + ((r * c + t) * a.n + j * g + i) * h;
      for (int64_t d = 0; d < h; ++d) qv[(i * c + t) * h + d] = src[d] * scale;
    }
  const int32_t* qidx = a.query_index + r * c;
  st.reset(Q, h);

  // the chunk's own keys first
  const int32_t* nidx = a.new_index + r * c;
  for (int64_t qi = 0; qi < Q; ++qi) {
    float* srow = sc + qi * width;
    for (int64_t u = 0; u < c; ++u) {
      const float* key = a.k_new + ((r * c + u) * a.kv + j) * h;
      float dot = 0.f;
      for (int64_t d = 0; d < h; ++d) dot += qv[qi * h + d] * key[d];
      srow[u] = Sees(nidx[u], qidx[qi % c], a.window) ? dot : kMasked;
    }
    Absorb(st, qi, srow, c, h, [&](int64_t u, float w, float* acc) {
      const float* value = a.v_new + ((r * c + u) * a.kv + j) * h;
      for (int64_t d = 0; d < h; ++d) acc[d] += w * value[d];
    });
  }

  // then the cache's slots in use, a block of kBlock at a time
  const int32_t* idx = a.index + R * S;
  int64_t used = S;
  while (used > 0 && idx[used - 1] < 0) --used;
  const int64_t head = (a.layer * a.B + R) * a.kv + j;
  const T* K = static_cast<const T*>(a.k) + head * h * S;
  const T* V = static_cast<const T*>(a.v) + head * S * h;
  const float* ks = a.ks ? a.ks + head * S : nullptr;
  const float* vs = a.vs ? a.vs + head * S : nullptr;
  for (int64_t s0 = 0; s0 < used; s0 += kBlock) {
    const int64_t nb = std::min(kBlock, used - s0);
    for (int64_t t = 0; t < c; ++t)
      for (int64_t s = 0; s < nb; ++s) seen[t * width + s] = Sees(idx[s0 + s], qidx[t], a.window);
    std::fill(sc, sc + Q * width, 0.f);
    for (int64_t d = 0; d < h; ++d) {  // scores: each key row widened once, used by every query
      const T* krow = K + d * S + s0;
      for (int64_t s = 0; s < nb; ++s) kf[s] = E::get(krow[s]);
      for (int64_t qi = 0; qi < Q; ++qi) {
        const float qd = qv[qi * h + d];
        float* srow = sc + qi * width;
        for (int64_t s = 0; s < nb; ++s) srow[s] += qd * kf[s];
      }
    }
    for (int64_t qi = 0; qi < Q; ++qi) {
      float* srow = sc + qi * width;
      const float* mask = seen + (qi % c) * width;
      if (ks)
        for (int64_t s = 0; s < nb; ++s) srow[s] *= ks[s0 + s];
      for (int64_t s = 0; s < nb; ++s) srow[s] = mask[s] != 0.f ? srow[s] : kMasked;
      Absorb(st, qi, srow, nb, h, [&](int64_t s, float w, float* acc) {
        const T* value = V + (s0 + s) * h;
        if (vs) w *= vs[s0 + s];
        for (int64_t d = 0; d < h; ++d) acc[d] += w * E::get(value[d]);
      });
    }
  }

  for (int64_t i = 0; i < g; ++i)
    for (int64_t t = 0; t < c; ++t) {
      const int64_t qi = i * c + t;
      float* dst = a.out + ((r * c + t) * a.n + j * g + i) * h;
      const float inv = st.l[qi] > 0.f ? 1.f / st.l[qi] : 0.f;  // no key seen: zeros
      for (int64_t d = 0; d < h; ++d) dst[d] = st.acc[qi * h + d] * inv;
    }
}

template <class E>
void AttendAll(ffi::ThreadPool& pool, const Args& a) {
  // threads only when the work is worth their start (a decode step's head at short
  // contexts takes microseconds)
  const int64_t work = a.b * a.kv * a.c * (a.S + a.c) * a.h;
  const int threads = work < (1 << 18) ? 1 : int(std::max<int64_t>(1, pool.num_threads()));
  ParallelFor(pool, threads, a.b * a.kv, [&](int64_t unit, int) {
    thread_local Softmax st;
    thread_local std::vector<float> work;
    AttendHead<E>(a, unit / a.kv, unit % a.kv, st, work);
  });
}

#ifdef MJ_X86
#define MJ_AVX2_ATTN __attribute__((target("avx2,fma"), flatten))
MJ_AVX2_ATTN void AttendAvx2(ffi::ThreadPool& pool, const Args& a, int64_t type) {
  switch (type) {
    case kBf16: return AttendAll<Bf16>(pool, a);
    case kF16: return AttendAll<F16>(pool, a);
    case kI8: return AttendAll<I8>(pool, a);
    default: return AttendAll<F32>(pool, a);
  }
}
#endif

void AttendPlain(ffi::ThreadPool& pool, const Args& a, int64_t type) {
  switch (type) {
    case kBf16: return AttendAll<Bf16>(pool, a);
    case kF16: return AttendAll<F16>(pool, a);
    case kI8: return AttendAll<I8>(pool, a);
    default: return AttendAll<F32>(pool, a);
  }
}

ffi::Error AttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::AnyBuffer k,
                         ffi::AnyBuffer v, ffi::Buffer<ffi::F32> ks, ffi::Buffer<ffi::F32> vs,
                         ffi::Buffer<ffi::S32> index, ffi::Buffer<ffi::F32> k_new,
                         ffi::Buffer<ffi::F32> v_new, ffi::Buffer<ffi::S32> new_index,
                         ffi::Buffer<ffi::S32> query_index, ffi::Buffer<ffi::S32> layer,
                         ffi::Buffer<ffi::S32> first, ffi::ResultBuffer<ffi::F32> out,
                         int64_t window, int64_t type, int64_t isa) {
  const auto qd = q.dimensions(), kd = k.dimensions(), idd = index.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || idd.size() != 2)
    return ffi::Error::InvalidArgument("attention: q must be 4-D, k 5-D, index 2-D");
  Args a;
  a.b = qd[0], a.c = qd[1], a.n = qd[2], a.h = qd[3];
  a.L = kd[0], a.B = kd[1], a.kv = kd[2], a.S = kd[4];
  if (kd[3] != a.h || idd[0] != a.B || idd[1] != a.S || a.kv < 1 || a.n % a.kv != 0)
    return ffi::Error::InvalidArgument("attention: q, k and index disagree on their shapes");
  a.layer = layer.typed_data()[0];
  a.first = first.typed_data()[0];
  if (a.layer < 0 || a.layer >= a.L || a.first < 0 || a.first + a.b > a.B)
    return ffi::Error::InvalidArgument("attention: layer or rows outside the cache");
  a.window = window;
  a.q = q.typed_data();
  a.k = k.untyped_data();
  a.v = v.untyped_data();
  const bool scaled = type == kI8;
  if (scaled && ks.element_count() != a.L * a.B * a.kv * a.S)
    return ffi::Error::InvalidArgument("attention: an int8 cache needs its scales");
  a.ks = scaled ? ks.typed_data() : nullptr;
  a.vs = scaled ? vs.typed_data() : nullptr;
  a.index = index.typed_data();
  a.k_new = k_new.typed_data();
  a.v_new = v_new.typed_data();
  a.new_index = new_index.typed_data();
  a.query_index = query_index.typed_data();
  a.out = out->typed_data();
#ifdef MJ_X86
  if (Resolve(isa) <= kAvx2) {
    AttendAvx2(pool, a, type);
    return ffi::Error::Success();
  }
#endif
  AttendPlain(pool, a, type);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MistralJaxAttention, AttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // q [b, c, n, h]
                                  .Arg<ffi::AnyBuffer>()         // k [L, B, kv, h, S]
                                  .Arg<ffi::AnyBuffer>()         // v [L, B, kv, S, h]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k scales (int8), else empty
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v scales
                                  .Arg<ffi::Buffer<ffi::S32>>()  // index [B, S]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // k_new [b, c, kv, h]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // v_new
                                  .Arg<ffi::Buffer<ffi::S32>>()  // new_index [b, c]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // query_index [b, c]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Arg<ffi::Buffer<ffi::S32>>()  // first []
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [b, c, n, h]
                                  .Attr<int64_t>("window")
                                  .Attr<int64_t>("type")
                                  .Attr<int64_t>("isa"));

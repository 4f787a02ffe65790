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
// edges the vector tiles do not cover); the tiles are in matmul.h, the paths in matmul_isa.cc.
// Work is split over XLA's intra-op thread pool.

#include "matmul.h"

using namespace mj;  // NOLINT: the shared helpers of common.h and matmul.h

namespace {

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
                      ffi::ResultBuffer<ffi::F32> y, int64_t nk, int64_t isa) {
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
  const int64_t layer = r == 3 ? index.typed_data()[0] : 0;
  if (layer < 0 || layer >= L)  // read past the stack otherwise; XLA's own slice would clamp
    return ffi::Error::InvalidArgument("matmul: layer index " + std::to_string(layer) +
                                       " is outside w's " + std::to_string(L) + " layers");
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
                                  .Attr<int64_t>("isa"));

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

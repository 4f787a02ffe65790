// What the CPU kernels share: the FFI API, run-time ISA selection, and a parallel loop over
// XLA's intra-op thread pool.

#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#define MJ_X86 1
#include <immintrin.h>
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace mj {

// ISA codes: the `isa` attribute and MistralJaxCpuIsa use them.
enum Isa : int64_t { kAuto = 0, kAvx512 = 1, kAvx2 = 2, kScalar = 3 };

inline bool Supported(int64_t isa) {
#ifdef MJ_X86
  __builtin_cpu_init();
  if (isa == kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("fma");
  if (isa == kAvx2) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
  return isa == kScalar;
}

// The requested ISA, or the best one below it that the CPU has.
inline int64_t Resolve(int64_t requested) {
  int64_t isa = requested == kAuto ? kAvx512 : requested;
  while (isa < kScalar && !Supported(isa)) ++isa;
  return isa;
}

// ---------------------------------------------------------------------------------------
// Threads: the caller and up to `threads - 1` pool tasks claim units 0..n-1 from a shared
// counter; fn(unit, slot) runs each, slot being the claiming thread's number (caller: 0).
// The caller waits only for units already claimed, so a task that starts late (or never,
// the pool being busy) costs nothing but its share.

template <class Fn>
void ParallelFor(ffi::ThreadPool& pool, int threads, int64_t n, const Fn& fn) {
  if (threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::atomic<int> slots{1};
  };
  auto state = std::make_shared<State>();
  auto work = [n, &fn](State& st, int slot) {
    for (int64_t i; (i = st.next.fetch_add(1, std::memory_order_relaxed)) < n;) {
      fn(i, slot);
      st.done.fetch_add(1, std::memory_order_release);
    }
  };
  for (int t = 1; t < threads; ++t) {
    pool.Schedule([state, work] {
      // A task starting after the last unit is claimed returns at once: `fn`, held by
      // reference, is used only while the caller waits.
      const int slot = state->slots.fetch_add(1);
      work(*state, slot);
    });
  }
  work(*state, 0);
  // Wait for units other threads claimed: spin briefly, then yield (a busy machine may have
  // put the other thread on this core).
  for (int spins = 0; state->done.load(std::memory_order_acquire) < n; ++spins) {
#ifdef MJ_X86
    if (spins < 2000) {
      _mm_pause();
      continue;
    }
#endif
    std::this_thread::yield();
  }
}

}  // namespace mj

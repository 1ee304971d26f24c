// What the selection did, for tests and `mtmerge info` (exposed by common/module.cpp as
// mtmerge._C.selection_stats(), reset_selection_stats() and window_isa()):
// * counters of the paths taken, bumped once per selection (never per entry), shared by every
//   translation unit that includes select.h (C++17 inline variables);
// * the window pass's ISA, chosen once per process: the best this CPU has, capped by the
//   environment variable MTMERGE_MAX_ISA=avx2|default (tests run every version on one machine).
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string_view>

namespace mtmerge::merge {

struct SelectionStats {
  std::atomic<int64_t> window_hits{0};          // a selection finished from the window copy
  std::atomic<int64_t> bracket_misses{0};       // the rank fell outside the sampled bracket: radix fall-back
  std::atomic<int64_t> window_overflows{0};     // the window copy overflowed: radix fall-back
  std::atomic<int64_t> single_key_brackets{0};  // the sampled bracket was one key (lo == hi)
  std::atomic<int64_t> traced_cutoffs{0};       // a tie cut-off placed from the window pass's trace

  void reset() {
    for (std::atomic<int64_t>* c : {&window_hits, &bracket_misses, &window_overflows, &single_key_brackets,
                                    &traced_cutoffs}) {
      c->store(0, std::memory_order_relaxed);
    }
  }
};

inline SelectionStats selection_stats;

inline void bump(std::atomic<int64_t>& counter) { counter.fetch_add(1, std::memory_order_relaxed); }

enum class WindowIsa { kDefault, kAvx2, kAvx512 };

inline WindowIsa choose_window_isa() {
#if defined(__x86_64__) && defined(__GNUC__)
  const char* cap_env = std::getenv("MTMERGE_MAX_ISA");
  const std::string_view cap = cap_env ? cap_env : "";
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && (cap.empty() || cap == "avx512f")) return WindowIsa::kAvx512;
  if (__builtin_cpu_supports("avx2") && cap != "default") return WindowIsa::kAvx2;
#endif
  return WindowIsa::kDefault;
}

// One choice per process (an inline function's static is shared by every translation unit).
inline WindowIsa window_isa() {
  static const WindowIsa chosen = choose_window_isa();
  return chosen;
}

inline const char* window_isa_name() {
  switch (window_isa()) {
    case WindowIsa::kAvx512:
      return "avx512f";
    case WindowIsa::kAvx2:
      return "avx2";
    default:
      return "default";
  }
}

}  // namespace mtmerge::merge

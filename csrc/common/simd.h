// Portable multi-ISA compilation for hot loops.
//
// MTMERGE_CLONES compiles a function once per listed ISA and lets the dynamic loader pick
// the best clone for the running CPU (GCC/Clang function multiversioning via ifunc). Loops
// are written as plain C++ that the compiler auto-vectorizes in each clone, so a wheel
// built on an AVX-512 machine still runs on a plain x86-64 CPU (the "default" clone) and
// never dies with SIGILL. Elsewhere (arm64, other compilers) the macro is empty and the
// baseline ISA is used (NEON is part of the arm64 baseline).
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MTMERGE_CLONES __attribute__((target_clones("default", "avx2", "avx512f")))
#define MTMERGE_HAS_CLONES 1
#else
#define MTMERGE_CLONES
#define MTMERGE_HAS_CLONES 0
#endif

#if defined(__GNUC__)
#define MTMERGE_ALWAYS_INLINE inline __attribute__((always_inline))
#else
#define MTMERGE_ALWAYS_INLINE inline
#endif

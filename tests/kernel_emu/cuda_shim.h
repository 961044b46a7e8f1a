// Plain C++ stand-ins for the CUDA dialect kernels/*.cu use, so the unit tests can compile the
// kernels unchanged with the host compiler and run them against their Rust twins (see
// src/model/cuda_emu.rs). cuda_launch.cpp sets the "registers" before each emulated thread runs.
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

struct emu_dim3 {
    uint32_t x, y, z;
};
extern emu_dim3 blockIdx, blockDim, gridDim, threadIdx;

#define __global__
#define __device__ static
#define __forceinline__ inline
#define __shared__ static
// Occupancy hints for nvcc; the emulation runs threads one by one.
#define __launch_bounds__(...)

// Threads run one after another, so a barrier has nothing to wait for; kernels that need one
// between phases (topk_histogram) are launched with one thread per block.
static inline void __syncthreads() {}

static inline uint32_t atomicAdd(uint32_t* p, uint32_t v) {
    const uint32_t old = *p;
    *p = old + v;
    return old;
}

static inline uint32_t __float_as_uint(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

// IEEE binary16 with round-to-nearest-even conversions, as the hardware's.
#if defined(__aarch64__) && !defined(__clang__) && __GNUC__ < 13
// GCC before 13 has no _Float16 in C++ for aarch64 (the .ci/aarch64 run): __fp16 is the same
// binary16 storage type, converting through float with round-to-nearest-even.
typedef __fp16 __half;
#else
typedef _Float16 __half;
#endif
static inline float __half2float(__half h) { return (float)h; }
static inline __half __float2half(float f) { return (__half)f; }

// The device half of the RPN's per-level top-n (src/model/topk.rs): a radix select over the
// logits' order-preserving 32-bit keys, so only a few histograms and the n winners cross to the
// host instead of every logit and box delta of a level (about 160k anchors on P2 at 800 px).
//
// `topk_histogram_*` counts, among the keys whose bits above `shift + bits` equal `prefix`, how
// many fall in each of the 2^bits digit values at `shift`; the host picks the digit where the
// n-th largest key lies and narrows the prefix (11, 11, then 10 bits). `topk_collect_*` then
// gathers every key above the final threshold key (with its index) and the indices of the keys
// equal to it; the host sorts those few and breaks ties by lowest index, as the CPU path does.
//
// The keys follow f32 `total_cmp` order: sign set -> flip every bit, else set the sign bit.
// f16 logits are widened to f32 first, so both dtypes rank alike.

#include <cuda_fp16.h>
#include <stdint.h>

#define TOPK_MAX_BINS 2048

__device__ __forceinline__ float widen(float v) { return v; }
__device__ __forceinline__ float widen(__half v) { return __half2float(v); }

__device__ __forceinline__ uint32_t order_key(float v) {
    const uint32_t bits = __float_as_uint(v);
    return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// hist: [2^bits], zeroed by the caller. `prefix_shift` is shift + bits (32 on the first pass,
// where every key matches).
template <typename T>
__device__ void topk_histogram(const T* values, uint32_t n, uint32_t prefix, uint32_t prefix_shift,
                               uint32_t shift, uint32_t bits, uint32_t* hist) {
    __shared__ uint32_t local[TOPK_MAX_BINS];
    const uint32_t bins = 1u << bits;
    for (uint32_t b = threadIdx.x; b < bins; b += blockDim.x) {
        local[b] = 0;
    }
    __syncthreads();
    const uint32_t mask = bins - 1;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        const uint32_t key = order_key(widen(values[i]));
        // A shift of 32 is undefined in C++; on the first pass every key matches.
        const bool matches = prefix_shift >= 32 || (key >> prefix_shift) == prefix;
        if (matches) {
            atomicAdd(&local[(key >> shift) & mask], 1u);
        }
    }
    __syncthreads();
    for (uint32_t b = threadIdx.x; b < bins; b += blockDim.x) {
        if (local[b] != 0) {
            atomicAdd(&hist[b], local[b]);
        }
    }
}

// out: [2 + 2 * cap_above + cap_equal], zeroed by the caller: the count of keys
// above `threshold` and of keys equal to it, then (key, index) pairs of the keys above, then
// the indices of the keys equal. The host knows both counts from the histograms and checks the
// counters against them; slots past the caps are not written.
template <typename T>
__device__ void topk_collect(const T* values, uint32_t n, uint32_t threshold, uint32_t cap_above,
                             uint32_t cap_equal, uint32_t* out) {
    uint32_t* above = out + 2;
    uint32_t* equal = above + 2 * cap_above;
    for (uint32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x) {
        const uint32_t key = order_key(widen(values[i]));
        if (key > threshold) {
            const uint32_t slot = atomicAdd(&out[0], 1u);
            if (slot < cap_above) {
                above[2 * slot] = key;
                above[2 * slot + 1] = i;
            }
        } else if (key == threshold) {
            const uint32_t slot = atomicAdd(&out[1], 1u);
            if (slot < cap_equal) {
                equal[slot] = i;
            }
        }
    }
}

#define TOPK_OPS(TYPENAME, SUFFIX)                                                               \
    extern "C" __global__ void topk_histogram_##SUFFIX(                                          \
        const TYPENAME* values, uint32_t n, uint32_t prefix, uint32_t prefix_shift,             \
        uint32_t shift, uint32_t bits, uint32_t* hist) {                                         \
        topk_histogram(values, n, prefix, prefix_shift, shift, bits, hist);                      \
    }                                                                                            \
    extern "C" __global__ void topk_collect_##SUFFIX(                                            \
        const TYPENAME* values, uint32_t n, uint32_t threshold, uint32_t cap_above,              \
        uint32_t cap_equal, uint32_t* out) {                                                     \
        topk_collect(values, n, threshold, cap_above, cap_equal, out);                           \
    }

TOPK_OPS(float, f32)
TOPK_OPS(__half, f16)

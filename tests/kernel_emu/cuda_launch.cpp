// Emulated launches of kernels/*.cu for the unit tests: every (block, thread) of the grid runs
// the kernel body once, blocks and threads in a shuffled order, so results that depend on
// scheduling (the slots atomicAdd hands out) come out in an order the host must not rely on.
#include <stdint.h>

#include <algorithm>
#include <random>
#include <vector>

emu_dim3 blockIdx, blockDim, gridDim, threadIdx;

extern "C" {
void topk_histogram_f32(const float*, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t*);
void topk_histogram_f16(const __half*, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t*);
void topk_collect_f32(const float*, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t*);
void topk_collect_f16(const __half*, uint32_t, uint32_t, uint32_t, uint32_t, uint32_t*);
void paste_masks(const float*, const uint32_t*, float, uint8_t*);
void roi_align_f32(const float*, const float*, float*, uint32_t, uint32_t, uint32_t, uint32_t,
                   uint32_t, uint32_t, uint32_t, float, int32_t, uint32_t);
void roi_align_f16(const __half*, const float*, __half*, uint32_t, uint32_t, uint32_t, uint32_t,
                   uint32_t, uint32_t, uint32_t, float, int32_t, uint32_t);
}

template <typename Body>
static void launch(uint32_t gx, uint32_t gy, uint32_t bx, uint64_t seed, Body body) {
    gridDim = {gx, gy, 1};
    blockDim = {bx, 1, 1};
    std::mt19937_64 rng(seed);
    std::vector<std::pair<uint32_t, uint32_t>> blocks;
    for (uint32_t y = 0; y < gy; y++) {
        for (uint32_t x = 0; x < gx; x++) {
            blocks.push_back({x, y});
        }
    }
    std::shuffle(blocks.begin(), blocks.end(), rng);
    std::vector<uint32_t> threads(bx);
    for (uint32_t t = 0; t < bx; t++) {
        threads[t] = t;
    }
    for (auto [x, y] : blocks) {
        blockIdx = {x, y, 0};
        std::shuffle(threads.begin(), threads.end(), rng);
        for (uint32_t t : threads) {
            threadIdx = {t, 0, 0};
            body();
        }
    }
}

extern "C" void emu_topk_histogram(int f16, const void* values, uint32_t n, uint32_t prefix,
                                   uint32_t prefix_shift, uint32_t shift, uint32_t bits,
                                   uint32_t* hist, uint32_t gx, uint64_t seed) {
    launch(gx, 1, 1, seed, [&] {
        if (f16) {
            topk_histogram_f16((const __half*)values, n, prefix, prefix_shift, shift, bits, hist);
        } else {
            topk_histogram_f32((const float*)values, n, prefix, prefix_shift, shift, bits, hist);
        }
    });
}

extern "C" void emu_topk_collect(int f16, const void* values, uint32_t n, uint32_t threshold,
                                 uint32_t cap_above, uint32_t cap_equal, uint32_t* out,
                                 uint32_t gx, uint32_t bx, uint64_t seed) {
    launch(gx, 1, bx, seed, [&] {
        if (f16) {
            topk_collect_f16((const __half*)values, n, threshold, cap_above, cap_equal, out);
        } else {
            topk_collect_f32((const float*)values, n, threshold, cap_above, cap_equal, out);
        }
    });
}

extern "C" void emu_paste_masks(const float* probs, const uint32_t* table, float thresh,
                                uint8_t* out, uint32_t gx, uint32_t gy, uint32_t bx,
                                uint64_t seed) {
    launch(gx, gy, bx, seed, [&] { paste_masks(probs, table, thresh, out); });
}

extern "C" void emu_roi_align(int f16, const void* input, const float* rois, void* output,
                              const uint32_t* params, uint32_t gx, uint32_t bx, uint64_t seed) {
    // params: the 10 words of KernelParams (src/model/roi_align.rs), in the kernel's order.
    float scale;
    int32_t ratio;
    memcpy(&scale, &params[7], 4);
    memcpy(&ratio, &params[8], 4);
    launch(gx, 1, bx, seed, [&] {
        if (f16) {
            roi_align_f16((const __half*)input, rois, (__half*)output, params[0], params[1],
                          params[2], params[3], params[4], params[5], params[6], scale, ratio,
                          params[9]);
        } else {
            roi_align_f32((const float*)input, rois, (float*)output, params[0], params[1],
                          params[2], params[3], params[4], params[5], params[6], scale, ratio,
                          params[9]);
        }
    });
}

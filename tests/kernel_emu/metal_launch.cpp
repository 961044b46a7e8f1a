// Emulated dispatch of kernels/roi_align.metal for the unit tests: one call per thread of the
// grid (whole threadgroups, so some past the last output), in a shuffled order.
#include <metal_stdlib>

#include "roi_align.metal"

#include <stdint.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

extern "C" void emu_metal_roi_align(int f16, const void* input, const float* rois, void* output,
                                    const RoiAlignParams* params, uint32_t threads,
                                    uint64_t seed) {
    std::vector<uint32_t> order(threads);
    std::iota(order.begin(), order.end(), 0u);
    std::mt19937_64 rng(seed);
    std::shuffle(order.begin(), order.end(), rng);
    for (uint32_t index : order) {
        if (f16) {
            roi_align_f16((const half*)input, rois, (half*)output, *params, index);
        } else {
            roi_align_f32((const float*)input, rois, (float*)output, *params, index);
        }
    }
}

// torchvision's `paste_masks_in_image` on the device, thresholded: src/postprocess.rs's
// `paste_one` per output pixel, so that only each box's binary pixels come back to the host
// (not the 28x28 probabilities, and never a full-image canvas per detection).
//
// probs: [D, 28, 28] f32 probabilities. table: 9 words per region: the resized mask's corner
// (x0, y0; int32, may be negative) and size (w, h), its part inside the image [ix0, ix1) x
// [iy0, iy1), and where that part's pixels start in `out`, column-major (COCO's order, so the
// host's RLE scans contiguous columns). One grid row per region.
//
// The taps and the interpolation are evaluated in the CPU path's order, and build.rs compiles
// with --fmad=false, so both paths decide every pixel alike: a probability sitting on the
// threshold would otherwise flip with the rounding of a fused multiply-add.

#include <stdint.h>

#define MASK 28
#define SIDE 30  // MASK with a one-pixel zero border (PASTE_PADDING)

// torch's `interpolate(mode="bilinear", align_corners=False)` source taps: transform.rs's
// `linear_taps`.
__device__ __forceinline__ void tap(uint32_t out_size, uint32_t d, int* i0, int* i1, float* l1) {
    const float scale = (float)SIDE / (float)out_size;
    const float src = fmaxf(scale * ((float)d + 0.5f) - 0.5f, 0.0f);
    *i0 = (int)src;
    *i1 = *i0 < SIDE - 1 ? *i0 + 1 : *i0;
    *l1 = fminf(fmaxf(src - (float)*i0, 0.0f), 1.0f);
}

// The padded mask: the probabilities inside a zero border.
__device__ __forceinline__ float padded(const float* mask, int row, int col) {
    if (row < 1 || row > MASK || col < 1 || col > MASK) {
        return 0.0f;
    }
    return mask[(row - 1) * MASK + (col - 1)];
}

// 256-thread blocks (PasteLaunch::THREADS in postprocess.rs), declared so the compiler sizes
// registers for them.
extern "C" __global__ void __launch_bounds__(256) paste_masks(const float* probs, const uint32_t* table, float thresh,
                                       uint8_t* out) {
    const uint32_t* r = table + 9 * blockIdx.y;
    const int x0 = (int)r[0];
    const int y0 = (int)r[1];
    const uint32_t w = r[2];
    const uint32_t h = r[3];
    const uint32_t ix0 = r[4];
    const uint32_t iy0 = r[5];
    const uint32_t iw = r[6] - ix0;
    const uint32_t ih = r[7] - iy0;
    uint8_t* dst = out + r[8];
    const float* mask = probs + (uint64_t)blockIdx.y * MASK * MASK;
    const uint32_t area = iw * ih;
    for (uint32_t p = blockIdx.x * blockDim.x + threadIdx.x; p < area; p += blockDim.x * gridDim.x) {
        const uint32_t col = p / ih;
        const uint32_t row = p % ih;
        int y_0, y_1, x_0, x_1;
        float ly, lx;
        tap(h, (uint32_t)((int)(iy0 + row) - y0), &y_0, &y_1, &ly);
        tap(w, (uint32_t)((int)(ix0 + col) - x0), &x_0, &x_1, &lx);
        const float h0 = 1.0f - ly;
        const float w0 = 1.0f - lx;
        const float v = h0 * (w0 * padded(mask, y_0, x_0) + lx * padded(mask, y_0, x_1)) +
                        ly * (w0 * padded(mask, y_1, x_0) + lx * padded(mask, y_1, x_1));
        dst[p] = v > thresh ? 1 : 0;
    }
}

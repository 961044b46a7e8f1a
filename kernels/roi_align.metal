// RoIAlign forward for Metal: kernels/roi_align.cu (torchvision's `roi_align_forward_kernel`)
// step for step: one thread per output element (roi, channel, ph, pw), the same bin grid, the
// same `y < -1 || y > height` validity rule, edge clamping and average over the sampling points,
// so it matches src/model/roi_align.rs (the CPU reference) to float rounding.
//
// Features are float or half; samples are interpolated and summed in f32 either way and only
// the average is rounded to the output dtype. Boxes are always f32 rows of
// (batch_index, x1, y1, x2, y2). A batch index outside [0, batch) yields zeros, as in the CUDA
// kernel.
//
// drape compiles this library at run time with fast math off (`mod metal` in
// src/model/roi_align.rs), so the compiler neither fuses multiply-adds nor reorders sums nor
// approximates division, and the roundings are the CPU reference's. The pragmas say the same
// from inside: `math_mode(safe)` from MSL 3.2 (macOS 15, iOS 18) on, and `contract(off)`.
// The unit tests compile this file as C++ against tests/kernel_emu/metal_stdlib and compare it
// bit for bit with the CPU kernel.

#include <metal_stdlib>
using namespace metal;

#if __METAL_VERSION__ >= 320
#pragma METAL fp math_mode(safe)
#endif
#pragma clang fp contract(off)

// Mirrors `KernelParams` in src/model/roi_align.rs (#[repr(C)]), field for field.
struct RoiAlignParams {
    uint num_rois;
    uint batch;
    uint channels;
    uint height;
    uint width;
    uint pooled_h;
    uint pooled_w;
    float spatial_scale;
    int sampling_ratio;
    uint aligned;
};

template <typename T>
float bilinear(device const T* plane, int height, int width, float y, float x) {
    if (y < -1.0f || y > (float)height || x < -1.0f || x > (float)width) {
        return 0.0f;
    }
    y = fmax(y, 0.0f);
    x = fmax(x, 0.0f);
    int y_low = (int)y;
    int x_low = (int)x;
    int y_high;
    int x_high;
    if (y_low >= height - 1) {
        y_high = y_low = height - 1;
        y = (float)y_low;
    } else {
        y_high = y_low + 1;
    }
    if (x_low >= width - 1) {
        x_high = x_low = width - 1;
        x = (float)x_low;
    } else {
        x_high = x_low + 1;
    }
    const float ly = y - y_low;
    const float lx = x - x_low;
    const float hy = 1.0f - ly;
    const float hx = 1.0f - lx;
    return hy * hx * (float)plane[y_low * width + x_low] +
           hy * lx * (float)plane[y_low * width + x_high] +
           ly * hx * (float)plane[y_high * width + x_low] +
           ly * lx * (float)plane[y_high * width + x_high];
}

// input [batch, channels, height, width], rois [num_rois, 5], output
// [num_rois, channels, pooled_h, pooled_w]; all contiguous. The host checks that the output
// count fits a uint and rounds the grid up to whole threadgroups.
template <typename T>
void roi_align_forward(
    device const T* input, device const float* rois, device T* output,
    constant RoiAlignParams& p, uint index) {
    const uint total = p.num_rois * p.channels * p.pooled_h * p.pooled_w;
    if (index >= total) {
        return;
    }
    const int pw = index % p.pooled_w;
    const int ph = (index / p.pooled_w) % p.pooled_h;
    const int c = (index / p.pooled_w / p.pooled_h) % p.channels;
    const int n = index / p.pooled_w / p.pooled_h / p.channels;

    device const float* roi = rois + n * 5;
    const float b = roi[0];
    if (b < 0.0f || b >= (float)p.batch) {
        output[index] = (T)0.0f;
        return;
    }
    const float offset = p.aligned ? 0.5f : 0.0f;
    const float start_w = roi[1] * p.spatial_scale - offset;
    const float start_h = roi[2] * p.spatial_scale - offset;
    const float end_w = roi[3] * p.spatial_scale - offset;
    const float end_h = roi[4] * p.spatial_scale - offset;
    float roi_w = end_w - start_w;
    float roi_h = end_h - start_h;
    if (!p.aligned) {
        // Malformed boxes are forced to 1x1.
        roi_w = fmax(roi_w, 1.0f);
        roi_h = fmax(roi_h, 1.0f);
    }
    const float bin_h = roi_h / p.pooled_h;
    const float bin_w = roi_w / p.pooled_w;
    const int grid_h = p.sampling_ratio > 0 ? p.sampling_ratio : (int)ceil(roi_h / p.pooled_h);
    const int grid_w = p.sampling_ratio > 0 ? p.sampling_ratio : (int)ceil(roi_w / p.pooled_w);
    const float count = fmax((float)(grid_h * grid_w), 1.0f);

    device const T* plane = input + ((ulong)(int)b * p.channels + c) * p.height * p.width;
    float sum = 0.0f;
    for (int iy = 0; iy < grid_h; iy++) {
        const float y = start_h + ph * bin_h + (iy + 0.5f) * bin_h / grid_h;
        for (int ix = 0; ix < grid_w; ix++) {
            const float x = start_w + pw * bin_w + (ix + 0.5f) * bin_w / grid_w;
            sum += bilinear(plane, (int)p.height, (int)p.width, y, x);
        }
    }
    output[index] = (T)(sum / count);
}

#define ROI_ALIGN_OP(TYPENAME, FN_NAME)                                                          \
    kernel void FN_NAME(                                                                         \
        device const TYPENAME* input [[buffer(0)]], device const float* rois [[buffer(1)]],      \
        device TYPENAME* output [[buffer(2)]], constant RoiAlignParams& p [[buffer(3)]],         \
        uint index [[thread_position_in_grid]]) {                                                \
        roi_align_forward(input, rois, output, p, index);                                        \
    }

ROI_ALIGN_OP(float, roi_align_f32)
ROI_ALIGN_OP(half, roi_align_f16)

// RoIAlign forward, torchvision's `roi_align_forward_kernel` (ops/cuda/roi_align_kernel.cu):
// one thread per output element (roi, channel, ph, pw), the same bin grid, the same
// `y < -1 || y > height` validity rule, edge clamping and average over the sampling points, so
// it matches src/model/roi_align.rs (the CPU reference) to float rounding.
//
// Features are f32 or f16; samples are interpolated and summed in f32 either way and only the
// average is rounded to the output dtype. Boxes are always f32 rows of
// (batch_index, x1, y1, x2, y2). A batch index outside [0, batch) yields zeros (the CPU path
// reports an error; a kernel has no way to).

#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float load(const float* p) { return *p; }
__device__ __forceinline__ float load(const __half* p) { return __half2float(*p); }
__device__ __forceinline__ void store(float* p, float v) { *p = v; }
__device__ __forceinline__ void store(__half* p, float v) { *p = __float2half(v); }

template <typename T>
__device__ float bilinear(const T* plane, int height, int width, float y, float x) {
    if (y < -1.0f || y > (float)height || x < -1.0f || x > (float)width) {
        return 0.0f;
    }
    y = fmaxf(y, 0.0f);
    x = fmaxf(x, 0.0f);
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
    return hy * hx * load(plane + y_low * width + x_low) +
           hy * lx * load(plane + y_low * width + x_high) +
           ly * hx * load(plane + y_high * width + x_low) +
           ly * lx * load(plane + y_high * width + x_high);
}

// input [batch, channels, height, width], rois [num_rois, 5], output
// [num_rois, channels, pooled_h, pooled_w]; all contiguous.
template <typename T>
__device__ void roi_align_forward(
    const T* input, const float* rois, T* output, uint32_t num_rois, uint32_t batch,
    uint32_t channels, uint32_t height, uint32_t width, uint32_t pooled_h, uint32_t pooled_w,
    float spatial_scale, int32_t sampling_ratio, uint32_t aligned) {
    // 32-bit indices: the host (roi_align.rs's `kernel_params`) keeps the output and feature
    // counts below 2^31, so neither an index nor an index plus the grid's stride wraps.
    const uint32_t total = num_rois * channels * pooled_h * pooled_w;
    for (uint32_t index = blockIdx.x * blockDim.x + threadIdx.x; index < total;
         index += blockDim.x * gridDim.x) {
        const uint32_t pw = index % pooled_w;
        const uint32_t ph = (index / pooled_w) % pooled_h;
        const uint32_t c = (index / pooled_w / pooled_h) % channels;
        const uint32_t n = index / pooled_w / pooled_h / channels;

        const float* roi = rois + n * 5;
        const float b = roi[0];
        if (b < 0.0f || b >= (float)batch) {
            store(output + index, 0.0f);
            continue;
        }
        const float offset = aligned ? 0.5f : 0.0f;
        const float start_w = roi[1] * spatial_scale - offset;
        const float start_h = roi[2] * spatial_scale - offset;
        const float end_w = roi[3] * spatial_scale - offset;
        const float end_h = roi[4] * spatial_scale - offset;
        float roi_w = end_w - start_w;
        float roi_h = end_h - start_h;
        if (!aligned) {
            // Malformed boxes are forced to 1x1.
            roi_w = fmaxf(roi_w, 1.0f);
            roi_h = fmaxf(roi_h, 1.0f);
        }
        const float bin_h = roi_h / pooled_h;
        const float bin_w = roi_w / pooled_w;
        const int grid_h = sampling_ratio > 0 ? sampling_ratio : (int)ceilf(roi_h / pooled_h);
        const int grid_w = sampling_ratio > 0 ? sampling_ratio : (int)ceilf(roi_w / pooled_w);
        const float count = fmaxf((float)(grid_h * grid_w), 1.0f);

        const T* plane = input + ((uint32_t)b * channels + c) * height * width;
        float sum = 0.0f;
        for (int iy = 0; iy < grid_h; iy++) {
            const float y = start_h + ph * bin_h + (iy + 0.5f) * bin_h / grid_h;
            for (int ix = 0; ix < grid_w; ix++) {
                const float x = start_w + pw * bin_w + (ix + 0.5f) * bin_w / grid_w;
                sum += bilinear(plane, (int)height, (int)width, y, x);
            }
        }
        store(output + index, sum / count);
    }
}

// 256-thread blocks (roi_align.rs's THREADS): the bound lets the compiler budget up to 255
// registers a thread, where an unbounded kernel compiled for 1024-thread blocks would fail to
// launch with LAUNCH_OUT_OF_RESOURCES once it needs more than 64.
#define ROI_ALIGN_OP(TYPENAME, FN_NAME)                                                          \
    extern "C" __global__ void __launch_bounds__(256) FN_NAME(                                   \
        const TYPENAME* input, const float* rois, TYPENAME* output, uint32_t num_rois,           \
        uint32_t batch, uint32_t channels, uint32_t height, uint32_t width, uint32_t pooled_h,   \
        uint32_t pooled_w, float spatial_scale, int32_t sampling_ratio, uint32_t aligned) {      \
        roi_align_forward(input, rois, output, num_rois, batch, channels, height, width,          \
                          pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned);           \
    }

ROI_ALIGN_OP(float, roi_align_f32)
ROI_ALIGN_OP(__half, roi_align_f16)

// Colour jitter of a padded uint8 batch; see colour.h for the contract.
#include "colour.h"
#include "common.cuh"

namespace rf {
namespace {

constexpr int kColourThreads = 256;
constexpr int kSumBlocksPerImage = 64;

__device__ __forceinline__ float clamp_floor(float v) { return floorf(fminf(fmaxf(v, 0.0f), 255.0f)); }

// torchvision's uint8 grey level of float RGB values 0..255, operation by operation.
__device__ __forceinline__ float grey(float r, float g, float b) {
  return floorf(__fadd_rn(__fadd_rn(__fmul_rn(r, 0.2989f), __fmul_rn(g, 0.587f)), __fmul_rn(b, 0.114f)));
}

struct Image {
  int64_t h, w;
  float fb, fc, fs;
};

__device__ __forceinline__ Image image_of(const int64_t* sizes, const float* factors, int b) {
  return Image{sizes[2 * b], sizes[2 * b + 1], factors[3 * b], factors[3 * b + 1], factors[3 * b + 2]};
}

// Pass 1: sums[b] += grey(brightness(v)) over image b's own pixels (grid: kSumBlocksPerImage x B).
__global__ void grey_sums(const uint8_t* images, const int64_t* sizes, const float* factors, int64_t height,
                          int64_t width, unsigned long long* sums) {
  const int b = blockIdx.y;
  const Image im = image_of(sizes, factors, b);
  const int64_t pixels = im.h * im.w;
  const uint8_t* base = images + static_cast<int64_t>(b) * height * width * 3;
  unsigned long long acc = 0;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < pixels;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint8_t* p = base + ((i / im.w) * width + i % im.w) * 3;
    const float r = clamp_floor(__fmul_rn(p[0], im.fb)), g = clamp_floor(__fmul_rn(p[1], im.fb));
    const float bl = clamp_floor(__fmul_rn(p[2], im.fb));
    acc += static_cast<unsigned long long>(grey(r, g, bl));
  }
  for (int offset = 16; offset > 0; offset >>= 1) acc += __shfl_down_sync(kFullMask, acc, offset);
  __shared__ unsigned long long warp_sums[kColourThreads / 32];
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    unsigned long long total = 0;
    for (int k = 0; k < kColourThreads / 32; ++k) total += warp_sums[k];
    if (total) atomicAdd(sums + b, total);
  }
}

// Pass 2: every pixel of the padded batch (grid over B*H*W pixels).
__global__ void apply(const uint8_t* images, const int64_t* sizes, const float* factors, int64_t batch,
                      int64_t height, int64_t width, const unsigned long long* sums, uint8_t* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= batch * height * width) return;
  const int b = static_cast<int>(i / (height * width));
  const int64_t y = (i / width) % height, x = i % width;
  const Image im = image_of(sizes, factors, b);
  uint8_t* o = out + i * 3;
  if (y >= im.h || x >= im.w) {
    o[0] = o[1] = o[2] = 0;
    return;
  }
  const uint8_t* p = images + i * 3;
  const float area = fmaxf(static_cast<float>(im.h * im.w), 1.0f);
  const float mean = __fdiv_rn(static_cast<float>(sums[b]), area);
  const float keep_c = __fsub_rn(1.0f, im.fc), keep_s = __fsub_rn(1.0f, im.fs);
  const float shift = __fmul_rn(mean, keep_c);
  float v[3];
  for (int c = 0; c < 3; ++c) {
    const float v1 = clamp_floor(__fmul_rn(p[c], im.fb));
    v[c] = clamp_floor(__fadd_rn(__fmul_rn(v1, im.fc), shift));
  }
  const float g = __fmul_rn(grey(v[0], v[1], v[2]), keep_s);
  for (int c = 0; c < 3; ++c) o[c] = static_cast<uint8_t>(clamp_floor(__fadd_rn(__fmul_rn(v[c], im.fs), g)));
}

}  // namespace
}  // namespace rf

extern "C" int64_t rf_colour_jitter(const uint8_t* images, const int64_t* sizes, const float* factors, uint8_t* out,
                                    int64_t batch, int64_t height, int64_t width, void* workspace,
                                    size_t workspace_bytes, cudaStream_t stream) {
  using namespace rf;
  if (batch < 1 || batch > 65535 || height < 1 || width < 1 || batch * height * width >= (int64_t{1} << 40))
    return RF_ERROR_INVALID_ARGUMENT;
  const size_t bytes = align_up(static_cast<size_t>(batch) * sizeof(unsigned long long), 256);
  if (workspace == nullptr) return static_cast<int64_t>(bytes);
  if (workspace_bytes < bytes) return RF_ERROR_WORKSPACE_TOO_SMALL;
  if (images == nullptr || sizes == nullptr || factors == nullptr || out == nullptr) return RF_ERROR_INVALID_ARGUMENT;
  unsigned long long* sums = static_cast<unsigned long long*>(workspace);
  cudaError_t e = cudaMemsetAsync(sums, 0, static_cast<size_t>(batch) * sizeof(unsigned long long), stream);
  if (e != cudaSuccess) return status_of(e);
  grey_sums<<<dim3(kSumBlocksPerImage, static_cast<unsigned>(batch)), kColourThreads, 0, stream>>>(
      images, sizes, factors, height, width, sums);
  const int64_t pixels = batch * height * width;
  apply<<<static_cast<unsigned>((pixels + kColourThreads - 1) / kColourThreads), kColourThreads, 0, stream>>>(
      images, sizes, factors, batch, height, width, sums, out);
  return status_of(cudaGetLastError());
}

/* Colour jitter of a padded uint8 RGB batch with torchvision's arithmetic. Plain C API over device pointers.
 *
 * images and out are (B, H, W, 3) uint8 (a channels_last (B, 3, H, W) tensor); image b fills the top-left
 * sizes[b] = (h, w) corner, the rest is padding. factors is (B, 3) float32: brightness, contrast,
 * saturation. Per image, as torchvision's adjust_brightness -> adjust_contrast -> adjust_saturation on
 * the image alone (float32, each step clamped to 0..255 and truncated):
 *
 *   v1 = floor(clamp(v * f_b))
 *   m  = sum over the image of grey(v1) / (h * w)       grey(p) = floor(0.2989 r + 0.587 g + 0.114 b)
 *   v2 = floor(clamp(v1 * f_c + m * (1 - f_c)))
 *   v3 = floor(clamp(v2 * f_s + grey(v2) * (1 - f_s)))
 *
 * Padding stays 0. Every float operation is rounded as PyTorch rounds it (no FMA contraction); the grey
 * sum is exact (integers, 64-bit), where PyTorch's float32 sum can round, so m may differ from the
 * PyTorch reference's in its last bits (src/retinaflow/ops/_reference.py; tests/ops state the tolerance).
 * Two passes: per-image sums (integer atomics: deterministic), then one elementwise pass. No host
 * synchronisation, fixed-size output: it can be captured in a CUDA graph.
 *
 * Workspace convention of types.h: called with workspace == NULL, returns the bytes needed.
 */
#pragma once

#include "types.h"

#ifdef __cplusplus
extern "C" {
#endif

int64_t rf_colour_jitter(const uint8_t* images, const int64_t* sizes, const float* factors, uint8_t* out,
                         int64_t batch, int64_t height, int64_t width, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream);

#ifdef __cplusplus
}
#endif

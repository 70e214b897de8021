/* GroupNorm of a channels-last activation, forward and backward. Plain C API over device pointers.
 *
 * Layout: x, y, dy, dx are (N, P, C) contiguous, i.e. a channels_last (N, C, H, W) tensor with P = H*W
 * pixels; C channels in G groups of C/G consecutive channels. weight and bias are (C,) float32 or NULL
 * (1 and 0). Statistics accumulate in float32 whatever the element type; mean and rstd are (N, G) float32.
 *
 *   forward:  y = (x - mean[n,g]) * rstd[n,g] * weight[c] + bias[c]
 *   backward: dx = rstd * (w dy - mean_g(w dy) - xhat mean_g(w dy xhat))  (means over a group's channels
 *             and pixels), dweight[c] = sum_{n,p} dy xhat, dbias[c] = sum_{n,p} dy, float32
 *
 * Method (each pass reads the activation coalesced along C): per block of RF_GN_ROWS pixels, per-channel
 * partial sums of x and x*x (backward: dy and dy*x) into the workspace; one block per image reduces the
 * partials in a fixed order, forms the group statistics and per-(image, channel) coefficients; one
 * elementwise pass applies them. Deterministic (no atomics), no host synchronisation, fixed-size
 * outputs: it can be captured in a CUDA graph.
 *
 * Workspace convention of types.h: called with workspace == NULL, returns the bytes needed.
 */
#pragma once

#include "types.h"

#ifdef __cplusplus
extern "C" {
#endif

#define RF_GN_ROWS 128

typedef struct rf_group_norm_params {
  int64_t n, p, c;   /* images (<= 65535), pixels per image, channels (<= 4096) */
  int32_t groups;    /* G, divides c */
  float eps;
  rf_dtype dtype;    /* of x, y, dy, dx */
} rf_group_norm_params;

int64_t rf_group_norm_forward(const rf_group_norm_params* params, const void* x, const float* weight,
                              const float* bias, void* y, float* mean, float* rstd, void* workspace,
                              size_t workspace_bytes, cudaStream_t stream);

int64_t rf_group_norm_backward(const rf_group_norm_params* params, const void* dy, const void* x,
                               const float* weight, const float* mean, const float* rstd, void* dx,
                               float* dweight, float* dbias, void* workspace, size_t workspace_bytes,
                               cudaStream_t stream);

#ifdef __cplusplus
}
#endif

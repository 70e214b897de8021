/* RetinaNet decode: per image and FPN level, sigmoid -> score threshold -> top-n (anchor, class) pairs ->
 * box-delta decoding -> clamp to the image. Plain C API over device pointers (no PyTorch, no TensorRT).
 *
 * Layout of one level (torchvision RetinaNet's): class logits (B, A*C, H, W) and box deltas (B, A*4, H, W),
 * any element strides (contiguous NCHW and channels_last both read coalesced); a pair's flat index is
 * j = ((y * W + x) * A + a) * C + c, and its anchor is row (y * W + x) * A + a of the level's anchors
 * (H*W*A, 4) float32 x1y1x2y2. Deltas follow torchvision's BoxCoder with weights 1 and dw, dh clamped at
 * log(1000/16); boxes are clamped to [0, width] x [0, height] of the image's entry in `sizes`.
 *
 * Ranking: by logit (the sigmoid is monotone), ties broken by the lower j: deterministic, identical to
 * retinaflow.ops._reference.decode. A pair is a candidate when sigmoid(logit) > score_thresh.
 *
 * Output: for image b, slots [l * top_n, (l + 1) * top_n) hold level l's candidates, best first;
 * unused slots are padding: score 0, box (0, 0, 0, 0), class -1.
 *
 * Method: one pass over the logits compacts candidates into per-(image, level) buffers of `capacity`
 * entries; one block per (image, level) then radix-selects the exact top_n by a unique 64-bit key
 * (logit, index), sorts them and writes the outputs. A level with more than `capacity` candidates (a low
 * threshold, an untrained model) is refined first: three histogram passes over its logits, spread over the
 * GPU, find the exact key of its top_n-th candidate, and the candidates at or above it fill the buffer.
 * Only when those do not fit (more exact ties at that key than the buffer holds, or top_n > capacity) does
 * the level take the exact single-block path that re-reads its logits. No host synchronisation either way.
 */
#pragma once

#include "types.h"

#ifdef __cplusplus
extern "C" {
#endif

#define RF_DECODE_MAX_LEVELS 8
#define RF_DECODE_MAX_TOP_N 16384

typedef struct rf_decode_level {
  const void* cls;          /* logits (B, A*C, H, W), element type rf_decode_params.dtype */
  const void* box;          /* deltas (B, A*4, H, W), element type rf_decode_params.box_dtype */
  const float* anchors;     /* (H*W*A, 4) float32, contiguous, x1y1x2y2 in input pixels */
  int64_t height, width;    /* feature map size */
  int64_t cls_strides[4];   /* element strides of cls: batch, channel, y, x */
  int64_t box_strides[4];   /* element strides of box */
} rf_decode_level;

typedef struct rf_decode_params {
  int32_t batch;            /* B */
  int32_t num_levels;       /* 1..RF_DECODE_MAX_LEVELS */
  int32_t num_anchors;      /* A */
  int32_t num_classes;      /* C; H*W*A*C < 2^31 per level */
  rf_decode_level levels[RF_DECODE_MAX_LEVELS];
  rf_dtype dtype;           /* of the logits */
  rf_dtype box_dtype;       /* of the deltas */
  const void* sizes;        /* (B, 2) height, width of each unpadded image; NULL: no clamping */
  rf_itype sizes_type;
  float score_thresh;       /* in [0, 1) */
  int32_t top_n;            /* 1..RF_DECODE_MAX_TOP_N candidates kept per image and level */
  int32_t capacity;         /* fast-path candidates per (image, level); <= 0 selects 32768 */
  float* scores;            /* out (B, L*top_n) */
  float* boxes;             /* out (B, L*top_n, 4) x1y1x2y2 */
  void* classes;            /* out (B, L*top_n), type classes_type */
  rf_itype classes_type;
} rf_decode_params;

/* Workspace query (workspace == NULL: returns bytes) or launch (returns 0 or a negative rf status). */
int64_t rf_decode(const rf_decode_params* params, void* workspace, size_t workspace_bytes, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

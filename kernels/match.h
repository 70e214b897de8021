/* Anchor-to-ground-truth assignment (RetinaNet's matcher) for a whole batch. Plain C API over device
 * pointers, the conventions of types.h (workspace query, stream, no host synchronisation).
 *
 * For image b and anchor n, with IoU computed in float32 exactly as the PyTorch reference
 * (retinaflow.ops._reference.pairwise_iou: inter / max(area_a + area_g - inter, FLT_MIN), each step
 * rounded as a separate operation) and padding ground truths (label < 0) scoring -1:
 *   best = max_j IoU(n, j), idx = the first j reaching it;
 *   matches[b, n] = idx if best >= fg_iou, -1 (background) if best < bg_iou, else -2 (ignored).
 * With allow_low_quality, every ground truth's best anchors (all ties, IoU > 0) become foreground,
 * matched to their own best ground truth idx — torchvision's Matcher.
 *
 * Method: one thread per anchor, ground truths staged through shared memory in tiles; the IoU matrix
 * (B x N x M) is never stored. Each ground truth's best IoU is reduced per warp and per block and merged
 * with an integer atomicMax (IoU > 0 orders like its bits). A second pass recomputes the IoUs (same code,
 * same rounding) to find the anchors that reach a ground truth's best. Workspace: 4 bytes per ground truth
 * plus, with allow_low_quality, 4 per anchor and image.
 */
#pragma once

#include "types.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct rf_match_params {
  int32_t batch;              /* B >= 1 */
  int32_t num_anchors;        /* N >= 0 */
  int32_t num_gt;             /* M >= 0 ground-truth rows per image (padding included) */
  const float* anchors;       /* (N, 4) contiguous float32 x1y1x2y2 */
  const float* gt_boxes;      /* (B, M, 4) contiguous float32 x1y1x2y2 */
  const void* gt_labels;      /* (B, M) contiguous, type labels_type; label < 0 marks padding */
  rf_itype labels_type;
  float fg_iou;               /* bg_iou <= fg_iou */
  float bg_iou;
  int32_t allow_low_quality;  /* 0 or 1 */
  void* matches;              /* (B, N) output, type matches_type */
  rf_itype matches_type;
} rf_match_params;

/* Workspace query (workspace == NULL: returns bytes, always > 0) or launch (returns 0 or a negative
 * rf status). */
int64_t rf_match(const rf_match_params* params, void* workspace, size_t workspace_bytes, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

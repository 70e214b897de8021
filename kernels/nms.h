/* Batched, class-aware greedy NMS with fixed-size outputs. Plain C API over device pointers.
 *
 * For each image b: rows r < count with classes[b, r] >= 0 and a non-NaN score are candidates (others are
 * padding and ignored). Candidates are ordered by score, higher first, ties by lower row; a candidate is
 * kept unless a kept candidate of the same class has IoU > iou_threshold with it (IoU computed in float32
 * exactly as torchvision's CPU nms: inter / (area_a + area_b - inter), so zero-area boxes never suppress).
 * The first max_det kept rows are written, best first: out_scores (B, max_det) float32, out_boxes
 * (B, max_det, 4) float32 x1y1x2y2, out_classes (B, max_det); rows past out_counts[b] are 0 / class -1.
 *
 * Method: one block per image compacts the candidates and sorts them by a unique 64-bit key (score, row)
 * with a bitonic network in shared memory, then re-sorts their positions by class so each class's
 * candidates lie together, best first. It walks the candidates in score order; for each kept box the
 * block tests only the later candidates of the same class and marks suppressed ones in a bitmask, and
 * warp 0 finds the next survivor; it stops at max_det kept. Shared memory holds 8 bytes per sort slot
 * (K rounded up to a power of two) and 24 per row: up to about 6.5k rows per image on H100 (227 KB).
 * Beyond the device's limit the same code runs on a global-memory workspace (correct, slower).
 */
#pragma once

#include "types.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct rf_nms_params {
  int32_t batch;            /* B */
  int32_t count;            /* K rows per image, 0 <= K < 2^26 */
  const void* scores;       /* (B, K) contiguous, type scores_type */
  rf_dtype scores_type;
  const void* boxes;        /* (B, K, 4) contiguous x1y1x2y2, type boxes_type */
  rf_dtype boxes_type;
  const void* classes;      /* (B, K) contiguous; class < 0 marks padding */
  rf_itype classes_type;
  float iou_threshold;      /* in [0, 1] */
  int32_t max_det;          /* >= 1 rows written per image */
  float* out_scores;        /* (B, max_det) */
  float* out_boxes;         /* (B, max_det, 4) */
  void* out_classes;        /* (B, max_det), type out_type */
  void* out_counts;         /* (B,), type out_type */
  rf_itype out_type;
} rf_nms_params;

/* Workspace query (workspace == NULL: returns bytes, always > 0) or launch (returns 0 or a negative
 * rf status). Uses the current CUDA device's shared-memory limit to size the workspace. */
int64_t rf_nms(const rf_nms_params* params, void* workspace, size_t workspace_bytes, cudaStream_t stream);

#ifdef __cplusplus
}
#endif

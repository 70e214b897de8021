// Anchor matching for a batch; see match.h for the contract.
#include <float.h>

#include "common.cuh"
#include "match.h"

namespace rf {
namespace {

constexpr int kMatchThreads = 256;  // anchors per block, and ground truths per shared-memory tile
constexpr int kBackground = -1;
constexpr int kIgnore = -2;

struct MatchArgs {
  int32_t N, M;
  const float4* anchors;
  const float4* gt;
  const void* labels;
  rf_itype labels_type;
  float fg, bg;
  bool low_quality;
  void* matches;
  rf_itype matches_type;
};

__device__ __forceinline__ float area_of(float4 b) { return __fmul_rn(__fsub_rn(b.z, b.x), __fsub_rn(b.w, b.y)); }

// The reference's IoU, operation by operation (explicit roundings: no contraction into FMAs).
__device__ __forceinline__ float iou_of(float4 a, float area_a, float4 g, float area_g) {
  const float w = fmaxf(__fsub_rn(fminf(a.z, g.z), fmaxf(a.x, g.x)), 0.0f);
  const float h = fmaxf(__fsub_rn(fminf(a.w, g.w), fmaxf(a.y, g.y)), 0.0f);
  const float inter = __fmul_rn(w, h);
  const float uni = fmaxf(__fsub_rn(__fadd_rn(area_a, area_g), inter), FLT_MIN);
  return __fdiv_rn(inter, uni);
}

// Max over the warp's lanes (all 32 must call it).
__device__ __forceinline__ unsigned warp_max(unsigned v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  return __reduce_max_sync(kFullMask, v);
#else
  for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
#endif
}

struct GtTile {
  float4 box[kMatchThreads];
  float area[kMatchThreads];
  float target[kMatchThreads];  // pass 1: per-tile best IoU bits; pass 2: the IoU that marks a best anchor
  bool valid[kMatchThreads];
};

// Stage ground truths [t0, t0 + count) of image b. Callers synchronise around it.
__device__ __forceinline__ void load_tile(GtTile& s, const MatchArgs& a, int b, int t0, int count) {
  const int j = threadIdx.x;
  if (j < count) {
    const int64_t row = static_cast<int64_t>(b) * a.M + t0 + j;
    const float4 g = a.gt[row];
    s.box[j] = g;
    s.area[j] = area_of(g);
    s.valid[j] = load_int(a.labels, row, a.labels_type) >= 0;
  }
}

// The anchor of this thread (blockIdx.x tiles the anchors); inactive threads past N still take part in
// the block's shared-memory tiles and warp reductions, with a zero box.
struct ThreadAnchor {
  int64_t n;
  bool active;
  float4 box;
  float area;
};

__device__ __forceinline__ ThreadAnchor thread_anchor(const MatchArgs& a) {
  ThreadAnchor t;
  t.n = static_cast<int64_t>(blockIdx.x) * kMatchThreads + threadIdx.x;
  t.active = t.n < a.N;
  t.box = t.active ? a.anchors[t.n] : make_float4(0.f, 0.f, 0.f, 0.f);
  t.area = area_of(t.box);
  return t;
}

// Pass 1: best ground truth of every anchor (written as the thresholded match), and the best IoU of
// every ground truth (as uint bits, max over positive IoUs only) into best_gt.
__global__ void __launch_bounds__(kMatchThreads) match_best(MatchArgs a, unsigned* best_gt, int32_t* best_idx) {
  __shared__ GtTile s;
  const int b = blockIdx.y;
  const ThreadAnchor t = thread_anchor(a);
  const int lane = threadIdx.x & 31;
  float best = -INFINITY;
  int idx = 0;
  for (int t0 = 0; t0 < a.M; t0 += kMatchThreads) {
    const int count = min(kMatchThreads, a.M - t0);
    __syncthreads();
    load_tile(s, a, b, t0, count);
    if (threadIdx.x < count) reinterpret_cast<unsigned*>(s.target)[threadIdx.x] = 0u;
    __syncthreads();
    for (int j = 0; j < count; ++j) {
      const float v = s.valid[j] ? iou_of(t.box, t.area, s.box[j], s.area[j]) : -1.0f;
      if (t.active && v > best) {
        best = v;
        idx = t0 + j;
      }
      if (a.low_quality) {
        const unsigned bits = (t.active && v > 0.0f) ? __float_as_uint(v) : 0u;
        const unsigned top = warp_max(bits);
        if (lane == 0 && top != 0u) atomicMax(reinterpret_cast<unsigned*>(s.target) + j, top);
      }
    }
    if (a.low_quality) {
      __syncthreads();
      const unsigned bits = reinterpret_cast<unsigned*>(s.target)[threadIdx.x < count ? threadIdx.x : 0];
      if (threadIdx.x < count && bits != 0u) atomicMax(best_gt + static_cast<int64_t>(b) * a.M + t0 + threadIdx.x, bits);
    }
  }
  if (!t.active) return;
  const int64_t out = static_cast<int64_t>(b) * a.N + t.n;
  const int64_t m = best >= a.fg ? idx : (best < a.bg ? kBackground : kIgnore);
  store_int(a.matches, out, a.matches_type, m);
  if (a.low_quality) best_idx[out] = idx;
}

// Pass 2 (allow_low_quality): anchors whose IoU with some ground truth equals that ground truth's best
// positive IoU become foreground, matched to their own best ground truth.
__global__ void __launch_bounds__(kMatchThreads) match_low_quality(MatchArgs a, const unsigned* best_gt,
                                                                   const int32_t* best_idx) {
  __shared__ GtTile s;
  const int b = blockIdx.y;
  const ThreadAnchor t = thread_anchor(a);
  bool hit = false;
  for (int t0 = 0; t0 < a.M; t0 += kMatchThreads) {
    const int count = min(kMatchThreads, a.M - t0);
    __syncthreads();
    load_tile(s, a, b, t0, count);
    if (threadIdx.x < count) {
      const unsigned bits = best_gt[static_cast<int64_t>(b) * a.M + t0 + threadIdx.x];
      s.target[threadIdx.x] = bits != 0u ? __uint_as_float(bits) : 2.0f;  // 2 never equals an IoU
    }
    __syncthreads();
    if (t.active && !hit) {
      for (int j = 0; j < count; ++j) {
        if (s.valid[j] && iou_of(t.box, t.area, s.box[j], s.area[j]) == s.target[j]) {
          hit = true;
          break;
        }
      }
    }
  }
  if (t.active && hit) {
    const int64_t out = static_cast<int64_t>(b) * a.N + t.n;
    store_int(a.matches, out, a.matches_type, best_idx[out]);
  }
}

bool valid_itype(rf_itype t) { return t == RF_INT32 || t == RF_INT64; }

}  // namespace
}  // namespace rf

extern "C" int64_t rf_match(const rf_match_params* p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using namespace rf;
  if (p == nullptr || p->batch < 1 || p->batch > 65535 || p->num_anchors < 0 || p->num_gt < 0 ||
      !(p->bg_iou <= p->fg_iou) || !valid_itype(p->labels_type) || !valid_itype(p->matches_type))
    return RF_ERROR_INVALID_ARGUMENT;
  const bool low_quality = p->allow_low_quality != 0 && p->num_gt > 0;
  const size_t gt_bytes = align_up(static_cast<size_t>(p->batch) * p->num_gt * sizeof(unsigned), 256);
  const size_t idx_bytes = low_quality ? static_cast<size_t>(p->batch) * p->num_anchors * sizeof(int32_t) : 0;
  const size_t bytes = gt_bytes + idx_bytes > 0 ? gt_bytes + idx_bytes : 256;
  if (workspace == nullptr) return static_cast<int64_t>(bytes);
  if (workspace_bytes < bytes) return RF_ERROR_WORKSPACE_TOO_SMALL;
  if (p->num_anchors == 0) return 0;
  if (p->anchors == nullptr || p->matches == nullptr ||
      (p->num_gt > 0 && (p->gt_boxes == nullptr || p->gt_labels == nullptr)))
    return RF_ERROR_INVALID_ARGUMENT;

  MatchArgs a{};
  a.N = p->num_anchors;
  a.M = p->num_gt;
  a.anchors = reinterpret_cast<const float4*>(p->anchors);
  a.gt = reinterpret_cast<const float4*>(p->gt_boxes);
  a.labels = p->gt_labels;
  a.labels_type = p->labels_type;
  a.fg = p->fg_iou;
  a.bg = p->bg_iou;
  a.low_quality = low_quality;
  a.matches = p->matches;
  a.matches_type = p->matches_type;

  unsigned char* ws = static_cast<unsigned char*>(workspace);
  unsigned* best_gt = reinterpret_cast<unsigned*>(ws);
  int32_t* best_idx = low_quality ? reinterpret_cast<int32_t*>(ws + gt_bytes) : nullptr;
  cudaError_t e = cudaSuccess;
  if (low_quality) e = cudaMemsetAsync(best_gt, 0, static_cast<size_t>(p->batch) * p->num_gt * sizeof(unsigned), stream);
  if (e != cudaSuccess) return status_of(e);
  const dim3 grid((p->num_anchors + kMatchThreads - 1) / kMatchThreads, p->batch);
  match_best<<<grid, kMatchThreads, 0, stream>>>(a, best_gt, best_idx);
  if (low_quality) match_low_quality<<<grid, kMatchThreads, 0, stream>>>(a, best_gt, best_idx);
  return status_of(cudaGetLastError());
}

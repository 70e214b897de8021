// Batched class-aware NMS kernel; API and semantics in nms.h.
#include "common.cuh"
#include "nms.h"

namespace rf {
namespace {

constexpr int kNmsThreads = 512;
constexpr size_t kStaticSmem = 64;  // the kernel's own __shared__ variables, rounded up

struct NmsArgs {
  int K;
  int P;      // power of two >= max(K, 1): sort slots
  int words;  // removed-bitmask words
  size_t arena_bytes;
  size_t box_offset, score_offset, where_offset, removed_offset, kept_offset;
  const void* scores;
  rf_dtype scores_type;
  const void* boxes;
  rf_dtype boxes_type;
  const void* classes;
  rf_itype classes_type;
  float iou_threshold;
  int max_det;
  float* out_scores;
  float* out_boxes;
  void* out_classes;
  void* out_counts;
  rf_itype out_type;
};

__device__ __forceinline__ int pow2_at_least(int v) { return v <= 1 ? 1 : 1 << (32 - __clz(v - 1)); }

// float32 IoU with torchvision's CPU operation order and no fused multiply-adds.
__device__ __forceinline__ float iou(const float4& p, float area_p, const float4& q) {
  const float w = fmaxf(0.0f, __fsub_rn(fminf(p.z, q.z), fmaxf(p.x, q.x)));
  const float h = fmaxf(0.0f, __fsub_rn(fminf(p.w, q.w), fmaxf(p.y, q.y)));
  const float inter = __fmul_rn(w, h);
  const float area_q = __fmul_rn(__fsub_rn(q.z, q.x), __fsub_rn(q.w, q.y));
  return __fdiv_rn(inter, __fsub_rn(__fadd_rn(area_p, area_q), inter));
}

// One block per image. Arena (shared memory, or this image's slice of the workspace when kShared is
// false): keys u64[P] | boxes float4[K] | scores float[K] | where int[K] | removed u32[words] | kept.
// Positions q index candidates in score order; keys first hold (score, ~row), then (~class, ~q) so that
// a descending sort lists each class's candidates together, best first; where[q] is q's place there.
template <bool kShared>
__global__ __launch_bounds__(kNmsThreads) void nms_kernel(const __grid_constant__ NmsArgs a,
                                                          unsigned char* global_arena) {
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ uint32_t s_n;
  __shared__ int s_next;
  const int b = blockIdx.x;
  const int tid = threadIdx.x;
  unsigned char* arena = kShared ? smem : global_arena + b * a.arena_bytes;
  uint64_t* keys = reinterpret_cast<uint64_t*>(arena);
  float4* sbox = reinterpret_cast<float4*>(arena + a.box_offset);
  float* sscore = reinterpret_cast<float*>(arena + a.score_offset);
  int32_t* where = reinterpret_cast<int32_t*>(arena + a.where_offset);
  uint32_t* removed = reinterpret_cast<uint32_t*>(arena + a.removed_offset);
  int32_t* kept = reinterpret_cast<int32_t*>(arena + a.kept_offset);
  const int64_t row0 = static_cast<int64_t>(b) * a.K;

  // 1. Compact the candidates of this image as unique keys (score, row).
  if (tid == 0) s_n = 0;
  __syncthreads();
  for (int base = 0; base < a.K; base += kNmsThreads) {
    const int r = base + tid;
    bool valid = false;
    uint64_t c = 0;
    if (r < a.K) {
      const float score = load_float(a.scores, row0 + r, a.scores_type);
      valid = load_int(a.classes, row0 + r, a.classes_type) >= 0 && !isnan(score);
      c = composite(float_key(score), static_cast<uint32_t>(r));
    }
    const uint32_t pos = warp_reserve(kFullMask, valid, &s_n);
    if (valid) keys[pos] = c;
  }
  __syncthreads();
  const int n = static_cast<int>(s_n);
  const int P = pow2_at_least(n);
  for (int i = n + tid; i < P; i += kNmsThreads) keys[i] = 0;
  for (int i = tid; i < (n + 31) / 32; i += kNmsThreads) removed[i] = 0;
  __syncthreads();

  // 2. Score order; gather boxes and scores by position, then re-key by (class, position).
  block_bitonic_sort_desc(keys, P);
  for (int q = tid; q < n; q += kNmsThreads) {
    const uint64_t c = keys[q];
    const int64_t r = row0 + composite_index(c);
    float box[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) box[k] = load_float(a.boxes, r * 4 + k, a.boxes_type);
    sbox[q] = make_float4(box[0], box[1], box[2], box[3]);
    sscore[q] = key_float(static_cast<uint32_t>(c >> 32));
    const uint32_t cls = static_cast<uint32_t>(load_int(a.classes, r, a.classes_type));
    keys[q] = (static_cast<uint64_t>(~cls) << 32) | static_cast<uint64_t>(~static_cast<uint32_t>(q));
  }
  __syncthreads();
  block_bitonic_sort_desc(keys, P);  // class ascending, then position ascending
  for (int p = tid; p < n; p += kNmsThreads) where[~static_cast<uint32_t>(keys[p])] = p;
  __syncthreads();

  // 3. Greedy walk in score order; a kept box only tests the later candidates of its own class.
  int count = 0;
  for (int i = 0; i < n;) {
    if (tid == 0) kept[count] = i;
    if (++count >= a.max_det) break;
    const int pi = where[i];
    const uint32_t ci = static_cast<uint32_t>(keys[pi] >> 32);
    const float4 bi = sbox[i];
    const float area_i = __fmul_rn(__fsub_rn(bi.z, bi.x), __fsub_rn(bi.w, bi.y));
    for (int p = pi + 1 + tid; p < n; p += kNmsThreads) {
      const uint64_t e = keys[p];
      if (static_cast<uint32_t>(e >> 32) != ci) break;  // past the end of this class's run
      const int q = static_cast<int>(~static_cast<uint32_t>(e));
      const uint32_t bit = 1u << (q & 31);
      if (removed[q >> 5] & bit) continue;
      if (iou(bi, area_i, sbox[q]) > a.iou_threshold) atomicOr(&removed[q >> 5], bit);
    }
    __syncthreads();
    if (tid < 32) {  // next zero bit after i
      const int lane = tid;
      const int start = i + 1;
      int next = n;
      for (int w0 = start >> 5; w0 * 32 < n; w0 += 32) {
        const int w = w0 + lane;
        unsigned bits = 0;
        if (w * 32 < n) {
          bits = ~removed[w];
          if (w == (start >> 5)) bits &= ~0u << (start & 31);
        }
        const unsigned any = __ballot_sync(kFullMask, bits != 0);
        if (any != 0) {
          const int src = __ffs(any) - 1;
          next = (w0 + src) * 32 + __ffs(__shfl_sync(kFullMask, bits, src)) - 1;
          break;
        }
      }
      if (lane == 0) s_next = next < n ? next : n;
    }
    __syncthreads();
    i = s_next;
  }
  __syncthreads();

  // 4. Fixed-size output.
  for (int q = tid; q < a.max_det; q += kNmsThreads) {
    const int64_t o = static_cast<int64_t>(b) * a.max_det + q;
    if (q < count) {
      const int k = kept[q];
      const float4 box = sbox[k];
      a.out_scores[o] = sscore[k];
      a.out_boxes[o * 4 + 0] = box.x;
      a.out_boxes[o * 4 + 1] = box.y;
      a.out_boxes[o * 4 + 2] = box.z;
      a.out_boxes[o * 4 + 3] = box.w;
      store_int(a.out_classes, o, a.out_type, static_cast<int32_t>(~static_cast<uint32_t>(keys[where[k]] >> 32)));
    } else {
      a.out_scores[o] = 0.0f;
#pragma unroll
      for (int k = 0; k < 4; ++k) a.out_boxes[o * 4 + k] = 0.0f;
      store_int(a.out_classes, o, a.out_type, -1);
    }
  }
  if (tid == 0) store_int(a.out_counts, b, a.out_type, count);
}

bool valid_dtype(rf_dtype t) { return t == RF_FLOAT32 || t == RF_FLOAT16 || t == RF_BFLOAT16; }
bool valid_itype(rf_itype t) { return t == RF_INT32 || t == RF_INT64; }

}  // namespace
}  // namespace rf

extern "C" int64_t rf_nms(const rf_nms_params* p, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  using namespace rf;
  if (p == nullptr || p->batch < 1 || p->count < 0 || p->count >= (1 << 26) || p->max_det < 1 ||
      !(p->iou_threshold >= 0.0f && p->iou_threshold <= 1.0f) || !valid_dtype(p->scores_type) ||
      !valid_dtype(p->boxes_type) || !valid_itype(p->classes_type) || !valid_itype(p->out_type))
    return RF_ERROR_INVALID_ARGUMENT;
  NmsArgs a{};
  a.K = p->count;
  a.P = next_pow2(a.K > 1 ? a.K : 1);
  a.words = (a.P + 31) / 32;
  a.box_offset = align_up(static_cast<size_t>(a.P) * sizeof(uint64_t), 16);
  a.score_offset = a.box_offset + static_cast<size_t>(a.K) * sizeof(float4);
  a.where_offset = a.score_offset + align_up(static_cast<size_t>(a.K) * sizeof(float), 16);
  a.removed_offset = a.where_offset + align_up(static_cast<size_t>(a.K) * sizeof(int32_t), 16);
  a.kept_offset = a.removed_offset + align_up(static_cast<size_t>(a.words) * sizeof(uint32_t), 16);
  a.arena_bytes = align_up(a.kept_offset + static_cast<size_t>(p->max_det) * sizeof(int32_t), 256);

  int device = 0, optin = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (e != cudaSuccess) return status_of(e);
  const bool in_smem = a.arena_bytes + kStaticSmem <= static_cast<size_t>(optin);
  const size_t bytes = in_smem ? 256 : static_cast<size_t>(p->batch) * a.arena_bytes;
  if (workspace == nullptr) return static_cast<int64_t>(bytes);
  if (workspace_bytes < bytes) return RF_ERROR_WORKSPACE_TOO_SMALL;
  if ((a.K > 0 && (p->scores == nullptr || p->boxes == nullptr || p->classes == nullptr)) ||
      p->out_scores == nullptr || p->out_boxes == nullptr || p->out_classes == nullptr || p->out_counts == nullptr)
    return RF_ERROR_INVALID_ARGUMENT;

  a.scores = p->scores;
  a.scores_type = p->scores_type;
  a.boxes = p->boxes;
  a.boxes_type = p->boxes_type;
  a.classes = p->classes;
  a.classes_type = p->classes_type;
  a.iou_threshold = p->iou_threshold;
  a.max_det = p->max_det;
  a.out_scores = p->out_scores;
  a.out_boxes = p->out_boxes;
  a.out_classes = p->out_classes;
  a.out_counts = p->out_counts;
  a.out_type = p->out_type;

  const size_t smem = in_smem ? a.arena_bytes : 0;
  if (in_smem) {
    static int configured[64] = {};
    e = raise_smem_limit(nms_kernel<true>, smem, configured);
    if (e != cudaSuccess) return status_of(e);
    nms_kernel<true><<<p->batch, kNmsThreads, smem, stream>>>(a, nullptr);
  } else {
    nms_kernel<false><<<p->batch, kNmsThreads, 0, stream>>>(a, static_cast<unsigned char*>(workspace));
  }
  return status_of(cudaGetLastError());
}

// RetinaNet decode kernels; API and semantics in decode.h.
#include <math.h>

#include "common.cuh"
#include "decode.h"

namespace rf {
namespace {

constexpr int kFilterThreads = 256;
constexpr int kFilterItems = 16;  // elements per thread (a multiple of 8)
constexpr uint32_t kFilterTile = kFilterThreads * kFilterItems;
constexpr int kSelectThreads = 1024;
constexpr int kStage = 8192;  // candidates copied to shared memory for the select passes (64 KB)
constexpr int kDefaultCapacity = 32768;
// Overflow refinement (a level with more candidates than the buffer holds): three histogram passes over
// the key's bits 31-21, 20-10 and 9-0 find the exact key of the top_n-th candidate with the whole GPU.
constexpr int kRefineThreads = 1024;
constexpr uint32_t kRefineTile = kRefineThreads * 16;
constexpr int kRefineBins = 2048;
constexpr int kRefineMaxBlocks = 264;  // 2 per SM of an H100: enough to stream a level per pass
constexpr float kClip = 4.135166556742356f;  // log(1000 / 16)

struct Level {
  const void* cls;
  const void* box;
  const float* anchors;
  uint32_t H, W;
  int64_t cs[4], bs[4];
  uint32_t n;           // H * W * A * C pairs per image
  uint32_t blocks;      // filter blocks per image
  uint32_t first_block; // first filter block of this level
  uint32_t rtiles;      // refinement tiles per image
  uint32_t first_rtile; // first refinement tile of this level
  int channels_last;    // iterate channel-fastest (stride of channels is 1)
  int dense;            // strides equal the iteration order: element e is at offset e
  int vec;              // dense, 16-byte aligned rows, n a multiple of the vector: 16-byte loads
};

struct Args {
  Level lv[RF_DECODE_MAX_LEVELS];
  int L, B;
  uint32_t A, C;
  rf_dtype box_dtype;
  const void* sizes;
  rf_itype sizes_type;
  float thresh, logit_lo;
  int top_n;
  int sel_slots;  // power of two >= top_n
  uint32_t cap;
  uint32_t rtiles;       // refinement tiles of all levels and images
  uint32_t* overflow;    // set when a (level, image) has more candidates than cap
  uint32_t* tickets;     // per refinement pass: blocks done (the last one picks the digits)
  uint32_t* state;       // per (level, image): key prefix, still to take, refined candidates
  uint32_t* hist;        // per pass and (level, image): kRefineBins counts
  float* scores;
  float* boxes;
  void* classes;
  rf_itype classes_type;
};

// Position e of a level's iteration order -> (channel, y, x).
__device__ __forceinline__ void unravel(const Args& a, const Level& lv, uint32_t e, uint32_t& ch, uint32_t& y,
                                        uint32_t& x) {
  if (lv.channels_last) {
    const uint32_t CH = a.A * a.C;
    ch = e % CH;
    const uint32_t t = e / CH;
    x = t % lv.W;
    y = t / lv.W;
  } else {
    x = e % lv.W;
    const uint32_t t = e / lv.W;
    y = t % lv.H;
    ch = t / lv.H;
  }
}

__device__ __forceinline__ int64_t cls_offset(const Level& lv, uint32_t e, uint32_t ch, uint32_t y, uint32_t x) {
  return lv.dense ? static_cast<int64_t>(e) : ch * lv.cs[1] + y * lv.cs[2] + x * lv.cs[3];
}

__device__ __forceinline__ bool passes(const Args& a, float v) { return v > a.logit_lo && sigmoid(v) > a.thresh; }

// Sort key of a candidate whose logit is v at channel ch, (y, x).
__device__ __forceinline__ uint64_t key_of(const Args& a, const Level& lv, float v, uint32_t ch, uint32_t y,
                                           uint32_t x) {
  const uint32_t anchor = (y * lv.W + x) * a.A + ch / a.C;
  return composite(float_key(v), anchor * a.C + ch % a.C);
}

// Slow path: candidate at position e of image b, read from the logits.
template <typename T>
__device__ __forceinline__ bool raw_candidate(const Args& a, const Level& lv, int b, uint32_t e, uint64_t& c) {
  uint32_t ch, y, x;
  unravel(a, lv, e, ch, y, x);
  const T* p = static_cast<const T*>(lv.cls) + b * lv.cs[0];
  const float v = to_float(p[cls_offset(lv, e, ch, y, x)]);
  if (!passes(a, v)) return false;
  c = key_of(a, lv, v, ch, y, x);
  return true;
}

// Position of a thread's item i within its tile: 16-byte vectors of V elements on the vector path
// (V = 16 / sizeof(T)), single elements otherwise; both coalesced across the warp.
template <int V>
__device__ __forceinline__ uint32_t item_position(uint32_t start, int i) {
  return start + ((i / V) * kFilterThreads + threadIdx.x) * V + i % V;
}

// One pass over every logit: candidates above the threshold go to their (level, image) buffer.
// Loads are all issued before any value is used, so each thread has kFilterItems elements in flight.
template <typename T>
__global__ __launch_bounds__(kFilterThreads) void filter_kernel(const __grid_constant__ Args a,
                                                                uint32_t* __restrict__ counts,
                                                                uint64_t* __restrict__ cand) {
  constexpr int V = 16 / sizeof(T);
  constexpr int NV = kFilterItems / V;
  int l = 0;
  for (int i = 1; i < a.L; ++i)
    if (blockIdx.x >= a.lv[i].first_block) l = i;
  const Level& lv = a.lv[l];
  const uint32_t rel = blockIdx.x - lv.first_block;
  const int b = rel / lv.blocks;
  const uint32_t start = (rel % lv.blocks) * kFilterTile;
  const T* base = static_cast<const T*>(lv.cls) + b * lv.cs[0];
  const bool vec = lv.vec;

  float v[kFilterItems];
  if (vec) {  // dense, 16-byte aligned, n % V == 0: whole vectors are in or out
    uint4 raw[NV];
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const uint32_t e = item_position<V>(start, k * V);
      raw[k] = e < lv.n ? __ldg(reinterpret_cast<const uint4*>(base + e)) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int k = 0; k < NV; ++k) {
      const T* t = reinterpret_cast<const T*>(&raw[k]);
      const bool in = item_position<V>(start, k * V) < lv.n;
#pragma unroll
      for (int q = 0; q < V; ++q) v[k * V + q] = in ? to_float(t[q]) : -INFINITY;
    }
  } else {
    T raw[kFilterItems];
#pragma unroll
    for (int k = 0; k < kFilterItems; ++k) {
      const uint32_t e = item_position<1>(start, k);
      if (e < lv.n) {
        uint32_t ch, y, x;
        unravel(a, lv, e, ch, y, x);
        raw[k] = __ldg(base + cls_offset(lv, e, ch, y, x));
      }
    }
#pragma unroll
    for (int k = 0; k < kFilterItems; ++k) v[k] = item_position<1>(start, k) < lv.n ? to_float(raw[k]) : -INFINITY;
  }

  int cnt = 0;
  uint32_t present = 0;
#pragma unroll
  for (int k = 0; k < kFilterItems; ++k) {
    if (passes(a, v[k])) {
      present |= 1u << k;
      ++cnt;
    }
  }
  if (__ballot_sync(kFullMask, cnt > 0) == 0) return;
  const int lane = threadIdx.x & 31;
  int incl = cnt;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int t = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += t;
  }
  const int total = __shfl_sync(kFullMask, incl, 31);
  const int s = l * a.B + b;
  uint32_t pos = 0;
  if (lane == 31) {
    pos = atomicAdd(&counts[s], static_cast<uint32_t>(total));
    if (pos + static_cast<uint32_t>(total) > a.cap) *a.overflow = 1;
  }
  pos = __shfl_sync(kFullMask, pos, 31) + static_cast<uint32_t>(incl - cnt);
  uint64_t* out = cand + static_cast<size_t>(s) * a.cap;
#pragma unroll
  for (int k = 0; k < kFilterItems; ++k) {
    if (present & (1u << k)) {
      if (pos < a.cap) {
        const uint32_t e = vec ? item_position<V>(start, k) : item_position<1>(start, k);
        uint32_t ch, y, x;
        unravel(a, lv, e, ch, y, x);
        out[pos] = key_of(a, lv, v[k], ch, y, x);
      }
      ++pos;
    }
  }
}

__device__ void write_candidate(const Args& a, const Level& lv, int b, uint64_t c, int64_t slot) {
  const uint32_t j = composite_index(c);
  const uint32_t anchor = j / a.C;
  const uint32_t an = anchor % a.A, loc = anchor / a.A;
  const uint32_t x = loc % lv.W, y = loc / lv.W;
  const int64_t off = b * lv.bs[0] + y * lv.bs[2] + x * lv.bs[3];
  float d[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) d[k] = load_float(lv.box, off + (an * 4 + k) * lv.bs[1], a.box_dtype);
  const float* q = lv.anchors + static_cast<size_t>(anchor) * 4;
  const float w = q[2] - q[0], h = q[3] - q[1];
  const float cx = q[0] + 0.5f * w, cy = q[1] + 0.5f * h;
  const float px = d[0] * w + cx, py = d[1] * h + cy;
  const float pw = expf(fminf(d[2], kClip)) * w, ph = expf(fminf(d[3], kClip)) * h;
  float box[4] = {px - 0.5f * pw, py - 0.5f * ph, px + 0.5f * pw, py + 0.5f * ph};
  if (a.sizes != nullptr) {
    const float height = static_cast<float>(load_int(a.sizes, 2 * b, a.sizes_type));
    const float width = static_cast<float>(load_int(a.sizes, 2 * b + 1, a.sizes_type));
#pragma unroll
    for (int k = 0; k < 4; ++k) box[k] = fminf(fmaxf(box[k], 0.0f), (k & 1) ? height : width);
  }
  a.scores[slot] = sigmoid(key_float(static_cast<uint32_t>(c >> 32)));
#pragma unroll
  for (int k = 0; k < 4; ++k) a.boxes[slot * 4 + k] = box[k];
  store_int(a.classes, slot, a.classes_type, j % a.C);
}

__device__ __forceinline__ int pow2_at_least(uint32_t v) {
  return v <= 1 ? 1 : 1 << (32 - __clz(static_cast<int>(v - 1)));
}

// First warp only (threadIdx.x < 32): the digit d of a descending radix histogram hist[0, bins) that holds the
// k-th key (1-based): the counts above d are < k and those from d up are >= k. True on the one lane that
// found it, with d and the count above it; false on the others. bins a multiple of 32.
template <int kBins>
__device__ __forceinline__ bool kth_digit(const uint32_t* hist, uint32_t k, int& digit, uint32_t& above) {
  constexpr int kPerLane = kBins / 32;  // lane L owns digits bins-1 - kPerLane*L downwards
  const int lane = threadIdx.x;
  uint32_t local = 0;
  for (int q = 0; q < kPerLane; ++q) local += hist[kBins - 1 - kPerLane * lane - q];
  uint32_t incl = local;
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t t = __shfl_up_sync(kFullMask, incl, o);
    if (lane >= o) incl += t;
  }
  const unsigned hit = __ballot_sync(kFullMask, incl >= k);
  if (lane != __ffs(hit) - 1) return false;
  uint32_t acc = incl - local;
  for (int q = 0; q < kPerLane; ++q) {
    const int d = kBins - 1 - kPerLane * lane - q;
    if (acc + hist[d] >= k) {
      digit = d;
      above = acc;
      return true;
    }
    acc += hist[d];
  }
  return false;
}

// A (level, image) the refinement resolves: more candidates than the buffer holds, top_n of them fit.
__device__ __forceinline__ bool refinable(const Args& a, const uint32_t* counts, int s) {
  return counts[s] > a.cap && static_cast<uint32_t>(a.top_n) <= a.cap;
}

// Refinement tile t -> level, image and first element; false past the last tile.
__device__ __forceinline__ bool refine_tile(const Args& a, uint32_t t, int& l, int& b, uint32_t& start) {
  if (t >= a.rtiles) return false;
  l = 0;
  for (int i = 1; i < a.L; ++i)
    if (t >= a.lv[i].first_rtile) l = i;
  const uint32_t rel = t - a.lv[l].first_rtile;
  b = rel / a.lv[l].rtiles;
  start = (rel % a.lv[l].rtiles) * kRefineTile;
  return true;
}

// Lowest key bit that refinement pass p (0, 1, 2) decides.
__device__ __forceinline__ int refine_shift(int p) { return p == 0 ? 21 : (p == 1 ? 10 : 0); }

// Pass p of the overflow refinement: histogram of key bits refine_shift(p).. of the candidates whose higher
// bits equal the prefix found so far; the last block to finish picks the digit holding the k-th key.
template <typename T>
__global__ __launch_bounds__(kRefineThreads) void refine_kernel(const __grid_constant__ Args a,
                                                                const uint32_t* __restrict__ counts, int p) {
  if (*a.overflow == 0) return;  // the usual case: one flag read per block
  __shared__ uint32_t hist[kRefineBins];
  __shared__ bool s_last;
  const int segments = a.L * a.B;
  const uint32_t mask = p == 0 ? 0u : ~((1u << refine_shift(p - 1)) - 1u);  // the bits decided so far
  const int shift = refine_shift(p);
  for (uint32_t t = blockIdx.x;; t += gridDim.x) {
    int l, b;
    uint32_t start;
    if (!refine_tile(a, t, l, b, start)) break;
    const int s = l * a.B + b;
    if (!refinable(a, counts, s)) continue;
    const uint32_t prefix = a.state[3 * s];
    for (int i = threadIdx.x; i < kRefineBins; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    const Level& lv = a.lv[l];
    const uint32_t end = min(start + kRefineTile, lv.n);
    for (uint32_t e = start + threadIdx.x; e < end; e += blockDim.x) {
      uint64_t c;
      if (!raw_candidate<T>(a, lv, b, e, c)) continue;
      const uint32_t key = static_cast<uint32_t>(c >> 32);
      if ((key & mask) == prefix) atomicAdd(&hist[(key >> shift) & (kRefineBins - 1)], 1u);
    }
    __syncthreads();
    uint32_t* out = a.hist + (static_cast<size_t>(p) * segments + s) * kRefineBins;
    for (int i = threadIdx.x; i < kRefineBins; i += blockDim.x)
      if (hist[i] != 0) atomicAdd(&out[i], hist[i]);
    __syncthreads();
  }
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) s_last = atomicAdd(&a.tickets[p], 1u) == gridDim.x - 1;
  __syncthreads();
  if (!s_last) return;
  __threadfence();
  // Last block: for each refinable (level, image), the digit holding its k-th key.
  for (int s = 0; s < segments; ++s) {
    if (!refinable(a, counts, s)) continue;
    const volatile uint32_t* h = a.hist + (static_cast<size_t>(p) * segments + s) * kRefineBins;
    for (int i = threadIdx.x; i < kRefineBins; i += blockDim.x) hist[i] = h[i];
    __syncthreads();
    if (threadIdx.x < 32) {
      uint32_t* st = a.state + 3 * s;
      const uint32_t k = p == 0 ? static_cast<uint32_t>(a.top_n) : st[1];
      int d;
      uint32_t above;
      if (kth_digit<kRefineBins>(hist, k, d, above)) {
        st[0] |= static_cast<uint32_t>(d) << shift;
        st[1] = k - above;
      }
    }
    __syncthreads();
  }
}

// After the last pass the prefix is the exact key of the top_n-th candidate: every candidate with a key at
// least that goes to the buffer (state[3s + 2] counts them; the select pass uses them if they fit).
template <typename T>
__global__ __launch_bounds__(kRefineThreads) void gather_kernel(const __grid_constant__ Args a,
                                                                const uint32_t* __restrict__ counts,
                                                                uint64_t* __restrict__ cand) {
  if (*a.overflow == 0) return;
  for (uint32_t t = blockIdx.x;; t += gridDim.x) {
    int l, b;
    uint32_t start;
    if (!refine_tile(a, t, l, b, start)) break;
    const int s = l * a.B + b;
    if (!refinable(a, counts, s)) continue;
    const uint32_t kth = a.state[3 * s];
    const Level& lv = a.lv[l];
    const uint32_t end = min(start + kRefineTile, lv.n);
    uint64_t* out = cand + static_cast<size_t>(s) * a.cap;
    for (uint32_t base = start; base < end; base += blockDim.x) {  // whole warps: warp_reserve
      const uint32_t e = base + threadIdx.x;
      uint64_t c = 0;
      const bool m = e < end && raw_candidate<T>(a, lv, b, e, c) && static_cast<uint32_t>(c >> 32) >= kth;
      const uint32_t pos = warp_reserve(kFullMask, m, &a.state[3 * s + 2]);
      if (m && pos < a.cap) out[pos] = c;
    }
  }
}

// One block per (level, image): exact top_n by radix select on the unique keys, bitonic sort, output.
template <typename T>
__global__ __launch_bounds__(kSelectThreads) void select_kernel(const __grid_constant__ Args a,
                                                                const uint32_t* __restrict__ counts,
                                                                const uint64_t* __restrict__ cand) {
  extern __shared__ uint64_t smem[];  // sel_slots selected keys, then kStage staged candidates
  uint64_t* sel = smem;
  uint64_t* stage = smem + a.sel_slots;
  __shared__ uint32_t hist[256];
  __shared__ uint32_t s_count, s_above;
  __shared__ int s_digit;

  const int s = blockIdx.x;
  const int l = s / a.B, b = s % a.B;
  const Level& lv = a.lv[l];
  const uint32_t n = counts[s];
  // In the buffer: every candidate, or (refined overflow) those at or above the top_n-th key when they fit.
  const bool refine = refinable(a, counts, s);
  const uint32_t refined = refine ? a.state[3 * s + 2] : 0;
  const uint32_t held = n <= a.cap ? n : refined;
  const bool fast = n <= a.cap || (refine && refined <= a.cap);
  const uint32_t M = fast ? held : lv.n;
  const uint32_t need = min(n, static_cast<uint32_t>(a.top_n));
  const uint64_t* buf = cand + static_cast<size_t>(s) * a.cap;
  const bool staged = fast && held <= static_cast<uint32_t>(kStage);
  if (staged) {  // every pass below reads the candidates again: keep them on chip
#pragma unroll 4
    for (uint32_t i = threadIdx.x; i < held; i += blockDim.x) stage[i] = buf[i];
    __syncthreads();
  }
  const uint64_t* src = staged ? stage : buf;
  auto fetch = [&](uint32_t i, uint64_t& c) -> bool {
    if (fast) {
      c = src[i];
      return true;
    }
    return raw_candidate<T>(a, lv, b, i, c);
  };

  uint64_t prefix = 0, pmask = 0;  // selected: (key & pmask) >= prefix
  if ((fast ? held : n) > static_cast<uint32_t>(a.top_n)) {
    uint32_t k = need;  // still to take from keys matching prefix
    for (int shift = 56; shift >= 0; shift -= 8) {
      for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
      __syncthreads();
      for (uint32_t base = 0; base < M; base += blockDim.x) {
        const uint32_t i = base + threadIdx.x;
        uint64_t c = 0;
        const bool m = i < M && fetch(i, c) && (c & pmask) == prefix;
        const unsigned digit = static_cast<unsigned>(c >> shift) & 255u;
        const unsigned active = __ballot_sync(kFullMask, m);
        if (m) {
          const unsigned peers = __match_any_sync(active, digit);
          if (static_cast<int>(threadIdx.x & 31) == __ffs(peers) - 1) atomicAdd(&hist[digit], __popc(peers));
        }
      }
      __syncthreads();
      if (threadIdx.x < 32) {
        int d;
        uint32_t above;
        if (kth_digit<256>(hist, k, d, above)) {
          s_digit = d;
          s_above = above;
        }
      }
      __syncthreads();
      const int d = s_digit;
      k -= s_above;
      prefix |= static_cast<uint64_t>(d) << shift;
      pmask |= static_cast<uint64_t>(0xff) << shift;
      const bool done = hist[d] == k;  // the whole bin is taken: selection decided
      __syncthreads();
      if (done) break;
    }
  }

  if (threadIdx.x == 0) s_count = 0;
  __syncthreads();
  for (uint32_t base = 0; base < M; base += blockDim.x) {
    const uint32_t i = base + threadIdx.x;
    uint64_t c = 0;
    const bool m = i < M && fetch(i, c) && (c & pmask) >= prefix;
    const uint32_t pos = warp_reserve(kFullMask, m, &s_count);
    if (m && pos < need) sel[pos] = c;
  }
  __syncthreads();
  const int P = pow2_at_least(need);
  for (int i = need + threadIdx.x; i < P; i += blockDim.x) sel[i] = 0;
  __syncthreads();
  block_bitonic_sort_desc(sel, P);

  const int64_t row = static_cast<int64_t>(b) * a.L * a.top_n + static_cast<int64_t>(l) * a.top_n;
  for (int r = threadIdx.x; r < a.top_n; r += blockDim.x) {
    const int64_t slot = row + r;
    if (static_cast<uint32_t>(r) < need) {
      write_candidate(a, lv, b, sel[r], slot);
    } else {
      a.scores[slot] = 0.0f;
#pragma unroll
      for (int q = 0; q < 4; ++q) a.boxes[slot * 4 + q] = 0.0f;
      store_int(a.classes, slot, a.classes_type, -1);
    }
  }
}

template <typename T>
int64_t launch(const Args& args, int filter_blocks, uint32_t* counts, uint64_t* cand, cudaStream_t stream) {
  filter_kernel<T><<<filter_blocks, kFilterThreads, 0, stream>>>(args, counts, cand);
  const int refine_blocks = args.rtiles < kRefineMaxBlocks ? static_cast<int>(args.rtiles) : kRefineMaxBlocks;
  for (int p = 0; p < 3; ++p) refine_kernel<T><<<refine_blocks, kRefineThreads, 0, stream>>>(args, counts, p);
  gather_kernel<T><<<refine_blocks, kRefineThreads, 0, stream>>>(args, counts, cand);
  const size_t smem = (static_cast<size_t>(args.sel_slots) + kStage) * sizeof(uint64_t);
  static int configured[64] = {};
  const cudaError_t e = raise_smem_limit(select_kernel<T>, smem, configured);
  if (e != cudaSuccess) return status_of(e);
  select_kernel<T><<<args.L * args.B, kSelectThreads, smem, stream>>>(args, counts, cand);
  return status_of(cudaGetLastError());
}

bool valid_dtype(rf_dtype t) { return t == RF_FLOAT32 || t == RF_FLOAT16 || t == RF_BFLOAT16; }
bool valid_itype(rf_itype t) { return t == RF_INT32 || t == RF_INT64; }

}  // namespace
}  // namespace rf

extern "C" int64_t rf_decode(const rf_decode_params* p, void* workspace, size_t workspace_bytes,
                             cudaStream_t stream) {
  using namespace rf;
  if (p == nullptr || p->batch < 1 || p->num_levels < 1 || p->num_levels > RF_DECODE_MAX_LEVELS ||
      p->num_anchors < 1 || p->num_classes < 1 || p->top_n < 1 || p->top_n > RF_DECODE_MAX_TOP_N ||
      !(p->score_thresh >= 0.0f && p->score_thresh < 1.0f) || !valid_dtype(p->dtype) ||
      !valid_dtype(p->box_dtype) || !valid_itype(p->classes_type) ||
      (p->sizes != nullptr && !valid_itype(p->sizes_type)))
    return RF_ERROR_INVALID_ARGUMENT;
  Args a{};
  a.L = p->num_levels;
  a.B = p->batch;
  a.A = static_cast<uint32_t>(p->num_anchors);
  a.C = static_cast<uint32_t>(p->num_classes);
  const int64_t channels = static_cast<int64_t>(p->num_anchors) * p->num_classes;
  int64_t max_n = 0, blocks = 0, rtiles = 0;
  for (int l = 0; l < a.L; ++l) {
    const rf_decode_level& s = p->levels[l];
    Level& d = a.lv[l];
    const int64_t n = s.height * s.width * channels;
    if (s.height < 1 || s.width < 1 || n >= (int64_t{1} << 31)) return RF_ERROR_INVALID_ARGUMENT;
    d.cls = s.cls;
    d.box = s.box;
    d.anchors = s.anchors;
    d.H = static_cast<uint32_t>(s.height);
    d.W = static_cast<uint32_t>(s.width);
    for (int k = 0; k < 4; ++k) {
      d.cs[k] = s.cls_strides[k];
      d.bs[k] = s.box_strides[k];
    }
    d.n = static_cast<uint32_t>(n);
    d.blocks = static_cast<uint32_t>((n + kFilterTile - 1) / kFilterTile);
    d.first_block = static_cast<uint32_t>(blocks);
    d.channels_last = s.cls_strides[1] == 1 && channels > 1;
    d.dense = d.channels_last ? (s.cls_strides[3] == channels && s.cls_strides[2] == s.width * channels)
                              : (s.cls_strides[3] == 1 && s.cls_strides[2] == s.width &&
                                 s.cls_strides[1] == s.height * s.width);
    const int64_t elem = p->dtype == RF_FLOAT32 ? 4 : 2;
    d.vec = d.dense && reinterpret_cast<uintptr_t>(s.cls) % 16 == 0 && (s.cls_strides[0] * elem) % 16 == 0 &&
            (n * elem) % 16 == 0;
    blocks += static_cast<int64_t>(d.blocks) * p->batch;
    d.rtiles = static_cast<uint32_t>((n + kRefineTile - 1) / kRefineTile);
    d.first_rtile = static_cast<uint32_t>(rtiles);
    rtiles += static_cast<int64_t>(d.rtiles) * p->batch;
    if (n > max_n) max_n = n;
  }
  if (blocks >= (int64_t{1} << 31)) return RF_ERROR_INVALID_ARGUMENT;
  const int64_t cap = p->capacity > 0 ? p->capacity : kDefaultCapacity;
  a.cap = static_cast<uint32_t>(cap < max_n ? cap : max_n);
  const size_t segments = static_cast<size_t>(a.L) * a.B;
  // Zeroed each call: counts, the overflow flag and the refinement's tickets, state and histograms.
  const size_t counts_bytes =
      align_up((segments + 4 + 3 * segments + 3 * segments * kRefineBins) * sizeof(uint32_t));
  const size_t bytes = counts_bytes + align_up(segments * a.cap * sizeof(uint64_t));
  if (workspace == nullptr) return static_cast<int64_t>(bytes);
  if (workspace_bytes < bytes) return RF_ERROR_WORKSPACE_TOO_SMALL;
  if (p->scores == nullptr || p->boxes == nullptr || p->classes == nullptr) return RF_ERROR_INVALID_ARGUMENT;
  for (int l = 0; l < a.L; ++l)
    if (a.lv[l].cls == nullptr || a.lv[l].box == nullptr || a.lv[l].anchors == nullptr)
      return RF_ERROR_INVALID_ARGUMENT;

  a.box_dtype = p->box_dtype;
  a.sizes = p->sizes;
  a.sizes_type = p->sizes_type;
  a.thresh = p->score_thresh;
  // Logits at or below logit_lo cannot pass sigmoid(v) > thresh: skip the exp for them.
  a.logit_lo = p->score_thresh > 0.0f
                   ? static_cast<float>(log(p->score_thresh / (1.0 - p->score_thresh))) - 1e-3f
                   : -INFINITY;
  a.top_n = p->top_n;
  a.sel_slots = next_pow2(p->top_n);
  a.scores = p->scores;
  a.boxes = p->boxes;
  a.classes = p->classes;
  a.classes_type = p->classes_type;

  uint32_t* counts = static_cast<uint32_t*>(workspace);
  a.overflow = counts + segments;
  a.tickets = a.overflow + 1;
  a.state = a.tickets + 3;
  a.hist = a.state + 3 * segments;
  a.rtiles = static_cast<uint32_t>(rtiles);
  uint64_t* cand = reinterpret_cast<uint64_t*>(static_cast<char*>(workspace) + counts_bytes);
  const cudaError_t e = cudaMemsetAsync(counts, 0, counts_bytes, stream);
  if (e != cudaSuccess) return status_of(e);
  switch (p->dtype) {
    case RF_FLOAT16: return launch<__half>(a, static_cast<int>(blocks), counts, cand, stream);
    case RF_BFLOAT16: return launch<__nv_bfloat16>(a, static_cast<int>(blocks), counts, cand, stream);
    default: return launch<float>(a, static_cast<int>(blocks), counts, cand, stream);
  }
}

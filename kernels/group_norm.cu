// GroupNorm of channels-last activations (see group_norm.h for the contract).
#include "group_norm.h"

#include "common.cuh"

namespace {

constexpr int kThreadsX = 64;  // channels per step: 128 bytes of bf16/fp16 per warp pair, coalesced
constexpr int kThreadsY = 4;   // pixel rows in flight per block
constexpr int kMaxChannels = 4096;  // the coefficient kernel's shared memory: 2 * c + 2 * g floats
constexpr int kCoefThreads = 256;

int64_t blocks_per_image(int64_t p) { return (p + RF_GN_ROWS - 1) / RF_GN_ROWS; }

// W consecutive channels of one pixel as floats (W = 2: one 4- or 8-byte load; needs even c and
// 2-element-aligned pointers, which the launcher checks).
template <typename T, int W>
struct Lanes {
  float v[W];
  __device__ __forceinline__ void load(const T* p) {
#pragma unroll
    for (int i = 0; i < W; ++i) v[i] = rf::to_float(p[i]);
  }
  __device__ __forceinline__ static void store(T* p, const float* v) {
#pragma unroll
    for (int i = 0; i < W; ++i) p[i] = rf::from_float<T>(v[i]);
  }
};
template <>
__device__ __forceinline__ void Lanes<__nv_bfloat16, 2>::load(const __nv_bfloat16* p) {
  const float2 f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(p));
  v[0] = f.x;
  v[1] = f.y;
}
template <>
__device__ __forceinline__ void Lanes<__nv_bfloat16, 2>::store(__nv_bfloat16* p, const float* v) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v[0], v[1]);
}
template <>
__device__ __forceinline__ void Lanes<__half, 2>::load(const __half* p) {
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(p));
  v[0] = f.x;
  v[1] = f.y;
}
template <>
__device__ __forceinline__ void Lanes<__half, 2>::store(__half* p, const float* v) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(v[0], v[1]);
}
template <>
__device__ __forceinline__ void Lanes<float, 2>::load(const float* p) {
  const float2 f = *reinterpret_cast<const float2*>(p);
  v[0] = f.x;
  v[1] = f.y;
}
template <>
__device__ __forceinline__ void Lanes<float, 2>::store(float* p, const float* v) {
  *reinterpret_cast<float2*>(p) = make_float2(v[0], v[1]);
}

// Per (image, block of RF_GN_ROWS pixels, channel): sum of a and of a*b (b == nullptr: a*a).
// partial layout: [2][n][blocks][c]. Threads: x along channels (W each), y along pixels.
template <typename T, int W>
__global__ void partial_sums(const T* __restrict__ a, const T* __restrict__ b, int64_t p, int64_t c,
                             float* __restrict__ partial, int64_t blocks, int64_t n) {
  __shared__ float s1[kThreadsY][kThreadsX * W];
  __shared__ float s2[kThreadsY][kThreadsX * W];
  const int64_t image = blockIdx.y, blk = blockIdx.x;
  const int64_t row0 = blk * RF_GN_ROWS, row1 = min(row0 + RF_GN_ROWS, p);
  const T* a_img = a + image * p * c;
  const T* b_img = b ? b + image * p * c : nullptr;
  for (int64_t c0 = 0; c0 < c; c0 += kThreadsX * W) {
    const int64_t ch = c0 + threadIdx.x * W;
    float acc1[W] = {}, acc2[W] = {};
    if (ch < c) {
#pragma unroll 4
      for (int64_t r = row0 + threadIdx.y; r < row1; r += kThreadsY) {
        Lanes<T, W> va, vb;
        va.load(a_img + r * c + ch);
        if (b_img) vb.load(b_img + r * c + ch);
        else vb = va;
#pragma unroll
        for (int i = 0; i < W; ++i) {
          acc1[i] += va.v[i];
          acc2[i] += va.v[i] * vb.v[i];
        }
      }
    }
#pragma unroll
    for (int i = 0; i < W; ++i) {
      s1[threadIdx.y][threadIdx.x * W + i] = acc1[i];
      s2[threadIdx.y][threadIdx.x * W + i] = acc2[i];
    }
    __syncthreads();
    if (threadIdx.y == 0 && ch < c) {
#pragma unroll
      for (int i = 0; i < W; ++i) {
        float t1 = 0.f, t2 = 0.f;
#pragma unroll
        for (int k = 0; k < kThreadsY; ++k) {
          t1 += s1[k][threadIdx.x * W + i];
          t2 += s2[k][threadIdx.x * W + i];
        }
        partial[(image * blocks + blk) * c + ch + i] = t1;
        partial[((n + image) * blocks + blk) * c + ch + i] = t2;
      }
    }
    __syncthreads();
  }
}

// Channel sums from the partials, in a fixed order: sums[k][image][c] = sum over blocks of partial[k][image][.][c].
// A block per (image, 64 channels); its 4 thread rows split the partials.
__global__ void reduce_partials(const float* __restrict__ partial, int64_t blocks, int64_t n, int64_t c,
                                float* __restrict__ sums) {
  __shared__ float s1[kThreadsY][kThreadsX];
  __shared__ float s2[kThreadsY][kThreadsX];
  const int64_t image = blockIdx.y, ch = blockIdx.x * static_cast<int64_t>(kThreadsX) + threadIdx.x;
  float t1 = 0.f, t2 = 0.f;
  if (ch < c) {
    for (int64_t k = threadIdx.y; k < blocks; k += kThreadsY) {
      t1 += partial[(image * blocks + k) * c + ch];
      t2 += partial[((n + image) * blocks + k) * c + ch];
    }
  }
  s1[threadIdx.y][threadIdx.x] = t1;
  s2[threadIdx.y][threadIdx.x] = t2;
  __syncthreads();
  if (threadIdx.y == 0 && ch < c) {
    float a = 0.f, b = 0.f;
#pragma unroll
    for (int k = 0; k < kThreadsY; ++k) {
      a += s1[k][threadIdx.x];
      b += s2[k][threadIdx.x];
    }
    sums[image * c + ch] = a;
    sums[(n + image) * c + ch] = b;
  }
}

// One block per image: group statistics from the channel sums, then per-channel values.
// forward: coef_a = rstd * w, coef_c = b - mean * rstd * w; writes mean, rstd (n, g).
// backward: coef_a = rstd * w, coef_b = -rstd^2 m2, coef_c = rstd (rstd m2 mean - m1), and the
// per-(image, channel) dweight / dbias terms for param_grads.
template <bool kBackward>
__global__ void coefficients(const float* __restrict__ sums, int64_t n, int64_t p, int64_t c,
                             int g, float eps, const float* __restrict__ weight, const float* __restrict__ bias,
                             float* __restrict__ mean, float* __restrict__ rstd, float* __restrict__ coef,
                             float* __restrict__ terms) {
  extern __shared__ float sh[];  // [2][c] channel sums, then [2][g] group values
  float* sum1 = sh;
  float* sum2 = sh + c;
  float* gv1 = sh + 2 * c;
  float* gv2 = gv1 + g;
  const int64_t image = blockIdx.x;
  for (int64_t ch = threadIdx.x; ch < c; ch += blockDim.x) {
    sum1[ch] = sums[image * c + ch];
    sum2[ch] = sums[(n + image) * c + ch];
  }
  __syncthreads();
  const int64_t cg = c / g;
  const float count = static_cast<float>(cg * p);
  for (int gi = threadIdx.x; gi < g; gi += blockDim.x) {
    if (!kBackward) {
      float t1 = 0.f, t2 = 0.f;
      for (int64_t k = 0; k < cg; ++k) {
        t1 += sum1[gi * cg + k];
        t2 += sum2[gi * cg + k];
      }
      const float m = t1 / count;
      const float var = fmaxf(t2 / count - m * m, 0.f);
      const float r = rsqrtf(var + eps);
      mean[image * g + gi] = m;
      rstd[image * g + gi] = r;
      gv1[gi] = m;
      gv2[gi] = r;
    } else {
      const float m = mean[image * g + gi], r = rstd[image * g + gi];
      float m1 = 0.f, m2 = 0.f;
      for (int64_t k = 0; k < cg; ++k) {
        const int64_t ch = gi * cg + k;
        const float w = weight ? weight[ch] : 1.f;
        m1 += w * sum1[ch];                           // sum dy
        m2 += w * (sum2[ch] - m * sum1[ch]) * r;      // sum dy * xhat
      }
      m1 /= count;
      m2 /= count;
      gv1[gi] = -r * r * m2;                          // coefficient of x
      gv2[gi] = r * (r * m2 * m - m1);                // constant
    }
  }
  __syncthreads();
  for (int64_t ch = threadIdx.x; ch < c; ch += blockDim.x) {
    const int64_t gi = ch / cg;
    const float w = weight ? weight[ch] : 1.f;
    float* out = coef + image * 3 * c;
    if (!kBackward) {
      const float r = gv2[gi], m = gv1[gi];
      out[ch] = r * w;
      out[c + ch] = 0.f;
      out[2 * c + ch] = (bias ? bias[ch] : 0.f) - m * r * w;
    } else {
      const float r = rstd[image * g + gi], m = mean[image * g + gi];
      out[ch] = r * w;
      out[c + ch] = gv1[gi];
      out[2 * c + ch] = gv2[gi];
      terms[image * 2 * c + ch] = (sum2[ch] - m * sum1[ch]) * r;  // dweight term
      terms[image * 2 * c + c + ch] = sum1[ch];                    // dbias term
    }
  }
}

// dweight[c] = sum_n terms[n][0][c], dbias[c] = sum_n terms[n][1][c] (fixed order).
__global__ void param_grads(const float* __restrict__ terms, int64_t n, int64_t c, float* __restrict__ dweight,
                            float* __restrict__ dbias) {
  const int64_t ch = blockIdx.x * blockDim.x + threadIdx.x;
  if (ch >= c) return;
  float dw = 0.f, db = 0.f;
  for (int64_t i = 0; i < n; ++i) {
    dw += terms[i * 2 * c + ch];
    db += terms[i * 2 * c + c + ch];
  }
  if (dweight) dweight[ch] = dw;
  if (dbias) dbias[ch] = db;
}

// out = a * coef_a[n,c] + x * coef_b[n,c] + coef_c[n,c]  (forward: a = x, no second input). Same grid as
// partial_sums: a block per (image, RF_GN_ROWS pixels), threads along channels (no per-element division).
template <typename T, int W, bool kTwoInputs>
__global__ void apply(const T* __restrict__ a, const T* __restrict__ x, const float* __restrict__ coef,
                      int64_t p, int64_t c, T* __restrict__ out) {
  const int64_t image = blockIdx.y;
  const int64_t row0 = blockIdx.x * static_cast<int64_t>(RF_GN_ROWS), row1 = min(row0 + RF_GN_ROWS, p);
  const float* k = coef + image * 3 * c;
  for (int64_t ch = threadIdx.x * W; ch < c; ch += kThreadsX * W) {
    float ka[W], kb[W], kc[W];
#pragma unroll
    for (int i = 0; i < W; ++i) {
      ka[i] = k[ch + i];
      kb[i] = k[c + ch + i];
      kc[i] = k[2 * c + ch + i];
    }
#pragma unroll 4
    for (int64_t r = row0 + threadIdx.y; r < row1; r += kThreadsY) {
      const int64_t i0 = (image * p + r) * c + ch;
      Lanes<T, W> va, vx;
      va.load(a + i0);
      if (kTwoInputs) vx.load(x + i0);
      float v[W];
#pragma unroll
      for (int i = 0; i < W; ++i) {
        v[i] = va.v[i] * ka[i] + kc[i];
        if (kTwoInputs) v[i] += vx.v[i] * kb[i];
      }
      Lanes<T, W>::store(out + i0, v);
    }
  }
}

struct Workspace {
  float* partial;  // [2][n][blocks][c]
  float* sums;     // [2][n][c]
  float* coef;     // [n][3][c]
  float* terms;    // [n][2][c]
  int64_t blocks;
  size_t bytes;
};

Workspace layout(const rf_group_norm_params* p, void* base) {
  Workspace w{};
  w.blocks = blocks_per_image(p->p);
  const size_t partial = 2 * p->n * w.blocks * p->c, sums = 2 * p->n * p->c, coef = 3 * p->n * p->c;
  const size_t terms = 2 * p->n * p->c;
  w.bytes = (partial + sums + coef + terms) * sizeof(float);
  float* f = static_cast<float*>(base);
  w.partial = f;
  w.sums = f ? f + partial : nullptr;
  w.coef = f ? f + partial + sums : nullptr;
  w.terms = f ? f + partial + sums + coef : nullptr;
  return w;
}

bool valid(const rf_group_norm_params* p) {
  return p && p->n >= 1 && p->p >= 1 && p->c >= 1 && p->c <= kMaxChannels && p->groups >= 1 &&
         p->c % p->groups == 0 && p->n <= 65535 && blocks_per_image(p->p) <= 0x7fffffff;
}

bool aligned(const void* ptr, size_t bytes) { return ptr == nullptr || reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

template <typename T, int W>
int64_t forward_typed(const rf_group_norm_params* p, const void* x, const float* weight, const float* bias, void* y,
                      float* mean, float* rstd, const Workspace& w, cudaStream_t stream) {
  const dim3 block(kThreadsX, kThreadsY), grid(static_cast<unsigned>(w.blocks), static_cast<unsigned>(p->n));
  partial_sums<T, W><<<grid, block, 0, stream>>>(static_cast<const T*>(x), nullptr, p->p, p->c, w.partial,
                                                 w.blocks, p->n);
  reduce_partials<<<dim3(static_cast<unsigned>((p->c + kThreadsX - 1) / kThreadsX), static_cast<unsigned>(p->n)),
                    block, 0, stream>>>(w.partial, w.blocks, p->n, p->c, w.sums);
  const size_t shared = (2 * p->c + 2 * p->groups) * sizeof(float);
  coefficients<false><<<static_cast<unsigned>(p->n), kCoefThreads, shared, stream>>>(
      w.sums, p->n, p->p, p->c, p->groups, p->eps, weight, bias, mean, rstd, w.coef, nullptr);
  apply<T, W, false><<<grid, block, 0, stream>>>(static_cast<const T*>(x), nullptr, w.coef, p->p, p->c,
                                                 static_cast<T*>(y));
  return -static_cast<int64_t>(cudaGetLastError());
}

template <typename T, int W>
int64_t backward_typed(const rf_group_norm_params* p, const void* dy, const void* x, const float* weight,
                       const float* mean, const float* rstd, void* dx, float* dweight, float* dbias,
                       const Workspace& w, cudaStream_t stream) {
  const dim3 block(kThreadsX, kThreadsY), grid(static_cast<unsigned>(w.blocks), static_cast<unsigned>(p->n));
  partial_sums<T, W><<<grid, block, 0, stream>>>(static_cast<const T*>(dy), static_cast<const T*>(x), p->p, p->c,
                                                 w.partial, w.blocks, p->n);
  reduce_partials<<<dim3(static_cast<unsigned>((p->c + kThreadsX - 1) / kThreadsX), static_cast<unsigned>(p->n)),
                    block, 0, stream>>>(w.partial, w.blocks, p->n, p->c, w.sums);
  const size_t shared = (2 * p->c + 2 * p->groups) * sizeof(float);
  coefficients<true><<<static_cast<unsigned>(p->n), kCoefThreads, shared, stream>>>(
      w.sums, p->n, p->p, p->c, p->groups, p->eps, weight, nullptr, const_cast<float*>(mean),
      const_cast<float*>(rstd), w.coef, w.terms);
  if (dweight || dbias) {
    param_grads<<<static_cast<unsigned>((p->c + 255) / 256), 256, 0, stream>>>(w.terms, p->n, p->c, dweight,
                                                                                dbias);
  }
  apply<T, W, true><<<grid, block, 0, stream>>>(static_cast<const T*>(dy), static_cast<const T*>(x), w.coef, p->p,
                                                p->c, static_cast<T*>(dx));
  return -static_cast<int64_t>(cudaGetLastError());
}

}  // namespace

extern "C" int64_t rf_group_norm_forward(const rf_group_norm_params* params, const void* x, const float* weight,
                                         const float* bias, void* y, float* mean, float* rstd, void* workspace,
                                         size_t workspace_bytes, cudaStream_t stream) {
  if (!valid(params)) return RF_ERROR_INVALID_ARGUMENT;
  const Workspace w = layout(params, workspace);
  if (!workspace) return static_cast<int64_t>(w.bytes);
  if (workspace_bytes < w.bytes) return RF_ERROR_WORKSPACE_TOO_SMALL;
  if (!x || !y || !mean || !rstd) return RF_ERROR_INVALID_ARGUMENT;
  const size_t pair = 2 * (params->dtype == RF_FLOAT32 ? 4 : 2);
  const bool vec = params->c % 2 == 0 && aligned(x, pair) && aligned(y, pair);
#define RF_GN_FORWARD(T) \
  (vec ? forward_typed<T, 2>(params, x, weight, bias, y, mean, rstd, w, stream) \
       : forward_typed<T, 1>(params, x, weight, bias, y, mean, rstd, w, stream))
  switch (params->dtype) {
    case RF_FLOAT16: return RF_GN_FORWARD(__half);
    case RF_BFLOAT16: return RF_GN_FORWARD(__nv_bfloat16);
    default: return RF_GN_FORWARD(float);
  }
#undef RF_GN_FORWARD
}

extern "C" int64_t rf_group_norm_backward(const rf_group_norm_params* params, const void* dy, const void* x,
                                          const float* weight, const float* mean, const float* rstd, void* dx,
                                          float* dweight, float* dbias, void* workspace, size_t workspace_bytes,
                                          cudaStream_t stream) {
  if (!valid(params)) return RF_ERROR_INVALID_ARGUMENT;
  const Workspace w = layout(params, workspace);
  if (!workspace) return static_cast<int64_t>(w.bytes);
  if (workspace_bytes < w.bytes) return RF_ERROR_WORKSPACE_TOO_SMALL;
  if (!dy || !x || !mean || !rstd || !dx) return RF_ERROR_INVALID_ARGUMENT;
  const size_t pair = 2 * (params->dtype == RF_FLOAT32 ? 4 : 2);
  const bool vec = params->c % 2 == 0 && aligned(dy, pair) && aligned(x, pair) && aligned(dx, pair);
#define RF_GN_BACKWARD(T) \
  (vec ? backward_typed<T, 2>(params, dy, x, weight, mean, rstd, dx, dweight, dbias, w, stream) \
       : backward_typed<T, 1>(params, dy, x, weight, mean, rstd, dx, dweight, dbias, w, stream))
  switch (params->dtype) {
    case RF_FLOAT16: return RF_GN_BACKWARD(__half);
    case RF_BFLOAT16: return RF_GN_BACKWARD(__nv_bfloat16);
    default: return RF_GN_BACKWARD(float);
  }
#undef RF_GN_BACKWARD
}

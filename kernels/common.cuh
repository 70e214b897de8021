// Device helpers shared by decode.cu, nms.cu and match.cu (internal; not part of the C API).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "types.h"

namespace rf {

constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

// float -> element type, rounding to nearest (the inverse of to_float).
template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Element i of a floating-point array whose type is only known at run time (cold paths).
__device__ __forceinline__ float load_float(const void* p, int64_t i, rf_dtype t) {
  switch (t) {
    case RF_FLOAT16: return __half2float(static_cast<const __half*>(p)[i]);
    case RF_BFLOAT16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ int64_t load_int(const void* p, int64_t i, rf_itype t) {
  return t == RF_INT64 ? static_cast<const int64_t*>(p)[i] : static_cast<const int32_t*>(p)[i];
}

__device__ __forceinline__ void store_int(void* p, int64_t i, rf_itype t, int64_t v) {
  if (t == RF_INT64) static_cast<int64_t*>(p)[i] = v;
  else static_cast<int32_t*>(p)[i] = static_cast<int32_t>(v);
}

// Order-preserving map float -> uint32 (larger float, larger key; -0 just below +0).
__device__ __forceinline__ uint32_t float_key(float v) {
  uint32_t u = __float_as_uint(v);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ float key_float(uint32_t k) {
  return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// Unique 64-bit sort key: larger value first, then lower index. Never 0 for a real entry (index < 2^32-1).
__device__ __forceinline__ uint64_t composite(uint32_t key, uint32_t index) {
  return (static_cast<uint64_t>(key) << 32) | static_cast<uint64_t>(0xffffffffu - index);
}

__device__ __forceinline__ uint32_t composite_index(uint64_t c) {
  return 0xffffffffu - static_cast<uint32_t>(c & 0xffffffffu);
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }

// Sorts a[0, n) descending, n a power of two, with every thread of the block (bitonic network).
// `a` may point to shared or global memory; the caller synchronises before and the function after.
__device__ inline void block_bitonic_sort_desc(uint64_t* a, int n) {
  for (int k = 2; k <= n; k <<= 1) {
    for (int j = k >> 1; j > 0; j >>= 1) {
      for (int t = threadIdx.x; t < (n >> 1); t += blockDim.x) {
        const int i = ((t & ~(j - 1)) << 1) | (t & (j - 1));
        const int l = i + j;
        const uint64_t x = a[i], y = a[l];
        const bool desc = (i & k) == 0;
        if (desc ? (x < y) : (x > y)) {
          a[i] = y;
          a[l] = x;
        }
      }
      __syncthreads();
    }
  }
}

// Adds the lanes of `active` that pass `pred` to *counter (one atomic per warp); returns this lane's
// slot (base + rank among passing lanes). Every lane of `active` must call it.
__device__ __forceinline__ uint32_t warp_reserve(unsigned active, bool pred, uint32_t* counter) {
  const unsigned ballot = __ballot_sync(active, pred);
  const int lane = threadIdx.x & 31;
  uint32_t base = 0;
  const int leader = __ffs(ballot) - 1;
  if (ballot != 0 && lane == leader) base = atomicAdd(counter, static_cast<uint32_t>(__popc(ballot)));
  base = __shfl_sync(active, base, leader < 0 ? 0 : leader);
  return base + __popc(ballot & ((1u << lane) - 1u));
}

// Lets `kernel` use `bytes` (> 48 KB) of dynamic shared memory; sets the attribute once per device
// (`configured` is the call site's per-device record). Not a stream operation: safe during graph capture.
template <typename Kernel>
inline cudaError_t raise_smem_limit(Kernel kernel, size_t bytes, int (&configured)[64]) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  if (device < 64 && configured[device] >= static_cast<int>(bytes)) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
  if (e == cudaSuccess && device < 64) configured[device] = static_cast<int>(bytes);
  return e;
}

inline int next_pow2(int v) {
  int p = 1;
  while (p < v) p <<= 1;
  return p;
}

inline size_t align_up(size_t v, size_t a = 256) { return (v + a - 1) / a * a; }

inline int64_t status_of(cudaError_t e) { return e == cudaSuccess ? 0 : -static_cast<int64_t>(e); }

}  // namespace rf

/* Just enough of the CUDA runtime API for kernels/types.h, so the plugin core's CPU tests compile with g++
 * alone (no CUDA toolkit). Not a CUDA replacement: nothing here launches anything. */
#pragma once
typedef struct CUstream_st* cudaStream_t;
typedef int cudaError_t;
#ifdef __cplusplus
extern "C" {
#endif
const char* cudaGetErrorString(cudaError_t error);
#ifdef __cplusplus
}
#endif

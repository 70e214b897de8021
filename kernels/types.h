/* Shared types of the retinaflow kernels' C API (decode.h, nms.h). Plain C; no PyTorch, no TensorRT.
 *
 * Every entry point follows one convention (ODTK's): called with workspace == NULL it returns the
 * workspace bytes it needs (>= 0) and launches nothing; called with a workspace of at least that size it
 * enqueues its kernels on `stream` and returns 0, or a negative rf_status. It never synchronises with
 * the host and its outputs have fixed sizes, so it can be captured in a CUDA graph.
 */
#pragma once

#include <cuda_runtime_api.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Element type of floating-point inputs. */
typedef enum rf_dtype { RF_FLOAT32 = 0, RF_FLOAT16 = 1, RF_BFLOAT16 = 2 } rf_dtype;

/* Element type of integer inputs/outputs (class indices, image sizes, counts). */
typedef enum rf_itype { RF_INT32 = 0, RF_INT64 = 1 } rf_itype;

/* Negative return values. A CUDA error e is returned as -(int64_t)e (cudaError_t values are < 1000). */
enum {
  RF_ERROR_INVALID_ARGUMENT = -1000,  /* a size, pointer or limit is out of range */
  RF_ERROR_WORKSPACE_TOO_SMALL = -1001
};

/* A one-line description of a value returned by an rf_* function. */
static inline const char* rf_status_string(int64_t status) {
  if (status >= 0) return "success";
  if (status == RF_ERROR_INVALID_ARGUMENT) return "invalid argument (size, pointer or limit out of range)";
  if (status == RF_ERROR_WORKSPACE_TOO_SMALL) return "workspace smaller than the size the query returned";
  return cudaGetErrorString((cudaError_t)(-status));
}

#ifdef __cplusplus
}
#endif

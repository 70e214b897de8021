// Stand-ins for rf_decode / rf_nms that record the parameters the plugin core builds, for the CPU test.
// The query returns a size derived from the parameters, so the test can tell they arrived intact.
#include "c_api_stub.h"

rf_decode_params g_last_decode{};
rf_nms_params g_last_nms{};
int g_decode_calls = 0;
int g_nms_calls = 0;

extern "C" const char* cudaGetErrorString(cudaError_t) { return "stub CUDA error"; }

extern "C" int64_t rf_decode(const rf_decode_params* p, void* workspace, size_t workspace_bytes, cudaStream_t) {
  g_last_decode = *p;
  ++g_decode_calls;
  if (p->top_n > RF_DECODE_MAX_TOP_N) return RF_ERROR_INVALID_ARGUMENT;
  const int64_t bytes = 1000 * static_cast<int64_t>(p->batch) + 10 * p->num_levels + p->num_classes;
  if (workspace == nullptr) return bytes;
  return static_cast<int64_t>(workspace_bytes) < bytes ? RF_ERROR_WORKSPACE_TOO_SMALL : 0;
}

extern "C" int64_t rf_nms(const rf_nms_params* p, void* workspace, size_t, cudaStream_t) {
  g_last_nms = *p;
  ++g_nms_calls;
  if (workspace == nullptr) return 256 + static_cast<int64_t>(p->batch) * p->count;
  return 0;
}

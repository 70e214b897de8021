// The TensorRT plugins' contract in plain C++ (no TensorRT): names, fields and their (de)serialisation,
// the output-shape and output-type rules, the supported type combinations, input checks, and the
// workspace query / launch through the kernels' C API (decode.h, nms.h). plugins.cpp adapts this to
// IPluginV3; tests compile it with g++ alone (tests/kernels/tensorrt).
//
// retinaflow::Decode v1, for L pyramid levels (1 <= L <= RF_DECODE_MAX_LEVELS):
//   inputs  cls_0..cls_{L-1}     (B, A*C, H_l, W_l) float32 | float16 | bfloat16 (one type for all levels)
//           box_0..box_{L-1}     (B, A*4, H_l, W_l) float32 | float16 | bfloat16 (one type for all levels)
//           anchors_0..          (H_l*W_l*A, 4) float32 x1y1x2y2 in input pixels
//           sizes                (B, 2) int32 (height, width) of each unpadded image
//   outputs scores (B, L*top_n) float32, boxes (B, L*top_n, 4) float32, classes (B, L*top_n) int32
//   fields  score_thresh float32 in [0, 1), top_n int32 in 1..RF_DECODE_MAX_TOP_N, capacity int32 (<= 0: default)
// retinaflow::NMS v1:
//   inputs  scores (B, K) float32|float16|bfloat16, boxes (B, K, 4) float32|float16|bfloat16, classes (B, K) int32
//   outputs scores (B, max_det) float32, boxes (B, max_det, 4) float32, classes (B, max_det) int32, counts (B,) int32
//   fields  iou_threshold float32 in [0, 1], max_det int32 >= 1
// Integer tensors are int32 (TensorRT plugins' most portable integer type); semantics are those of the
// PyTorch ops (retinaflow.ops.boxes), which call the same C API.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "decode.h"
#include "nms.h"

namespace rf_trt {

constexpr const char* kNamespace = "retinaflow";
constexpr const char* kVersion = "1";
constexpr const char* kDecodeName = "Decode";
constexpr const char* kNmsName = "NMS";
constexpr int kMaxDims = 8;

// A specific, one-line problem with fields, shapes or types (the adapter logs it and fails the call).
class PluginError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

enum class DType { kFloat32, kFloat16, kBFloat16, kInt32, kInt64, kOther };
enum class FieldType { kFloat32, kInt32 };

struct FieldSpec {
  const char* name;
  FieldType type;
};

// One (name, type, data, length) record, the shape of TensorRT's PluginField without TensorRT.
struct Field {
  const char* name;
  FieldType type;
  const void* data;
  int32_t length;
};

struct DecodeFields {
  float score_thresh = 0.05f;
  int32_t top_n = 1000;
  int32_t capacity = 0;
};

struct NmsFields {
  float iou_threshold = 0.5f;
  int32_t max_det = 100;
};

struct TensorDesc {
  DType type = DType::kFloat32;
  int32_t nb_dims = 0;
  int64_t dims[kMaxDims] = {};
};

// An output dimension is either a constant or a dimension of an input: TensorRT's IExprBuilder
// expressions reduced to what these plugins need.
struct DimRule {
  int32_t input;  // < 0: constant
  int32_t axis;
  int64_t constant;
};

struct ShapeRule {
  int32_t nb_dims;
  DimRule d[3];
};

// Fields, in declaration order (the ONNX node attributes carry exactly these names).
const std::vector<FieldSpec>& decode_field_specs();
const std::vector<FieldSpec>& nms_field_specs();

// Fields from records (missing ones keep their defaults; unknown names, wrong types or lengths and
// out-of-range values throw PluginError). fields_of points into `f`, which must outlive the result.
DecodeFields parse_decode_fields(const Field* fields, int32_t count);
NmsFields parse_nms_fields(const Field* fields, int32_t count);
std::vector<Field> fields_of(const DecodeFields& f);
std::vector<Field> fields_of(const NmsFields& f);
std::string describe(const DecodeFields& f);
std::string describe(const NmsFields& f);

// Tensor names, in TensorRT's input/output order.
int32_t decode_levels(int32_t nb_inputs);  // L from 3L+1 inputs; throws PluginError otherwise
std::vector<std::string> decode_input_names(int32_t levels);
std::vector<std::string> decode_output_names();
std::vector<std::string> nms_input_names();
std::vector<std::string> nms_output_names();
constexpr int32_t kDecodeOutputs = 3;
constexpr int32_t kNmsInputs = 3;
constexpr int32_t kNmsOutputs = 4;

// Output shapes and types.
std::vector<ShapeRule> decode_output_shapes(const DecodeFields& f, int32_t nb_inputs);
std::vector<ShapeRule> nms_output_shapes(const NmsFields& f);
std::vector<int64_t> evaluate(const ShapeRule& rule, const TensorDesc* inputs);
std::vector<DType> decode_output_types(const DType* input_types, int32_t nb_inputs);
std::vector<DType> nms_output_types();

// Whether tensor `pos` (inputs then outputs) may have type types[pos], given types[0..pos) already chosen.
bool decode_supports(int32_t pos, const DType* types, int32_t nb_inputs, int32_t nb_outputs);
bool nms_supports(int32_t pos, const DType* types, int32_t nb_inputs, int32_t nb_outputs);

// Concrete input checks (shapes and types agree with each other); throw PluginError.
void check_decode_inputs(const TensorDesc* inputs, int32_t nb_inputs);
void check_nms_inputs(const TensorDesc* inputs, int32_t nb_inputs);

// Workspace bytes for these (largest) input shapes, through the C API's query (throws on error).
size_t decode_workspace(const DecodeFields& f, const TensorDesc* inputs, int32_t nb_inputs);
size_t nms_workspace(const NmsFields& f, const TensorDesc* inputs, int32_t nb_inputs);

// Launch on `stream` (contiguous tensors); returns the C API's status (0 or negative rf status).
int64_t decode_enqueue(const DecodeFields& f, const TensorDesc* in, int32_t nb_inputs, const void* const* inputs,
                       void* const* outputs, void* workspace, size_t workspace_bytes, cudaStream_t stream);
int64_t nms_enqueue(const NmsFields& f, const TensorDesc* in, int32_t nb_inputs, const void* const* inputs,
                    void* const* outputs, void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace rf_trt

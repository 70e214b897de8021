// Plain-C++ half of the TensorRT plugins (see plugin_core.h). No TensorRT, no CUDA runtime calls of its own:
// everything that touches the GPU goes through rf_decode / rf_nms.
#include "plugin_core.h"

#include <cstring>
#include <sstream>

namespace rf_trt {
namespace {

const Field* find(const Field* fields, int32_t count, const char* name) {
  for (int32_t i = 0; i < count; ++i)
    if (fields[i].name != nullptr && std::strcmp(fields[i].name, name) == 0) return &fields[i];
  return nullptr;
}

void check_known(const Field* fields, int32_t count, const std::vector<FieldSpec>& specs, const char* plugin) {
  for (int32_t i = 0; i < count; ++i) {
    const Field& f = fields[i];
    const FieldSpec* spec = nullptr;
    for (const FieldSpec& s : specs)
      if (f.name != nullptr && std::strcmp(s.name, f.name) == 0) spec = &s;
    if (spec == nullptr)
      throw PluginError(std::string(plugin) + ": unknown field '" + (f.name ? f.name : "(null)") + "'");
    if (f.type != spec->type || f.length != 1 || f.data == nullptr)
      throw PluginError(std::string(plugin) + ": field '" + f.name + "' must be one " +
                        (spec->type == FieldType::kFloat32 ? "float32" : "int32"));
  }
}

template <typename T>
T value(const Field* fields, int32_t count, const char* name, T fallback) {
  const Field* f = find(fields, count, name);
  if (f == nullptr) return fallback;
  T v;
  std::memcpy(&v, f->data, sizeof(T));
  return v;
}

bool is_float(DType t) { return t == DType::kFloat32 || t == DType::kFloat16 || t == DType::kBFloat16; }

rf_dtype to_rf(DType t) {
  switch (t) {
    case DType::kFloat16: return RF_FLOAT16;
    case DType::kBFloat16: return RF_BFLOAT16;
    default: return RF_FLOAT32;
  }
}

// Dimensions may be -1 (unknown at build time): only known values are compared.
bool differ(int64_t a, int64_t b) { return a >= 0 && b >= 0 && a != b; }

void require(bool ok, const std::string& message) {
  if (!ok) throw PluginError(message);
}

std::string dims_str(const TensorDesc& t) {
  std::ostringstream s;
  s << "(";
  for (int32_t i = 0; i < t.nb_dims; ++i) s << (i ? ", " : "") << t.dims[i];
  s << ")";
  return s.str();
}

void contiguous_strides(const TensorDesc& t, int64_t* strides) {
  int64_t s = 1;
  for (int32_t k = t.nb_dims - 1; k >= 0; --k) {
    strides[k] = s;
    s *= t.dims[k];
  }
}

rf_decode_params decode_params(const DecodeFields& f, const TensorDesc* in, int32_t nb_inputs) {
  check_decode_inputs(in, nb_inputs);
  const int32_t levels = decode_levels(nb_inputs);
  rf_decode_params p{};
  p.batch = static_cast<int32_t>(in[0].dims[0]);
  p.num_levels = levels;
  p.num_anchors = static_cast<int32_t>(in[levels].dims[1] / 4);
  p.num_classes = static_cast<int32_t>(in[0].dims[1] / p.num_anchors);
  p.dtype = to_rf(in[0].type);
  p.box_dtype = to_rf(in[levels].type);
  for (int32_t l = 0; l < levels; ++l) {
    rf_decode_level& d = p.levels[l];
    d.height = in[l].dims[2];
    d.width = in[l].dims[3];
    contiguous_strides(in[l], d.cls_strides);
    contiguous_strides(in[levels + l], d.box_strides);
  }
  p.sizes_type = RF_INT32;
  p.score_thresh = f.score_thresh;
  p.top_n = f.top_n;
  p.capacity = f.capacity;
  p.classes_type = RF_INT32;
  return p;
}

rf_nms_params nms_params(const NmsFields& f, const TensorDesc* in, int32_t nb_inputs) {
  check_nms_inputs(in, nb_inputs);
  rf_nms_params p{};
  p.batch = static_cast<int32_t>(in[0].dims[0]);
  p.count = static_cast<int32_t>(in[0].dims[1]);
  p.scores_type = to_rf(in[0].type);
  p.boxes_type = to_rf(in[1].type);
  p.classes_type = RF_INT32;
  p.iou_threshold = f.iou_threshold;
  p.max_det = f.max_det;
  p.out_type = RF_INT32;
  return p;
}

size_t checked_bytes(int64_t bytes, const char* plugin) {
  if (bytes < 0) throw PluginError(std::string(plugin) + " workspace query: " + rf_status_string(bytes));
  return static_cast<size_t>(bytes);
}

}  // namespace

const std::vector<FieldSpec>& decode_field_specs() {
  static const std::vector<FieldSpec> specs{
      {"score_thresh", FieldType::kFloat32}, {"top_n", FieldType::kInt32}, {"capacity", FieldType::kInt32}};
  return specs;
}

const std::vector<FieldSpec>& nms_field_specs() {
  static const std::vector<FieldSpec> specs{{"iou_threshold", FieldType::kFloat32}, {"max_det", FieldType::kInt32}};
  return specs;
}

DecodeFields parse_decode_fields(const Field* fields, int32_t count) {
  check_known(fields, count, decode_field_specs(), kDecodeName);
  DecodeFields f;
  f.score_thresh = value(fields, count, "score_thresh", f.score_thresh);
  f.top_n = value(fields, count, "top_n", f.top_n);
  f.capacity = value(fields, count, "capacity", f.capacity);
  require(f.score_thresh >= 0.0f && f.score_thresh < 1.0f, "Decode: score_thresh must be in [0, 1)");
  require(f.top_n >= 1 && f.top_n <= RF_DECODE_MAX_TOP_N,
          "Decode: top_n must be in 1.." + std::to_string(RF_DECODE_MAX_TOP_N));
  return f;
}

NmsFields parse_nms_fields(const Field* fields, int32_t count) {
  check_known(fields, count, nms_field_specs(), kNmsName);
  NmsFields f;
  f.iou_threshold = value(fields, count, "iou_threshold", f.iou_threshold);
  f.max_det = value(fields, count, "max_det", f.max_det);
  require(f.iou_threshold >= 0.0f && f.iou_threshold <= 1.0f, "NMS: iou_threshold must be in [0, 1]");
  require(f.max_det >= 1, "NMS: max_det must be >= 1");
  return f;
}

std::vector<Field> fields_of(const DecodeFields& f) {
  return {{"score_thresh", FieldType::kFloat32, &f.score_thresh, 1},
          {"top_n", FieldType::kInt32, &f.top_n, 1},
          {"capacity", FieldType::kInt32, &f.capacity, 1}};
}

std::vector<Field> fields_of(const NmsFields& f) {
  return {{"iou_threshold", FieldType::kFloat32, &f.iou_threshold, 1}, {"max_det", FieldType::kInt32, &f.max_det, 1}};
}

std::string describe(const DecodeFields& f) {
  std::ostringstream s;
  s << "score_thresh=" << f.score_thresh << " top_n=" << f.top_n << " capacity=" << f.capacity;
  return s.str();
}

std::string describe(const NmsFields& f) {
  std::ostringstream s;
  s << "iou_threshold=" << f.iou_threshold << " max_det=" << f.max_det;
  return s.str();
}

int32_t decode_levels(int32_t nb_inputs) {
  const int32_t levels = (nb_inputs - 1) / 3;
  require(nb_inputs == 3 * levels + 1 && levels >= 1 && levels <= RF_DECODE_MAX_LEVELS,
          "Decode: expects 3L+1 inputs (L class heads, L box heads, L anchor sets, sizes) with 1 <= L <= " +
              std::to_string(RF_DECODE_MAX_LEVELS) + ", got " + std::to_string(nb_inputs));
  return levels;
}

std::vector<std::string> decode_input_names(int32_t levels) {
  std::vector<std::string> names;
  for (const char* kind : {"cls", "box", "anchors"})
    for (int32_t l = 0; l < levels; ++l) names.push_back(std::string(kind) + "_" + std::to_string(l));
  names.emplace_back("sizes");
  return names;
}

std::vector<std::string> decode_output_names() { return {"scores", "boxes", "classes"}; }
std::vector<std::string> nms_input_names() { return {"scores", "boxes", "classes"}; }
std::vector<std::string> nms_output_names() { return {"scores", "boxes", "classes", "counts"}; }

std::vector<ShapeRule> decode_output_shapes(const DecodeFields& f, int32_t nb_inputs) {
  const int64_t slots = static_cast<int64_t>(decode_levels(nb_inputs)) * f.top_n;
  const DimRule batch{0, 0, 0}, k{-1, 0, slots}, four{-1, 0, 4};
  return {{2, {batch, k, {}}}, {3, {batch, k, four}}, {2, {batch, k, {}}}};
}

std::vector<ShapeRule> nms_output_shapes(const NmsFields& f) {
  const DimRule batch{0, 0, 0}, d{-1, 0, f.max_det}, four{-1, 0, 4};
  return {{2, {batch, d, {}}}, {3, {batch, d, four}}, {2, {batch, d, {}}}, {1, {batch, {}, {}}}};
}

std::vector<int64_t> evaluate(const ShapeRule& rule, const TensorDesc* inputs) {
  std::vector<int64_t> dims;
  for (int32_t i = 0; i < rule.nb_dims; ++i) {
    const DimRule& r = rule.d[i];
    dims.push_back(r.input < 0 ? r.constant : inputs[r.input].dims[r.axis]);
  }
  return dims;
}

std::vector<DType> decode_output_types(const DType* /*input_types*/, int32_t nb_inputs) {
  decode_levels(nb_inputs);
  return {DType::kFloat32, DType::kFloat32, DType::kInt32};
}

std::vector<DType> nms_output_types() { return {DType::kFloat32, DType::kFloat32, DType::kInt32, DType::kInt32}; }

bool decode_supports(int32_t pos, const DType* types, int32_t nb_inputs, int32_t nb_outputs) {
  const int32_t levels = (nb_inputs - 1) / 3;
  if (nb_inputs != 3 * levels + 1 || levels < 1 || nb_outputs != kDecodeOutputs || pos < 0 ||
      pos >= nb_inputs + nb_outputs)
    return false;
  const DType t = types[pos];
  if (pos < levels) return is_float(t) && (pos == 0 || t == types[0]);
  if (pos < 2 * levels) return is_float(t) && (pos == levels || t == types[levels]);
  if (pos < 3 * levels) return t == DType::kFloat32;
  if (pos == 3 * levels) return t == DType::kInt32;
  return t == decode_output_types(types, nb_inputs)[pos - nb_inputs];
}

bool nms_supports(int32_t pos, const DType* types, int32_t nb_inputs, int32_t nb_outputs) {
  if (nb_inputs != kNmsInputs || nb_outputs != kNmsOutputs || pos < 0 || pos >= nb_inputs + nb_outputs) return false;
  const DType t = types[pos];
  if (pos < 2) return is_float(t);
  if (pos == 2) return t == DType::kInt32;
  return t == nms_output_types()[pos - nb_inputs];
}

void check_decode_inputs(const TensorDesc* in, int32_t nb_inputs) {
  const int32_t levels = decode_levels(nb_inputs);
  const TensorDesc &c0 = in[0], &b0 = in[levels], &sizes = in[3 * levels];
  require(c0.nb_dims == 4 && b0.nb_dims == 4, "Decode: heads must be (B, A*K, H, W)");
  require(b0.dims[1] >= 4 && b0.dims[1] % 4 == 0, "Decode: box head channels must be A*4, got " + dims_str(b0));
  const int64_t anchors = b0.dims[1] / 4;
  require(c0.dims[1] >= anchors && c0.dims[1] % anchors == 0,
          "Decode: class head channels must be A*C with A = " + std::to_string(anchors) + ", got " + dims_str(c0));
  for (int32_t l = 0; l < levels; ++l) {
    const TensorDesc &c = in[l], &b = in[levels + l], &a = in[2 * levels + l];
    const std::string lv = "Decode level " + std::to_string(l) + ": ";
    require(c.nb_dims == 4 && b.nb_dims == 4, lv + "heads must be (B, A*K, H, W)");
    require(!differ(c.dims[0], c0.dims[0]) && !differ(b.dims[0], c0.dims[0]), lv + "batch differs from level 0");
    require(c.dims[1] == c0.dims[1] && b.dims[1] == b0.dims[1], lv + "channels differ from level 0");
    require(c.dims[2] == b.dims[2] && c.dims[3] == b.dims[3],
            lv + "class head " + dims_str(c) + " and box head " + dims_str(b) + " differ in size");
    require(a.nb_dims == 2 && a.dims[1] == 4 && a.dims[0] == c.dims[2] * c.dims[3] * anchors,
            lv + "anchors must be (H*W*A, 4), got " + dims_str(a));
  }
  require(sizes.nb_dims == 2 && sizes.dims[1] == 2 && !differ(sizes.dims[0], c0.dims[0]),
          "Decode: sizes must be (B, 2), got " + dims_str(sizes));
}

void check_nms_inputs(const TensorDesc* in, int32_t nb_inputs) {
  require(nb_inputs == kNmsInputs, "NMS: expects 3 inputs (scores, boxes, classes)");
  const TensorDesc &s = in[0], &b = in[1], &c = in[2];
  require(s.nb_dims == 2 && b.nb_dims == 3 && b.dims[2] == 4 && c.nb_dims == 2 && b.dims[1] == s.dims[1] &&
              c.dims[1] == s.dims[1] && !differ(b.dims[0], s.dims[0]) && !differ(c.dims[0], s.dims[0]),
          "NMS: needs scores (B, K), boxes (B, K, 4), classes (B, K); got " + dims_str(s) + ", " + dims_str(b) +
              ", " + dims_str(c));
}

size_t decode_workspace(const DecodeFields& f, const TensorDesc* inputs, int32_t nb_inputs) {
  const rf_decode_params p = decode_params(f, inputs, nb_inputs);
  return checked_bytes(rf_decode(&p, nullptr, 0, nullptr), kDecodeName);
}

size_t nms_workspace(const NmsFields& f, const TensorDesc* inputs, int32_t nb_inputs) {
  const rf_nms_params p = nms_params(f, inputs, nb_inputs);
  return checked_bytes(rf_nms(&p, nullptr, 0, nullptr), kNmsName);
}

int64_t decode_enqueue(const DecodeFields& f, const TensorDesc* in, int32_t nb_inputs, const void* const* inputs,
                       void* const* outputs, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  rf_decode_params p = decode_params(f, in, nb_inputs);
  const int32_t levels = p.num_levels;
  for (int32_t l = 0; l < levels; ++l) {
    p.levels[l].cls = inputs[l];
    p.levels[l].box = inputs[levels + l];
    p.levels[l].anchors = static_cast<const float*>(inputs[2 * levels + l]);
  }
  p.sizes = inputs[3 * levels];
  p.scores = static_cast<float*>(outputs[0]);
  p.boxes = static_cast<float*>(outputs[1]);
  p.classes = outputs[2];
  return rf_decode(&p, workspace, workspace_bytes, stream);
}

int64_t nms_enqueue(const NmsFields& f, const TensorDesc* in, int32_t nb_inputs, const void* const* inputs,
                    void* const* outputs, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  rf_nms_params p = nms_params(f, in, nb_inputs);
  p.scores = inputs[0];
  p.boxes = inputs[1];
  p.classes = inputs[2];
  p.out_scores = static_cast<float*>(outputs[0]);
  p.out_boxes = static_cast<float*>(outputs[1]);
  p.out_classes = outputs[2];
  p.out_counts = outputs[3];
  return rf_nms(&p, workspace, workspace_bytes, stream);
}

}  // namespace rf_trt

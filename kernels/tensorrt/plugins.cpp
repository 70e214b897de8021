// TensorRT IPluginV3 adapters of retinaflow::Decode and retinaflow::NMS (version 1): thin glue over
// plugin_core (fields, shapes, types, checks, workspace, launch), which calls the kernels' C API.
//
// Written to the documented TensorRT 10 / 11 plugin API: IPluginV3 with the IPluginV3OneCore,
// IPluginV3OneBuild and IPluginV3OneRuntime capabilities and an IPluginCreatorV3One creator each, registered
// with IPluginRegistry::registerCreator(IPluginCreatorInterface&, namespace) when the library is loaded
// (a "static" plugin library: Python loads it with ctypes, trtexec with --staticPlugins). Fields are
// serialised by TensorRT itself (getFieldsToSerialize -> createPlugin(..., TensorRTPhase::kRUNTIME)).
// TensorRT 10 vs 11, as handled here: only IPluginV3 is used (11 removed IPluginV2*); no INT8 scales or
// calibrator hooks are read (11 removed them: precision comes from the strongly typed graph, and these
// plugins take float32/float16/bfloat16 as the graph gives them); dimensions are 64-bit (Dims64, 10+).
// Build: python -m retinaflow.export.trt_plugins (needs NvInfer.h and libnvinfer: see dockerfiles/export.Dockerfile).
#include <NvInfer.h>
#include <NvInferRuntime.h>

#include <cstdio>
#include <exception>
#include <memory>
#include <string>
#include <vector>

#include "plugin_core.h"

namespace {

using namespace nvinfer1;

rf_trt::DType core_type(DataType t) {
  switch (t) {
    case DataType::kFLOAT: return rf_trt::DType::kFloat32;
    case DataType::kHALF: return rf_trt::DType::kFloat16;
    case DataType::kBF16: return rf_trt::DType::kBFloat16;
    case DataType::kINT32: return rf_trt::DType::kInt32;
    case DataType::kINT64: return rf_trt::DType::kInt64;
    default: return rf_trt::DType::kOther;
  }
}

DataType trt_type(rf_trt::DType t) {
  switch (t) {
    case rf_trt::DType::kFloat16: return DataType::kHALF;
    case rf_trt::DType::kBFloat16: return DataType::kBF16;
    case rf_trt::DType::kInt32: return DataType::kINT32;
    case rf_trt::DType::kInt64: return DataType::kINT64;
    default: return DataType::kFLOAT;
  }
}

rf_trt::TensorDesc core_desc(PluginTensorDesc const& d) {
  rf_trt::TensorDesc t;
  t.type = core_type(d.type);
  t.nb_dims = d.dims.nbDims;
  for (int32_t i = 0; i < d.dims.nbDims && i < rf_trt::kMaxDims; ++i) t.dims[i] = d.dims.d[i];
  return t;
}

void report(char const* where, std::exception const& e) { std::fprintf(stderr, "[retinaflow %s] %s\n", where, e.what()); }

std::vector<rf_trt::Field> core_fields(PluginFieldCollection const* fc) {
  std::vector<rf_trt::Field> out;
  for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
    PluginField const& f = fc->fields[i];
    if (f.type != PluginFieldType::kFLOAT32 && f.type != PluginFieldType::kINT32)
      throw rf_trt::PluginError(std::string("field '") + f.name + "' must be float32 or int32");
    out.push_back({f.name, f.type == PluginFieldType::kFLOAT32 ? rf_trt::FieldType::kFloat32 : rf_trt::FieldType::kInt32,
                   f.data, f.length});
  }
  return out;
}

std::vector<PluginField> trt_fields(std::vector<rf_trt::Field> const& fields) {
  std::vector<PluginField> out;
  for (rf_trt::Field const& f : fields)
    out.emplace_back(f.name, f.data,
                     f.type == rf_trt::FieldType::kFloat32 ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32,
                     f.length);
  return out;
}

// What differs between the two plugins, all of it delegated to plugin_core.
struct DecodeOp {
  using Fields = rf_trt::DecodeFields;
  static constexpr char const* name = rf_trt::kDecodeName;
  static int32_t nb_outputs() { return rf_trt::kDecodeOutputs; }
  static std::vector<rf_trt::FieldSpec> const& specs() { return rf_trt::decode_field_specs(); }
  static Fields parse(std::vector<rf_trt::Field> const& f) {
    return rf_trt::parse_decode_fields(f.data(), static_cast<int32_t>(f.size()));
  }
  static std::vector<rf_trt::ShapeRule> shapes(Fields const& f, int32_t n) { return rf_trt::decode_output_shapes(f, n); }
  static std::vector<rf_trt::DType> types(rf_trt::DType const* in, int32_t n) { return rf_trt::decode_output_types(in, n); }
  static bool supports(int32_t pos, rf_trt::DType const* t, int32_t ni, int32_t no) {
    return rf_trt::decode_supports(pos, t, ni, no);
  }
  static void check(rf_trt::TensorDesc const* in, int32_t n) { rf_trt::check_decode_inputs(in, n); }
  static size_t workspace(Fields const& f, rf_trt::TensorDesc const* in, int32_t n) {
    return rf_trt::decode_workspace(f, in, n);
  }
  static int64_t enqueue(Fields const& f, rf_trt::TensorDesc const* in, int32_t n, void const* const* i, void* const* o,
                         void* w, size_t wb, cudaStream_t s) {
    return rf_trt::decode_enqueue(f, in, n, i, o, w, wb, s);
  }
};

struct NmsOp {
  using Fields = rf_trt::NmsFields;
  static constexpr char const* name = rf_trt::kNmsName;
  static int32_t nb_outputs() { return rf_trt::kNmsOutputs; }
  static std::vector<rf_trt::FieldSpec> const& specs() { return rf_trt::nms_field_specs(); }
  static Fields parse(std::vector<rf_trt::Field> const& f) {
    return rf_trt::parse_nms_fields(f.data(), static_cast<int32_t>(f.size()));
  }
  static std::vector<rf_trt::ShapeRule> shapes(Fields const& f, int32_t) { return rf_trt::nms_output_shapes(f); }
  static std::vector<rf_trt::DType> types(rf_trt::DType const*, int32_t) { return rf_trt::nms_output_types(); }
  static bool supports(int32_t pos, rf_trt::DType const* t, int32_t ni, int32_t no) {
    return rf_trt::nms_supports(pos, t, ni, no);
  }
  static void check(rf_trt::TensorDesc const* in, int32_t n) { rf_trt::check_nms_inputs(in, n); }
  static size_t workspace(Fields const& f, rf_trt::TensorDesc const* in, int32_t n) {
    return rf_trt::nms_workspace(f, in, n);
  }
  static int64_t enqueue(Fields const& f, rf_trt::TensorDesc const* in, int32_t n, void const* const* i, void* const* o,
                         void* w, size_t wb, cudaStream_t s) {
    return rf_trt::nms_enqueue(f, in, n, i, o, w, wb, s);
  }
};

template <typename Op>
class Plugin final : public IPluginV3, public IPluginV3OneCore, public IPluginV3OneBuild, public IPluginV3OneRuntime {
 public:
  explicit Plugin(typename Op::Fields fields) : fields_(fields) { refresh(); }
  Plugin(Plugin const& other) : fields_(other.fields_), nb_inputs_(other.nb_inputs_) { refresh(); }

  // IPluginV3
  IPluginCapability* getCapabilityInterface(PluginCapabilityType type) noexcept override {
    if (type == PluginCapabilityType::kBUILD) return static_cast<IPluginV3OneBuild*>(this);
    if (type == PluginCapabilityType::kRUNTIME) return static_cast<IPluginV3OneRuntime*>(this);
    return static_cast<IPluginV3OneCore*>(this);
  }
  IPluginV3* clone() noexcept override {
    try {
      return new Plugin(*this);
    } catch (std::exception const& e) {
      report(Op::name, e);
      return nullptr;
    }
  }

  // IPluginV3OneCore
  char const* getPluginName() const noexcept override { return Op::name; }
  char const* getPluginVersion() const noexcept override { return rf_trt::kVersion; }
  char const* getPluginNamespace() const noexcept override { return rf_trt::kNamespace; }

  // IPluginV3OneBuild
  int32_t getNbOutputs() const noexcept override { return Op::nb_outputs(); }
  char const* getMetadataString() noexcept override { return metadata_.c_str(); }

  int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nbInputs, DynamicPluginTensorDesc const*,
                          int32_t) noexcept override {
    try {
      std::vector<rf_trt::TensorDesc> descs;
      for (int32_t i = 0; i < nbInputs; ++i) descs.push_back(core_desc(in[i].desc));
      Op::check(descs.data(), nbInputs);  // -1 (dynamic) dimensions are skipped
      nb_inputs_ = nbInputs;
      return 0;
    } catch (std::exception const& e) {
      report(Op::name, e);
      return -1;
    }
  }

  int32_t getOutputDataTypes(DataType* outputTypes, int32_t nbOutputs, DataType const* inputTypes,
                             int32_t nbInputs) const noexcept override {
    try {
      std::vector<rf_trt::DType> in;
      for (int32_t i = 0; i < nbInputs; ++i) in.push_back(core_type(inputTypes[i]));
      std::vector<rf_trt::DType> const out = Op::types(in.data(), nbInputs);
      for (int32_t i = 0; i < nbOutputs && i < static_cast<int32_t>(out.size()); ++i) outputTypes[i] = trt_type(out[i]);
      return 0;
    } catch (std::exception const& e) {
      report(Op::name, e);
      return -1;
    }
  }

  int32_t getOutputShapes(DimsExprs const* inputs, int32_t nbInputs, DimsExprs const*, int32_t, DimsExprs* outputs,
                          int32_t nbOutputs, IExprBuilder& exprBuilder) noexcept override {
    try {
      std::vector<rf_trt::ShapeRule> const rules = Op::shapes(fields_, nbInputs);
      for (int32_t o = 0; o < nbOutputs && o < static_cast<int32_t>(rules.size()); ++o) {
        outputs[o].nbDims = rules[o].nb_dims;
        for (int32_t k = 0; k < rules[o].nb_dims; ++k) {
          rf_trt::DimRule const& r = rules[o].d[k];
          outputs[o].d[k] = r.input < 0 ? exprBuilder.constant(r.constant) : inputs[r.input].d[r.axis];
        }
      }
      return 0;
    } catch (std::exception const& e) {
      report(Op::name, e);
      return -1;
    }
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* inOut, int32_t nbInputs,
                                 int32_t nbOutputs) noexcept override {
    if (inOut[pos].desc.format != TensorFormat::kLINEAR) return false;
    std::vector<rf_trt::DType> types;
    for (int32_t i = 0; i <= pos; ++i) types.push_back(core_type(inOut[i].desc.type));
    return Op::supports(pos, types.data(), nbInputs, nbOutputs);
  }

  size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs, DynamicPluginTensorDesc const*,
                          int32_t) const noexcept override {
    try {
      std::vector<rf_trt::TensorDesc> descs;  // the profile's largest shapes: the query is monotone in them
      for (int32_t i = 0; i < nbInputs; ++i) {
        rf_trt::TensorDesc d = core_desc(inputs[i].desc);
        for (int32_t k = 0; k < d.nb_dims; ++k) d.dims[k] = inputs[i].max.d[k];
        descs.push_back(d);
      }
      return Op::workspace(fields_, descs.data(), nbInputs);
    } catch (std::exception const& e) {
      report(Op::name, e);
      return 0;
    }
  }

  // IPluginV3OneRuntime
  // Called before enqueue whenever the input shapes change; enqueue itself is not told the input count.
  int32_t onShapeChange(PluginTensorDesc const* in, int32_t nbInputs, PluginTensorDesc const*,
                        int32_t) noexcept override {
    try {
      std::vector<rf_trt::TensorDesc> descs;
      for (int32_t i = 0; i < nbInputs; ++i) descs.push_back(core_desc(in[i]));
      Op::check(descs.data(), nbInputs);
      nb_inputs_ = nbInputs;
      return 0;
    } catch (std::exception const& e) {
      report(Op::name, e);
      return -1;
    }
  }

  int32_t enqueue(PluginTensorDesc const* inputDesc, PluginTensorDesc const*, void const* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override {
    try {
      int32_t const n = nb_inputs_;
      std::vector<rf_trt::TensorDesc> descs;
      for (int32_t i = 0; i < n; ++i) descs.push_back(core_desc(inputDesc[i]));
      size_t const bytes = Op::workspace(fields_, descs.data(), n);
      int64_t const status = Op::enqueue(fields_, descs.data(), n, inputs, outputs, workspace, bytes, stream);
      if (status != 0) std::fprintf(stderr, "[retinaflow %s] %s\n", Op::name, rf_status_string(status));
      return status == 0 ? 0 : -1;
    } catch (std::exception const& e) {
      report(Op::name, e);
      return -1;
    }
  }

  IPluginV3* attachToContext(IPluginResourceContext*) noexcept override { return clone(); }
  PluginFieldCollection const* getFieldsToSerialize() noexcept override { return &collection_; }

 private:
  void refresh() {
    core_ = rf_trt::fields_of(fields_);
    trt_ = trt_fields(core_);
    collection_.nbFields = static_cast<int32_t>(trt_.size());
    collection_.fields = trt_.data();
    metadata_ = rf_trt::describe(fields_);
  }

  typename Op::Fields fields_;
  int32_t nb_inputs_ = 0;
  std::vector<rf_trt::Field> core_;
  std::vector<PluginField> trt_;
  PluginFieldCollection collection_{};
  std::string metadata_;
};

template <typename Op>
class Creator final : public IPluginCreatorV3One {
 public:
  Creator() {
    for (rf_trt::FieldSpec const& s : Op::specs())
      specs_.emplace_back(s.name, nullptr,
                          s.type == rf_trt::FieldType::kFloat32 ? PluginFieldType::kFLOAT32 : PluginFieldType::kINT32, 1);
    collection_.nbFields = static_cast<int32_t>(specs_.size());
    collection_.fields = specs_.data();
  }
  char const* getPluginName() const noexcept override { return Op::name; }
  char const* getPluginVersion() const noexcept override { return rf_trt::kVersion; }
  char const* getPluginNamespace() const noexcept override { return rf_trt::kNamespace; }
  PluginFieldCollection const* getFieldNames() noexcept override { return &collection_; }

  IPluginV3* createPlugin(char const*, PluginFieldCollection const* fc, TensorRTPhase) noexcept override {
    try {
      return new Plugin<Op>(Op::parse(core_fields(fc)));
    } catch (std::exception const& e) {
      report(Op::name, e);
      return nullptr;
    }
  }

 private:
  std::vector<PluginField> specs_;
  PluginFieldCollection collection_{};
};

struct Registration {
  Creator<DecodeOp> decode;
  Creator<NmsOp> nms;
  Registration() {
    IPluginRegistry* registry = getPluginRegistry();
    if (registry == nullptr || !registry->registerCreator(decode, rf_trt::kNamespace) ||
        !registry->registerCreator(nms, rf_trt::kNamespace))
      std::fprintf(stderr, "[retinaflow] could not register the Decode/NMS plugin creators\n");
  }
};

Registration registration;  // runs when the library is loaded

}  // namespace

// CPU unit test of kernels/tensorrt/plugin_core (built with g++ by test_plugin_core.py, against c_api_stub.cpp).
//   plugin_core_test            runs the checks; prints "N passed, M failed"; exit status 1 on failure
//   plugin_core_test --contract prints the plugins' contract as JSON (names, fields, inputs, outputs)
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "c_api_stub.h"
#include "tensorrt/plugin_core.h"

using namespace rf_trt;

namespace {

int passed = 0, failed = 0;

void check(bool ok, const char* what) {
  if (ok) {
    ++passed;
  } else {
    ++failed;
    std::printf("FAIL: %s\n", what);
  }
}

bool throws(const std::function<void()>& fn, const char* needle) {
  try {
    fn();
  } catch (const PluginError& e) {
    return std::strstr(e.what(), needle) != nullptr;
  }
  return false;
}

TensorDesc desc(DType t, std::vector<int64_t> dims) {
  TensorDesc d;
  d.type = t;
  d.nb_dims = static_cast<int32_t>(dims.size());
  for (size_t i = 0; i < dims.size(); ++i) d.dims[i] = dims[i];
  return d;
}

// Two levels (8x8 and 4x4), A = 2 anchors, C = 3 classes, batch 5.
std::vector<TensorDesc> decode_inputs(DType t = DType::kFloat16) {
  return {desc(t, {5, 6, 8, 8}),        desc(t, {5, 6, 4, 4}),        desc(t, {5, 8, 8, 8}),
          desc(t, {5, 8, 4, 4}),        desc(DType::kFloat32, {128, 4}), desc(DType::kFloat32, {32, 4}),
          desc(DType::kInt32, {5, 2})};
}

void test_fields() {
  DecodeFields d;
  d.score_thresh = 0.25f;
  d.top_n = 77;
  d.capacity = 4096;
  const std::vector<Field> fs = fields_of(d);
  const DecodeFields back = parse_decode_fields(fs.data(), static_cast<int32_t>(fs.size()));
  check(back.score_thresh == 0.25f && back.top_n == 77 && back.capacity == 4096, "decode fields round trip");
  check(fs.size() == decode_field_specs().size(), "decode fields_of covers every spec");
  for (size_t i = 0; i < fs.size(); ++i)
    check(std::strcmp(fs[i].name, decode_field_specs()[i].name) == 0 && fs[i].type == decode_field_specs()[i].type,
          "decode fields_of follows the spec order and types");
  NmsFields n;
  n.iou_threshold = 0.6f;
  n.max_det = 300;
  const std::vector<Field> ns = fields_of(n);
  const NmsFields nb = parse_nms_fields(ns.data(), static_cast<int32_t>(ns.size()));
  check(nb.iou_threshold == 0.6f && nb.max_det == 300, "nms fields round trip");
  const DecodeFields defaults = parse_decode_fields(nullptr, 0);
  check(defaults.top_n == 1000 && defaults.score_thresh == 0.05f, "missing fields keep defaults");

  const int32_t big = RF_DECODE_MAX_TOP_N + 1, one = 1;
  const float bad_thresh = 1.0f, bad_iou = 1.5f;
  const Field too_many{"top_n", FieldType::kInt32, &big, 1};
  check(throws([&] { parse_decode_fields(&too_many, 1); }, "top_n"), "top_n out of range");
  const Field thresh{"score_thresh", FieldType::kFloat32, &bad_thresh, 1};
  check(throws([&] { parse_decode_fields(&thresh, 1); }, "score_thresh"), "score_thresh out of range");
  const Field unknown{"iou", FieldType::kFloat32, &bad_iou, 1};
  check(throws([&] { parse_nms_fields(&unknown, 1); }, "unknown field 'iou'"), "unknown field");
  const Field wrong_type{"max_det", FieldType::kFloat32, &one, 1};
  check(throws([&] { parse_nms_fields(&wrong_type, 1); }, "must be one int32"), "wrong field type");
  const Field iou{"iou_threshold", FieldType::kFloat32, &bad_iou, 1};
  check(throws([&] { parse_nms_fields(&iou, 1); }, "iou_threshold"), "iou out of range");
  check(describe(n) == "iou_threshold=0.6 max_det=300", "describe nms");
}

void test_shapes_and_types() {
  DecodeFields f;
  f.top_n = 10;
  const std::vector<TensorDesc> in = decode_inputs();
  const std::vector<ShapeRule> rules = decode_output_shapes(f, 7);
  check(rules.size() == 3, "decode has 3 outputs");
  check(evaluate(rules[0], in.data()) == std::vector<int64_t>({5, 20}), "decode scores (B, L*top_n)");
  check(evaluate(rules[1], in.data()) == std::vector<int64_t>({5, 20, 4}), "decode boxes (B, L*top_n, 4)");
  check(evaluate(rules[2], in.data()) == std::vector<int64_t>({5, 20}), "decode classes (B, L*top_n)");
  NmsFields n;
  n.max_det = 7;
  const std::vector<TensorDesc> nin{desc(DType::kFloat32, {5, 20}), desc(DType::kFloat32, {5, 20, 4}),
                                    desc(DType::kInt32, {5, 20})};
  const std::vector<ShapeRule> nr = nms_output_shapes(n);
  check(nr.size() == 4 && evaluate(nr[1], nin.data()) == std::vector<int64_t>({5, 7, 4}) &&
            evaluate(nr[3], nin.data()) == std::vector<int64_t>({5}),
        "nms output shapes");
  check(throws([&] { decode_output_shapes(f, 6); }, "3L+1 inputs"), "decode input count");

  std::vector<DType> t{DType::kFloat16, DType::kFloat16, DType::kFloat32, DType::kFloat32, DType::kFloat32,
                       DType::kFloat32, DType::kInt32,   DType::kFloat32, DType::kFloat32, DType::kInt32};
  bool all = true;
  for (int32_t pos = 0; pos < 10; ++pos) all = all && decode_supports(pos, t.data(), 7, 3);
  check(all, "decode supports fp16 logits, fp32 deltas, fp32 anchors, int32 sizes");
  t[1] = DType::kFloat32;
  check(!decode_supports(1, t.data(), 7, 3), "decode: one type for all class heads");
  t[1] = DType::kFloat16;
  t[4] = DType::kFloat16;
  check(!decode_supports(4, t.data(), 7, 3), "decode: anchors are float32");
  t[4] = DType::kFloat32;
  t[6] = DType::kInt64;
  check(!decode_supports(6, t.data(), 7, 3), "decode: sizes are int32");
  t[9] = DType::kInt64;
  check(!decode_supports(9, t.data(), 7, 3), "decode: classes out are int32");
  const std::vector<DType> nt{DType::kBFloat16, DType::kFloat32, DType::kInt32, DType::kFloat32,
                              DType::kFloat32,  DType::kInt32,   DType::kInt32};
  all = true;
  for (int32_t pos = 0; pos < 7; ++pos) all = all && nms_supports(pos, nt.data(), 3, 4);
  check(all && !nms_supports(2, std::vector<DType>{DType::kFloat32, DType::kFloat32, DType::kFloat32}.data(), 3, 4),
        "nms types");
}

void test_checks_and_workspace() {
  DecodeFields f;
  f.top_n = 10;
  f.capacity = 123;
  std::vector<TensorDesc> in = decode_inputs();
  const size_t bytes = decode_workspace(f, in.data(), 7);
  check(bytes == 1000 * 5 + 10 * 2 + 3, "decode workspace comes from the C API query");
  const rf_decode_params& p = g_last_decode;
  check(p.batch == 5 && p.num_levels == 2 && p.num_anchors == 2 && p.num_classes == 3 && p.top_n == 10 &&
            p.capacity == 123 && p.dtype == RF_FLOAT16 && p.sizes_type == RF_INT32 && p.classes_type == RF_INT32,
        "decode params");
  check(p.levels[1].height == 4 && p.levels[1].width == 4 && p.levels[1].cls_strides[0] == 96 &&
            p.levels[1].cls_strides[1] == 16 && p.levels[1].cls_strides[2] == 4 && p.levels[1].cls_strides[3] == 1 &&
            p.levels[0].box_strides[0] == 512,
        "decode strides are contiguous NCHW");

  std::vector<const void*> ptrs{&in[0], &in[1], &in[2], &in[3], &in[4], &in[5], &in[6]};
  int out0 = 0, out1 = 0, out2 = 0;
  std::vector<void*> outs{&out0, &out1, &out2};
  char work[8];
  const int64_t status = decode_enqueue(f, in.data(), 7, ptrs.data(), outs.data(), work, 1 << 20, nullptr);
  check(status == 0 && g_last_decode.levels[1].box == &in[3] && g_last_decode.levels[0].anchors == (void*)&in[4] &&
            g_last_decode.sizes == &in[6] && g_last_decode.classes == &out2,
        "decode enqueue passes the buffers through");

  in[5] = desc(DType::kFloat32, {31, 4});
  check(throws([&] { check_decode_inputs(in.data(), 7); }, "anchors must be (H*W*A, 4)"), "bad anchors");
  in = decode_inputs();
  in[1].dims[1] = 9;
  check(throws([&] { check_decode_inputs(in.data(), 7); }, "channels differ"), "bad channels");
  in = decode_inputs();
  in[0].dims[0] = -1;  // dynamic batch at build time
  in[6].dims[0] = -1;
  bool ok = true;
  try {
    check_decode_inputs(in.data(), 7);
  } catch (const PluginError&) {
    ok = false;
  }
  check(ok, "unknown (-1) batch is accepted at build time");

  NmsFields n;
  n.max_det = 50;
  const std::vector<TensorDesc> nin{desc(DType::kFloat32, {2, 30}), desc(DType::kFloat32, {2, 30, 4}),
                                    desc(DType::kInt32, {2, 30})};
  check(nms_workspace(n, nin.data(), 3) == 256 + 60 && g_last_nms.count == 30 && g_last_nms.max_det == 50 &&
            g_last_nms.out_type == RF_INT32,
        "nms workspace and params");
  const std::vector<TensorDesc> bad{desc(DType::kFloat32, {2, 30}), desc(DType::kFloat32, {2, 29, 4}),
                                    desc(DType::kInt32, {2, 30})};
  check(throws([&] { nms_workspace(n, bad.data(), 3); }, "NMS: needs scores"), "nms bad shapes");
}

void print_names(const std::vector<std::string>& names) {
  std::printf("[");
  for (size_t i = 0; i < names.size(); ++i) std::printf("%s\"%s\"", i ? ", " : "", names[i].c_str());
  std::printf("]");
}

void print_fields(const std::vector<FieldSpec>& specs) {
  std::printf("[");
  for (size_t i = 0; i < specs.size(); ++i)
    std::printf("%s[\"%s\", \"%s\"]", i ? ", " : "", specs[i].name,
                specs[i].type == FieldType::kFloat32 ? "float32" : "int32");
  std::printf("]");
}

void print_contract() {
  std::printf("{\"namespace\": \"%s\", \"version\": \"%s\", \"max_levels\": %d,\n", kNamespace, kVersion,
              RF_DECODE_MAX_LEVELS);
  std::printf(" \"%s\": {\"fields\": ", kDecodeName);
  print_fields(decode_field_specs());
  std::printf(", \"inputs_5_levels\": ");
  print_names(decode_input_names(5));
  std::printf(", \"outputs\": ");
  print_names(decode_output_names());
  std::printf("},\n \"%s\": {\"fields\": ", kNmsName);
  print_fields(nms_field_specs());
  std::printf(", \"inputs\": ");
  print_names(nms_input_names());
  std::printf(", \"outputs\": ");
  print_names(nms_output_names());
  std::printf("}}\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc > 1 && std::strcmp(argv[1], "--contract") == 0) {
    print_contract();
    return 0;
  }
  test_fields();
  test_shapes_and_types();
  test_checks_and_workspace();
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}

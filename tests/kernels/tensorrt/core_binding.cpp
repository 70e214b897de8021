// Test-only PyTorch binding of the plugin core (kernels/tensorrt/plugin_core), for the GPU parity test:
// it calls the workspace query and the launch exactly as the TensorRT adapter does (contiguous tensors,
// int32 integers, the core's descriptors), so the plugins' path is checked without TensorRT.
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <vector>

#include "tensorrt/plugin_core.h"

namespace {

rf_trt::TensorDesc describe(const at::Tensor& t) {
  rf_trt::TensorDesc d;
  switch (t.scalar_type()) {
    case at::kFloat: d.type = rf_trt::DType::kFloat32; break;
    case at::kHalf: d.type = rf_trt::DType::kFloat16; break;
    case at::kBFloat16: d.type = rf_trt::DType::kBFloat16; break;
    case at::kInt: d.type = rf_trt::DType::kInt32; break;
    default: d.type = rf_trt::DType::kOther;
  }
  d.nb_dims = static_cast<int32_t>(t.dim());
  for (int64_t i = 0; i < t.dim(); ++i) d.dims[i] = t.size(i);
  return d;
}

at::Tensor workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes > 0 ? bytes : 1)}, like.options().dtype(at::kByte));
}

std::vector<at::Tensor> decode(std::vector<at::Tensor> cls, std::vector<at::Tensor> box,
                               std::vector<at::Tensor> anchors, at::Tensor sizes, double score_thresh, int64_t top_n,
                               int64_t capacity) {
  std::vector<at::Tensor> in;
  for (auto* group : {&cls, &box, &anchors})
    for (const at::Tensor& t : *group) in.push_back(t.contiguous());
  in.push_back(sizes.contiguous());
  std::vector<rf_trt::TensorDesc> descs;
  std::vector<const void*> ptrs;
  for (const at::Tensor& t : in) {
    descs.push_back(describe(t));
    ptrs.push_back(t.data_ptr());
  }
  rf_trt::DecodeFields f;
  f.score_thresh = static_cast<float>(score_thresh);
  f.top_n = static_cast<int32_t>(top_n);
  f.capacity = static_cast<int32_t>(capacity);
  const int32_t n = static_cast<int32_t>(in.size());
  const int64_t batch = cls[0].size(0), slots = static_cast<int64_t>(cls.size()) * top_n;
  const auto opts = cls[0].options();
  std::vector<at::Tensor> out{at::empty({batch, slots}, opts.dtype(at::kFloat)),
                              at::empty({batch, slots, 4}, opts.dtype(at::kFloat)),
                              at::empty({batch, slots}, opts.dtype(at::kInt))};
  std::vector<void*> outs{out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr()};
  const size_t bytes = rf_trt::decode_workspace(f, descs.data(), n);
  at::Tensor work = workspace(bytes, cls[0]);
  const int64_t status = rf_trt::decode_enqueue(f, descs.data(), n, ptrs.data(), outs.data(), work.data_ptr(), bytes,
                                                c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == 0, "decode_enqueue: ", rf_status_string(status));
  out.push_back(at::scalar_tensor(static_cast<int64_t>(bytes)));
  return out;
}

std::vector<at::Tensor> nms(at::Tensor scores, at::Tensor boxes, at::Tensor classes, double iou, int64_t max_det) {
  std::vector<at::Tensor> in{scores.contiguous(), boxes.contiguous(), classes.contiguous()};
  std::vector<rf_trt::TensorDesc> descs;
  std::vector<const void*> ptrs;
  for (const at::Tensor& t : in) {
    descs.push_back(describe(t));
    ptrs.push_back(t.data_ptr());
  }
  rf_trt::NmsFields f;
  f.iou_threshold = static_cast<float>(iou);
  f.max_det = static_cast<int32_t>(max_det);
  const int64_t batch = scores.size(0);
  const auto opts = scores.options();
  std::vector<at::Tensor> out{at::empty({batch, max_det}, opts.dtype(at::kFloat)),
                              at::empty({batch, max_det, 4}, opts.dtype(at::kFloat)),
                              at::empty({batch, max_det}, opts.dtype(at::kInt)), at::empty({batch}, opts.dtype(at::kInt))};
  std::vector<void*> outs{out[0].data_ptr(), out[1].data_ptr(), out[2].data_ptr(), out[3].data_ptr()};
  const size_t bytes = rf_trt::nms_workspace(f, descs.data(), 3);
  at::Tensor work = workspace(bytes, scores);
  const int64_t status = rf_trt::nms_enqueue(f, descs.data(), 3, ptrs.data(), outs.data(), work.data_ptr(), bytes,
                                             c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(status == 0, "nms_enqueue: ", rf_status_string(status));
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode", &decode, "plugin core decode (returns scores, boxes, classes int32, workspace bytes)");
  m.def("nms", &nms, "plugin core NMS (returns scores, boxes, classes int32, counts int32)");
}

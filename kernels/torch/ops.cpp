// Thin PyTorch binding: the CUDA implementations of retinaflow::decode, nms, match, group_norm,
// group_norm_backward and colour_jitter. The operator schemas are declared once, in Python (src/retinaflow/ops/_library.py);
// this file only checks tensors, allocates outputs and workspace through PyTorch's caching allocator, and
// calls the C API of decode.h / nms.h / match.h / group_norm.h / colour.h on the current stream (so it can be
// captured in a CUDA graph).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "colour.h"
#include "decode.h"
#include "group_norm.h"
#include "match.h"
#include "nms.h"

namespace {

rf_dtype float_type(const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return RF_FLOAT32;
    case at::kHalf: return RF_FLOAT16;
    case at::kBFloat16: return RF_BFLOAT16;
    default: TORCH_CHECK(false, "retinaflow: ", what, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

// int32/int64 pass through; other integer types are converted to int64.
at::Tensor index_tensor(const at::Tensor& t, const at::Device& device) {
  at::Tensor r = t.to(device);
  if (r.scalar_type() != at::kInt && r.scalar_type() != at::kLong) r = r.to(at::kLong);
  return r.contiguous();
}

rf_itype index_type(const at::Tensor& t) { return t.scalar_type() == at::kInt ? RF_INT32 : RF_INT64; }

at::Tensor workspace(int64_t bytes, const at::Tensor& like, const char* op) {
  TORCH_CHECK(bytes > 0, "retinaflow ", op, ": ", rf_status_string(bytes));
  return at::empty({bytes}, like.options().dtype(at::kByte));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_cuda(at::TensorList cls, at::TensorList box,
                                                           at::TensorList anchors, const at::Tensor& sizes,
                                                           double score_thresh, int64_t top_n, int64_t capacity) {
  const int64_t levels = static_cast<int64_t>(cls.size());
  TORCH_CHECK(levels >= 1 && levels <= RF_DECODE_MAX_LEVELS, "retinaflow decode: 1..", RF_DECODE_MAX_LEVELS,
              " levels, got ", levels);
  TORCH_CHECK(static_cast<int64_t>(box.size()) == levels && static_cast<int64_t>(anchors.size()) == levels,
              "retinaflow decode: as many box heads and anchor sets as class heads");
  const at::Tensor& c0 = cls[0];
  TORCH_CHECK(c0.is_cuda() && c0.dim() == 4 && box[0].dim() == 4, "retinaflow decode: CUDA (B, A*C, H, W) heads");
  const c10::cuda::CUDAGuard guard(c0.device());
  const int64_t batch = c0.size(0), num_anchors = box[0].size(1) / 4;
  TORCH_CHECK(num_anchors >= 1 && c0.size(1) % num_anchors == 0, "retinaflow decode: bad head channels");
  const int64_t num_classes = c0.size(1) / num_anchors;

  rf_decode_params p{};
  p.batch = static_cast<int32_t>(batch);
  p.num_levels = static_cast<int32_t>(levels);
  p.num_anchors = static_cast<int32_t>(num_anchors);
  p.num_classes = static_cast<int32_t>(num_classes);
  p.dtype = float_type(c0, "class logits");
  p.box_dtype = float_type(box[0], "box deltas");
  std::vector<at::Tensor> hold;
  for (int64_t l = 0; l < levels; ++l) {
    const at::Tensor &c = cls[l], &b = box[l];
    TORCH_CHECK(c.device() == c0.device() && b.device() == c0.device(), "retinaflow decode: heads on one device");
    TORCH_CHECK(c.scalar_type() == c0.scalar_type() && b.scalar_type() == box[0].scalar_type(),
                "retinaflow decode: one dtype for all class heads and one for all box heads");
    TORCH_CHECK(c.dim() == 4 && b.dim() == 4 && c.size(0) == batch && b.size(0) == batch &&
                    c.size(1) == num_anchors * num_classes && b.size(1) == num_anchors * 4 &&
                    b.size(2) == c.size(2) && b.size(3) == c.size(3),
                "retinaflow decode: level ", l, " heads have inconsistent shapes");
    at::Tensor a = anchors[l].to(c0.device(), at::kFloat).contiguous();
    TORCH_CHECK(a.dim() == 2 && a.size(0) == c.size(2) * c.size(3) * num_anchors && a.size(1) == 4,
                "retinaflow decode: level ", l, " anchors must be (H*W*A, 4)");
    hold.push_back(a);
    rf_decode_level& d = p.levels[l];
    d.cls = c.data_ptr();
    d.box = b.data_ptr();
    d.anchors = a.data_ptr<float>();
    d.height = c.size(2);
    d.width = c.size(3);
    for (int k = 0; k < 4; ++k) {
      d.cls_strides[k] = c.stride(k);
      d.box_strides[k] = b.stride(k);
    }
  }
  const at::Tensor sz = index_tensor(sizes, c0.device());
  TORCH_CHECK(sz.dim() == 2 && sz.size(0) == batch && sz.size(1) == 2, "retinaflow decode: sizes must be (B, 2)");
  p.sizes = sz.data_ptr();
  p.sizes_type = index_type(sz);
  p.score_thresh = static_cast<float>(score_thresh);
  p.top_n = static_cast<int32_t>(top_n);
  p.capacity = static_cast<int32_t>(capacity);

  const int64_t slots = levels * top_n;
  at::Tensor scores = at::empty({batch, slots}, c0.options().dtype(at::kFloat));
  at::Tensor boxes = at::empty({batch, slots, 4}, c0.options().dtype(at::kFloat));
  at::Tensor classes = at::empty({batch, slots}, c0.options().dtype(at::kLong));
  p.scores = scores.data_ptr<float>();
  p.boxes = boxes.data_ptr<float>();
  p.classes = classes.data_ptr();
  p.classes_type = RF_INT64;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(c0.device().index()).stream();
  const int64_t bytes = rf_decode(&p, nullptr, 0, stream);
  at::Tensor work = workspace(bytes, c0, "decode");
  const int64_t status = rf_decode(&p, work.data_ptr(), static_cast<size_t>(bytes), stream);
  TORCH_CHECK(status == 0, "retinaflow decode: ", rf_status_string(status));
  return {scores, boxes, classes};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nms_cuda(const at::Tensor& scores, const at::Tensor& boxes,
                                                                    const at::Tensor& classes, double iou_threshold,
                                                                    int64_t max_det) {
  TORCH_CHECK(scores.is_cuda() && scores.dim() == 2, "retinaflow nms: scores must be a CUDA (B, K) tensor");
  const int64_t batch = scores.size(0), count = scores.size(1);
  TORCH_CHECK(boxes.dim() == 3 && boxes.size(0) == batch && boxes.size(1) == count && boxes.size(2) == 4 &&
                  classes.dim() == 2 && classes.size(0) == batch && classes.size(1) == count,
              "retinaflow nms: boxes (B, K, 4) and classes (B, K) must match scores (B, K)");
  TORCH_CHECK(boxes.device() == scores.device(), "retinaflow nms: tensors on one device");
  const c10::cuda::CUDAGuard guard(scores.device());
  const at::Tensor s = scores.contiguous(), b = boxes.contiguous();
  const at::Tensor c = index_tensor(classes, scores.device());

  rf_nms_params p{};
  p.batch = static_cast<int32_t>(batch);
  p.count = static_cast<int32_t>(count);
  p.scores = s.data_ptr();
  p.scores_type = float_type(s, "scores");
  p.boxes = b.data_ptr();
  p.boxes_type = float_type(b, "boxes");
  p.classes = c.data_ptr();
  p.classes_type = index_type(c);
  p.iou_threshold = static_cast<float>(iou_threshold);
  p.max_det = static_cast<int32_t>(max_det);
  at::Tensor out_scores = at::empty({batch, max_det}, s.options().dtype(at::kFloat));
  at::Tensor out_boxes = at::empty({batch, max_det, 4}, s.options().dtype(at::kFloat));
  at::Tensor out_classes = at::empty({batch, max_det}, s.options().dtype(at::kLong));
  at::Tensor out_counts = at::empty({batch}, s.options().dtype(at::kLong));
  p.out_scores = out_scores.data_ptr<float>();
  p.out_boxes = out_boxes.data_ptr<float>();
  p.out_classes = out_classes.data_ptr();
  p.out_counts = out_counts.data_ptr();
  p.out_type = RF_INT64;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(scores.device().index()).stream();
  const int64_t bytes = rf_nms(&p, nullptr, 0, stream);
  at::Tensor work = workspace(bytes, s, "nms");
  const int64_t status = rf_nms(&p, work.data_ptr(), static_cast<size_t>(bytes), stream);
  TORCH_CHECK(status == 0, "retinaflow nms: ", rf_status_string(status));
  return {out_scores, out_boxes, out_classes, out_counts};
}

at::Tensor match_cuda(const at::Tensor& anchors, const at::Tensor& gt_boxes, const at::Tensor& gt_labels, double fg_iou,
                      double bg_iou, bool allow_low_quality) {
  TORCH_CHECK(anchors.is_cuda() && anchors.dim() == 2 && anchors.size(1) == 4,
              "retinaflow match: anchors must be a CUDA (N, 4) tensor");
  TORCH_CHECK(gt_boxes.dim() == 3 && gt_boxes.size(2) == 4 && gt_labels.dim() == 2 &&
                  gt_labels.size(0) == gt_boxes.size(0) && gt_labels.size(1) == gt_boxes.size(1),
              "retinaflow match: ground truth must be boxes (B, M, 4) and labels (B, M)");
  TORCH_CHECK(gt_boxes.device() == anchors.device(), "retinaflow match: tensors on one device");
  const c10::cuda::CUDAGuard guard(anchors.device());
  const at::Tensor a = anchors.to(at::kFloat).contiguous();
  const at::Tensor g = gt_boxes.to(at::kFloat).contiguous();
  const at::Tensor l = index_tensor(gt_labels, anchors.device());
  const int64_t batch = g.size(0), num_anchors = a.size(0), num_gt = g.size(1);
  TORCH_CHECK(batch >= 1 && batch <= 65535 && num_anchors < (int64_t{1} << 31) && num_gt < (int64_t{1} << 31),
              "retinaflow match: 1..65535 images and fewer than 2^31 anchors and ground truths");
  at::Tensor matches = at::empty({batch, num_anchors}, a.options().dtype(at::kLong));

  rf_match_params p{};
  p.batch = static_cast<int32_t>(batch);
  p.num_anchors = static_cast<int32_t>(num_anchors);
  p.num_gt = static_cast<int32_t>(num_gt);
  p.anchors = a.data_ptr<float>();
  p.gt_boxes = g.data_ptr<float>();
  p.gt_labels = l.data_ptr();
  p.labels_type = index_type(l);
  p.fg_iou = static_cast<float>(fg_iou);
  p.bg_iou = static_cast<float>(bg_iou);
  p.allow_low_quality = allow_low_quality ? 1 : 0;
  p.matches = matches.data_ptr();
  p.matches_type = RF_INT64;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(anchors.device().index()).stream();
  const int64_t bytes = rf_match(&p, nullptr, 0, stream);
  at::Tensor work = workspace(bytes, a, "match");
  const int64_t status = rf_match(&p, work.data_ptr(), static_cast<size_t>(bytes), stream);
  TORCH_CHECK(status == 0, "retinaflow match: ", rf_status_string(status));
  return matches;
}

rf_group_norm_params group_norm_params(const at::Tensor& x, int64_t groups, double eps) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "retinaflow group_norm: a CUDA (N, C, H, W) tensor, got ", x.dim(), "-d");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, "retinaflow group_norm: ", groups, " groups do not divide ",
              x.size(1), " channels");
  rf_group_norm_params p{};
  p.n = x.size(0);
  p.p = x.size(2) * x.size(3);
  p.c = x.size(1);
  p.groups = static_cast<int32_t>(groups);
  p.eps = static_cast<float>(eps);
  p.dtype = float_type(x, "group_norm input");
  return p;
}

// (C,) float32 contiguous copy of an optional affine parameter on x's device (undefined: none).
at::Tensor affine_param(const std::optional<at::Tensor>& t, const at::Tensor& x) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  TORCH_CHECK(t->dim() == 1 && t->size(0) == x.size(1), "retinaflow group_norm: weight/bias must be (C,)");
  return t->to(x.device(), at::kFloat).contiguous();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_cuda(const at::Tensor& x_in,
                                                               const std::optional<at::Tensor>& weight,
                                                               const std::optional<at::Tensor>& bias, int64_t groups,
                                                               double eps) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  rf_group_norm_params p = group_norm_params(x_in, groups, eps);
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w = affine_param(weight, x), b = affine_param(bias, x);
  at::Tensor y = at::empty_like(x, x.options(), at::MemoryFormat::ChannelsLast);
  at::Tensor mean = at::empty({p.n, groups}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty_like(mean);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t bytes = rf_group_norm_forward(&p, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, 0,
                                              stream);
  at::Tensor work = workspace(bytes, x, "group_norm");
  const int64_t status = rf_group_norm_forward(&p, x.data_ptr(), ptr_or_null(w), ptr_or_null(b), y.data_ptr(),
                                               mean.data_ptr<float>(), rstd.data_ptr<float>(), work.data_ptr(),
                                               static_cast<size_t>(bytes), stream);
  TORCH_CHECK(status == 0, "retinaflow group_norm: ", rf_status_string(status));
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_backward_cuda(const at::Tensor& dy_in, const at::Tensor& x_in,
                                                                        const std::optional<at::Tensor>& weight,
                                                                        const at::Tensor& mean, const at::Tensor& rstd,
                                                                        int64_t groups) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  rf_group_norm_params p = group_norm_params(x_in, groups, 0.0);
  TORCH_CHECK(dy_in.sizes() == x_in.sizes() && dy_in.scalar_type() == x_in.scalar_type(),
              "retinaflow group_norm_backward: dy must match x in shape and dtype");
  TORCH_CHECK(mean.scalar_type() == at::kFloat && rstd.scalar_type() == at::kFloat && mean.numel() == p.n * groups &&
                  rstd.numel() == p.n * groups,
              "retinaflow group_norm_backward: mean and rstd must be (N, G) float32");
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor dy = dy_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w = affine_param(weight, x);
  const at::Tensor m = mean.contiguous(), r = rstd.contiguous();
  at::Tensor dx = at::empty_like(x, x.options(), at::MemoryFormat::ChannelsLast);
  at::Tensor dweight = at::empty({p.c}, x.options().dtype(at::kFloat));
  at::Tensor dbias = at::empty_like(dweight);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const int64_t bytes = rf_group_norm_backward(&p, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                               nullptr, nullptr, 0, stream);
  at::Tensor work = workspace(bytes, x, "group_norm_backward");
  const int64_t status = rf_group_norm_backward(
      &p, dy.data_ptr(), x.data_ptr(), ptr_or_null(w), m.data_ptr<float>(), r.data_ptr<float>(), dx.data_ptr(),
      dweight.data_ptr<float>(), dbias.data_ptr<float>(), work.data_ptr(), static_cast<size_t>(bytes), stream);
  TORCH_CHECK(status == 0, "retinaflow group_norm_backward: ", rf_status_string(status));
  return {dx, dweight, dbias};
}

at::Tensor colour_jitter_cuda(const at::Tensor& images_in, const at::Tensor& sizes_in, const at::Tensor& factors_in) {
  TORCH_CHECK(images_in.is_cuda() && images_in.dim() == 4 && images_in.size(1) == 3 &&
                  images_in.scalar_type() == at::kByte,
              "retinaflow colour_jitter: images must be CUDA (B, 3, H, W) uint8");
  const c10::cuda::CUDAGuard guard(images_in.device());
  const int64_t batch = images_in.size(0), height = images_in.size(2), width = images_in.size(3);
  const at::Tensor images = images_in.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor sizes = sizes_in.to(images.device(), at::kLong).contiguous();
  const at::Tensor factors = factors_in.to(images.device(), at::kFloat).contiguous();
  TORCH_CHECK(sizes.dim() == 2 && sizes.size(0) == batch && sizes.size(1) == 2,
              "retinaflow colour_jitter: sizes must be (B, 2)");
  TORCH_CHECK(factors.dim() == 2 && factors.size(0) == batch && factors.size(1) == 3,
              "retinaflow colour_jitter: factors must be (B, 3)");
  at::Tensor out = at::empty_like(images, images.options(), at::MemoryFormat::ChannelsLast);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(images.device().index()).stream();
  const int64_t bytes = rf_colour_jitter(nullptr, nullptr, nullptr, nullptr, batch, height, width, nullptr, 0, stream);
  at::Tensor work = workspace(bytes, images, "colour_jitter");
  const int64_t status = rf_colour_jitter(images.data_ptr<uint8_t>(), sizes.data_ptr<int64_t>(),
                                          factors.data_ptr<float>(), out.data_ptr<uint8_t>(), batch, height, width,
                                          work.data_ptr(), static_cast<size_t>(bytes), stream);
  TORCH_CHECK(status == 0, "retinaflow colour_jitter: ", rf_status_string(status));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(retinaflow, CUDA, m) {
  m.impl("decode", &decode_cuda);
  m.impl("nms", &nms_cuda);
  m.impl("match", &match_cuda);
  m.impl("group_norm", &group_norm_cuda);
  m.impl("group_norm_backward", &group_norm_backward_cuda);
  m.impl("colour_jitter", &colour_jitter_cuda);
}

// retinaflow_runner: run a retinaflow AOTInductor engine (.pt2) over a folder of JPEGs, write COCO results.
//
//   retinaflow_runner ENGINE.pt2 IMAGES_DIR OUT.json --kernels LIB.so --image-lib IMAGE.so [--batch N]
//
// The output is what `retinaflow infer ENGINE.pt2 --images IMAGES_DIR --output OUT.json` writes: a JSON list
// of {"image_id", "category_id", "bbox": [x, y, w, h] in original pixels, "score"}, image ids 1..N in file
// name order. Images are decoded with torchvision's decode_jpeg (RGB), resized like retinaflow's
// EvalTransform (shorter side to infer.resize, longer capped at infer.max_size, antialiased bilinear),
// zero-padded to the engine's input size and run in batches.
//
// The engine calls torch.ops.retinaflow.decode / nms: their schemas are declared below (the same strings as
// src/retinaflow/ops/_library.py; tests/deploy checks they agree) and their CUDA implementations come from
// the kernels library passed with --kernels. Errors are one line on stderr and exit code 1.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace fs = std::filesystem;

TORCH_LIBRARY(retinaflow, m) {
  m.def(
      "decode(Tensor[] cls, Tensor[] box, Tensor[] anchors, Tensor sizes, float score_thresh, int top_n, "
      "int capacity) -> (Tensor, Tensor, Tensor)");
  m.def(
      "nms(Tensor scores, Tensor boxes, Tensor classes, float iou_threshold, int max_det) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "match(Tensor anchors, Tensor gt_boxes, Tensor gt_labels, float fg_iou, float bg_iou, "
      "bool allow_low_quality) -> Tensor");
  m.def("group_norm(Tensor x, Tensor? weight, Tensor? bias, int groups, float eps) -> (Tensor, Tensor, Tensor)");
  m.def(
      "group_norm_backward(Tensor dy, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, int groups) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("colour_jitter(Tensor images, Tensor sizes, Tensor factors) -> Tensor");
}

namespace {

struct Args {
  std::string engine, images, output, kernels, image_lib;
  int batch = 8;
};

struct Settings {  // from the engine's metadata (retinaflow.export.metadata)
  int height = 0, width = 0, min_batch = 1, max_batch = 1, resize = 800, max_size = 1333;
  std::vector<int64_t> category_ids;
};

[[noreturn]] void fail(const std::string& message) { throw std::runtime_error(message); }

Args parse_args(int argc, char** argv) {
  Args a;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) fail(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "--kernels") a.kernels = value();
    else if (arg == "--image-lib") a.image_lib = value();
    else if (arg == "--batch") a.batch = std::stoi(value());
    else if (arg == "-h" || arg == "--help") fail("usage: retinaflow_runner ENGINE.pt2 IMAGES_DIR OUT.json "
                                                  "--kernels LIB.so --image-lib IMAGE.so [--batch N]");
    else positional.push_back(arg);
  }
  if (positional.size() != 3) fail("expected ENGINE.pt2 IMAGES_DIR OUT.json (see --help)");
  a.engine = positional[0], a.images = positional[1], a.output = positional[2];
  if (a.kernels.empty()) fail("--kernels: the retinaflow CUDA kernels library (python -m retinaflow.ops.build)");
  if (a.image_lib.empty()) fail("--image-lib: torchvision's image library (torchvision/image*.so)");
  if (a.batch < 1) fail("--batch must be >= 1");
  return a;
}

void load_library(const std::string& path, const std::string& what) {
  if (!dlopen(path.c_str(), RTLD_NOW | RTLD_GLOBAL)) {
    const char* err = dlerror();
    fail("cannot load " + what + " " + path + ": " + (err ? err : "unknown error"));
  }
}

// The number after "key": in a flat JSON object (the engine's "infer" settings).
int json_int(const std::string& json, const std::string& key) {
  auto at = json.find("\"" + key + "\":");
  if (at == std::string::npos) fail("engine metadata has no infer." + key + ": re-export the engine");
  return static_cast<int>(std::stod(json.substr(at + key.size() + 3)));
}

std::vector<int64_t> json_ints(const std::string& json) {
  std::vector<int64_t> out;
  std::string number;
  for (char c : json + ",") {
    if (std::isdigit(static_cast<unsigned char>(c)) || c == '-') number += c;
    else if (!number.empty()) out.push_back(std::stoll(number)), number.clear();
  }
  return out;
}

Settings read_settings(std::unordered_map<std::string, std::string> meta, const std::string& engine) {
  for (const char* key : {"input_height", "input_width", "min_batch", "max_batch", "infer", "category_ids"})
    if (!meta.count(key)) fail(engine + " has no retinaflow metadata (" + key + "): export it with retinaflow");
  if (meta["device"] != "cuda")
    fail(engine + " was compiled for " + meta["device"] +
         ": the C++ runner runs CUDA engines (decode + NMS are the CUDA kernels); re-export with --device cuda");
  Settings s;
  s.height = std::stoi(meta["input_height"]), s.width = std::stoi(meta["input_width"]);
  s.min_batch = std::stoi(meta["min_batch"]), s.max_batch = std::stoi(meta["max_batch"]);
  s.resize = json_int(meta["infer"], "resize"), s.max_size = json_int(meta["infer"], "max_size");
  s.category_ids = json_ints(meta["category_ids"]);
  return s;
}

std::vector<fs::path> list_jpegs(const std::string& folder) {
  if (!fs::is_directory(folder)) fail("images folder not found: " + folder);
  std::vector<fs::path> files;
  for (const auto& entry : fs::directory_iterator(folder)) {
    auto ext = entry.path().extension().string();
    std::transform(ext.begin(), ext.end(), ext.begin(), ::tolower);
    if (entry.is_regular_file() && (ext == ".jpg" || ext == ".jpeg")) files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  if (files.empty()) fail("no JPEG images (.jpg, .jpeg) in " + folder);
  return files;
}

// (3, h, w) uint8 RGB via torchvision's image::decode_jpeg (mode 3 = RGB).
at::Tensor decode_jpeg(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (bytes.empty()) fail("cannot read " + path.string());
  auto data = at::from_blob(bytes.data(), {static_cast<int64_t>(bytes.size())}, at::kByte).clone();
  static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("image::decode_jpeg", "");
  torch::jit::Stack stack{data, int64_t{3}, false};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

struct Resized {
  at::Tensor image;  // (3, nh, nw) uint8
  double scale;
};

// retinaflow.data.transforms.resize_scale + resize (antialiased bilinear, sizes rounded).
Resized resize(const at::Tensor& image, const Settings& s) {
  double h = image.size(1), w = image.size(2);
  double scale = s.resize / std::min(h, w);
  if (s.max_size > 0 && std::max(h, w) * scale > s.max_size) scale = s.max_size / std::max(h, w);
  int64_t nh = std::max<int64_t>(1, std::llround(h * scale)), nw = std::max<int64_t>(1, std::llround(w * scale));
  if (nh == image.size(1) && nw == image.size(2)) return {image, scale};
  auto out = at::_upsample_bilinear2d_aa(image.unsqueeze(0), {nh, nw}, false).squeeze(0);
  return {out, scale};
}

struct Pending {
  int64_t image_id;
  Resized resized;
};

void write_detections(const std::vector<at::Tensor>& out, const std::vector<Pending>& batch, const Settings& s,
                      std::vector<std::string>& json) {
  auto counts = out[0].cpu(), boxes = out[1].cpu().to(at::kDouble), scores = out[2].cpu();
  auto classes = out[3].cpu();
  for (size_t i = 0; i < batch.size(); ++i) {
    const auto& p = batch[i];
    double sc = p.resized.scale;
    double oh = std::round(p.resized.image.size(1) / sc), ow = std::round(p.resized.image.size(2) / sc);
    for (int64_t k = 0; k < counts[i].item<int64_t>(); ++k) {
      double b[4];
      for (int j = 0; j < 4; ++j)
        b[j] = std::min(std::max(boxes[i][k][j].item<double>() / sc, 0.0), j % 2 ? oh : ow);
      double xywh[4] = {b[0], b[1], b[2] - b[0], b[3] - b[1]};
      char line[256];
      std::snprintf(line, sizeof line,
                    "{\"image_id\": %lld, \"category_id\": %lld, \"bbox\": [%.10g, %.10g, %.10g, %.10g], "
                    "\"score\": %.17g}",
                    static_cast<long long>(p.image_id),
                    static_cast<long long>(s.category_ids.at(classes[i][k].item<int64_t>())),
                    std::round(xywh[0] * 100) / 100, std::round(xywh[1] * 100) / 100,
                    std::round(xywh[2] * 100) / 100, std::round(xywh[3] * 100) / 100,
                    static_cast<double>(scores[i][k].item<float>()));
      json.emplace_back(line);
    }
  }
}

void run_batch(torch::inductor::AOTIModelPackageLoader& loader, const std::vector<Pending>& batch,
               const Settings& s, std::vector<std::string>& json) {
  int64_t n = std::max<int64_t>(batch.size(), s.min_batch);  // a short last batch is filled with blanks
  auto images = at::zeros({n, 3, s.height, s.width}, at::kByte);
  auto sizes = at::full({n, 2}, 32, at::kLong);
  for (size_t i = 0; i < batch.size(); ++i) {
    const auto& im = batch[i].resized.image;
    if (im.size(1) > s.height || im.size(2) > s.width)
      fail("a resized image of " + std::to_string(im.size(1)) + "x" + std::to_string(im.size(2)) +
           " does not fit the engine's " + std::to_string(s.height) + "x" + std::to_string(s.width) +
           ": re-export with a larger --size");
    images[i].narrow(1, 0, im.size(1)).narrow(2, 0, im.size(2)).copy_(im);
    sizes[i][0] = im.size(1), sizes[i][1] = im.size(2);
  }
  auto out = loader.run({images.to(at::kCUDA), sizes.to(at::kCUDA)});
  write_detections(out, batch, s, json);
}

int run(const Args& a) {
  load_library(a.kernels, "the retinaflow CUDA kernels");
  load_library(a.image_lib, "torchvision's image library");
  if (!fs::is_regular_file(a.engine)) fail("engine not found: " + a.engine);
  torch::inductor::AOTIModelPackageLoader loader(a.engine, "model", false, 1, -1);  // -1: the current device
  Settings s = read_settings(loader.get_metadata(), fs::path(a.engine).filename().string());
  int batch_size = std::min(a.batch, s.max_batch);
  std::vector<std::string> json;
  std::vector<Pending> batch;
  auto files = list_jpegs(a.images);
  for (size_t i = 0; i < files.size(); ++i) {
    batch.push_back({static_cast<int64_t>(i + 1), resize(decode_jpeg(files[i]), s)});
    if (static_cast<int>(batch.size()) == batch_size || i + 1 == files.size()) {
      run_batch(loader, batch, s, json);
      batch.clear();
    }
  }
  std::ofstream out(a.output);
  out << "[";
  for (size_t i = 0; i < json.size(); ++i) out << (i ? ", " : "") << json[i];
  out << "]";
  std::printf("detections: %s (%zu images, %zu detections)\n", a.output.c_str(), files.size(), json.size());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    c10::InferenceMode guard;
    return run(parse_args(argc, argv));
  } catch (const std::exception& e) {
    std::string message = e.what();
    std::fprintf(stderr, "retinaflow_runner: error: %s\n", message.substr(0, message.find('\n')).c_str());
    return 1;
  }
}

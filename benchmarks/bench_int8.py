"""COCO mAP of INT8 (ModelOpt PTQ) against FP32 and FP16 on a validation set; prints one JSON object.

    python benchmarks/bench_int8.py CHECKPOINT --images DIR --annotations JSON \
        [--calib-images DIR --calib-annotations JSON] [--calibration-images 512] [--ort-images 32]

(a) the fake-quantised PyTorch model on the GPU over the whole validation set; (b) its explicit Q/DQ ONNX in
ONNX Runtime (CPU) over the first ``--ort-images`` images, with FP32 and (a) on the same subset for the ratio.
Calibration images are drawn (seeded) from the training set: the checkpoint's ``data.images`` /
``data.annotations`` unless given. Target: INT8 within 1.0 mAP point of FP32; when (a) misses it, the run
is repeated with the head's last convolutions kept in floating point and both results are reported.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import environment

from retinaflow.config import Config
from retinaflow.data.loader import build_eval_loader
from retinaflow.engine.evaluate import evaluate_detections
from retinaflow.engine.infer import load_model, make_detector, predict
from retinaflow.export.quantize import (
    HEAD_LAST_CONVS,
    QuantizeConfig,
    calibration_batches,
    export_qdq_onnx,
    quantize,
)

TARGET_DROP = 1.0


def coco_map(
    model: torch.nn.Module, config: Config, state: dict[str, Any], args: Any, amp: Any, ann: str
) -> float:
    loader, _ = build_eval_loader(args.images, ann, config.data, config.infer.batch)
    detector = make_detector(model, config, amp)
    dets = predict(model, loader, config, torch.device(args.device), amp, state["category_ids"], detector)
    return 100.0 * evaluate_detections(ann, dets, list(config.class_names) or None).stats["AP"]


def subset_annotations(annotations: str, n: int, folder: Path) -> str:
    data = json.loads(Path(annotations).read_text())
    keep = {im["id"] for im in data["images"][:n]}
    data["images"] = [im for im in data["images"] if im["id"] in keep]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] in keep]
    path = folder / "subset.json"
    path.write_text(json.dumps(data))
    return str(path)


def ort_map(qmodel: torch.nn.Module, config: Config, args: Any, ann: str, folder: Path) -> float:
    from retinaflow.export.onnx_runtime import infer_onnx

    side = -(-max(config.infer.max_size, config.infer.resize) // 128) * 128
    path = export_qdq_onnx(qmodel, folder / "int8.onnx", side, side)
    result = infer_onnx(path, args.checkpoint, args.images, ann, folder / "ort.json", config.infer)
    return 100.0 * result.stats["AP"]


def _record(
    result: dict[str, Any], name: str, qmodel: torch.nn.Module, config: Config, state: Any, args: Any
) -> float:
    result[f"{name}_map"] = coco_map(qmodel, config, state, args, None, args.annotations)
    result[f"{name}_drop"] = result["fp32_map"] - result[f"{name}_map"]
    return float(result[f"{name}_drop"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--images", required=True)
    p.add_argument("--annotations", required=True)
    p.add_argument("--calib-images")
    p.add_argument("--calib-annotations")
    p.add_argument("--calibration-images", type=int, default=512)
    p.add_argument("--ort-images", type=int, default=32, help="images for (b); 0 skips it")
    p.add_argument("--device", default="cuda", help="cuda (the measurement) or cpu (a smoke run)")
    args = p.parse_args(argv)
    start = time.perf_counter()
    torch.backends.cudnn.benchmark = True
    model, config, state = load_model(args.checkpoint, torch.device(args.device))
    config.data.resize, config.data.max_size = config.infer.resize, config.infer.max_size
    config.data.pad_stride = config.infer.pad_stride
    result: dict[str, Any] = {
        "benchmark": "int8_ptq",
        "environment": environment(),
        "target_drop": TARGET_DROP,
    }
    result["fp32_map"] = coco_map(copy.deepcopy(model), config, state, args, None, args.annotations)
    if args.device == "cuda":
        result["fp16_map"] = coco_map(
            copy.deepcopy(model), config, state, args, torch.float16, args.annotations
        )
    qcfg = QuantizeConfig(calibration_images=args.calibration_images)
    batches = calibration_batches(
        args.calib_images or config.data.images,
        args.calib_annotations or config.data.annotations,
        config.data,
        qcfg,
    )
    qmodels = {"int8": quantize(copy.deepcopy(model), batches, qcfg)}
    if (
        _record(result, "int8", qmodels["int8"], config, state, args) > TARGET_DROP
    ):  # keep the head's last convs
        keep = QuantizeConfig(args.calibration_images, keep=HEAD_LAST_CONVS)
        qmodels["int8_head_fp"] = quantize(copy.deepcopy(model), batches, keep)
        _record(result, "int8_head_fp", qmodels["int8_head_fp"], config, state, args)
    best = "int8_head_fp" if "int8_head_fp" in qmodels else "int8"
    if args.ort_images > 0:
        with tempfile.TemporaryDirectory() as tmp:
            sub = subset_annotations(args.annotations, args.ort_images, Path(tmp))
            result["subset_images"] = args.ort_images
            result["subset_fp32_map"] = coco_map(copy.deepcopy(model), config, state, args, None, sub)
            result["subset_int8_torch_map"] = coco_map(qmodels[best], config, state, args, None, sub)
            result["subset_int8_ort_map"] = ort_map(qmodels[best].cpu(), config, args, sub, Path(tmp))
            result["subset_int8_variant"] = best
    result["peer"] = "fp32 mAP (target: int8 drop <= 1.0 point)"
    result["ratio"] = result["int8_map"] / max(result["fp32_map"], 1e-9)
    result["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

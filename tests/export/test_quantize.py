"""INT8 post-training quantization (ModelOpt): seeded calibration, fake-quantised model, Q/DQ ONNX.

CPU-sized: a tiny network on synthetic images; the mAP comparison on a real checkpoint is
benchmarks/bench_int8.py (GPU). Skipped when nvidia-modelopt (the ``quantize`` extra) is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from retinaflow.config import Config, DataConfig
from retinaflow.export.quantize import (
    HEAD_LAST_CONVS,
    CalibrationError,
    QuantizeConfig,
    calibration_batches,
    count_qdq,
    export_qdq_onnx,
    quantize,
)
from retinaflow.model.retinanet import build_model

pytest.importorskip(
    "modelopt.torch.quantization", reason="needs nvidia-modelopt (pip install 'retinaflow[quantize]')"
)

DATA = DataConfig(resize=128, max_size=128, pad_stride=128)


def tiny_model() -> torch.nn.Module:
    cfg = Config()
    m = cfg.model
    m.backbone, m.num_classes, m.fpn_channels, m.head_convs = "resnet18", 3, 32, 1
    torch.manual_seed(0)
    return build_model(cfg.model).eval()


def test_calibration_draw_is_seeded_and_refuses_a_short_set(synth_small):
    a = calibration_batches(
        synth_small.train_images, synth_small.train_annotations, DATA, QuantizeConfig(5, 1, 2)
    )
    b = calibration_batches(
        synth_small.train_images, synth_small.train_annotations, DATA, QuantizeConfig(5, 1, 2)
    )
    assert [x.shape[0] for x in a] == [2, 2, 1] and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert a[0].dtype == torch.float32 and a[0].shape[-2:] == (128, 128)
    with pytest.raises(CalibrationError, match="asks for 1000 images"):
        calibration_batches(
            synth_small.train_images, synth_small.train_annotations, DATA, QuantizeConfig(1000)
        )


def test_quantized_model_and_its_qdq_onnx(synth_small, tmp_path):
    import onnxruntime as ort

    batches = calibration_batches(
        synth_small.train_images, synth_small.train_annotations, DATA, QuantizeConfig(4)
    )
    model = tiny_model()
    images = batches[0][:2]
    with torch.no_grad():
        fp32 = model(images)
    qmodel = quantize(model, batches, QuantizeConfig(keep=HEAD_LAST_CONVS))
    assert not qmodel.head.cls_logits.input_quantizer.is_enabled  # kept in floating point
    assert qmodel.head.cls_subnet[0].input_quantizer.is_enabled
    with torch.no_grad():
        int8 = qmodel(images)
    for k, bound in ((0, 0.05), (1, 0.3)):  # (a): close to float (random weights: the box maps are tiny)
        ref, got = (torch.cat([t.flatten() for t in out[k]]) for out in (fp32, int8))
        rel = float((ref - got).norm() / ref.norm())
        assert 0 < rel < bound, (k, rel)  # quantized, and not far off

    path = export_qdq_onnx(qmodel, tmp_path / "int8.onnx", 128, 128)  # (b): explicit Q/DQ graph
    assert count_qdq(path) > 20
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"images": images.numpy()})
    # ONNX Runtime's int8 arithmetic rounds a few values to the neighbouring step: compare in norm.
    got = np.concatenate([o.ravel() for o in out])
    ref = torch.cat([t.flatten() for t in [*int8[0], *int8[1]]]).numpy()
    assert np.linalg.norm(got - ref) < 0.02 * np.linalg.norm(ref)

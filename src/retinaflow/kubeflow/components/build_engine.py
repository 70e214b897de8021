"""build_engine: the ONNX model → TensorRT engine, the checkpoint → AOTInductor .pt2 engine; each skipped,
with the reason recorded, where it cannot be built (no TensorRT; no GPU)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from retinaflow.kubeflow import images as image_tags


@dsl.component(base_image=image_tags.GPU_IMAGE, install_kfp_package=False)
def build_engine(
    model: Input[Model], onnx_model: Input[Model], enabled: bool, precision: str, engine: Output[Artifact]
) -> NamedTuple("EngineOutputs", [("built", bool), ("reason", str)]):  # type: ignore[valid-type]  # KFP output syntax
    """Build a TensorRT engine (``precision``: fp32, fp16, int8) from the exported ONNX model.

    The artifact is a folder with ``build.json`` (``built``, ``reason``) and, when built, the
    engine ``model.plan``. Where TensorRT (or retinaflow's TensorRT export) is not installed,
    or ``enabled`` is False, nothing is built: ``built`` is False and ``reason`` says why.
    The folder also gets ``model.pt2`` (on a GPU node) and ``engines.json`` recording it or why not.
    """
    from retinaflow.kubeflow.steps.engines import build_engines

    result = build_engines(model.path, onnx_model.path, engine.path, enabled=enabled, precision=precision)
    engine.metadata.update(result.metadata())
    return (result.built, result.reason)

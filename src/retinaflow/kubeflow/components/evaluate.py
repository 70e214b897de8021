"""evaluate: COCO mAP of the PyTorch and the ONNX model on the validation set → Metrics + MLflow."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output

from retinaflow.kubeflow import images as image_tags


@dsl.component(base_image=image_tags.GPU_IMAGE, install_kfp_package=False)
def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    onnx_model: Input[Model],
    engine: Input[Artifact],
    max_export_drop: float,
    mlflow_run_id: str,
    metrics: Output[Metrics],
    onnx_metrics: Output[Metrics],
    report: Output[Artifact],
) -> NamedTuple("EvalOutputs", [("map", float), ("onnx_map", float)]):  # type: ignore[valid-type]  # KFP output syntax
    """Evaluate both models on the validation split; fail when the export lost too much.

    ``metrics`` gets the 12 COCO statistics of the PyTorch model, ``onnx_metrics`` those of the
    ONNX model run through ONNX Runtime. The step raises (and so fails) when the ONNX mAP is more
    than ``max_export_drop`` (absolute AP) below the PyTorch mAP. With ``mlflow_run_id`` the
    statistics and the report are also logged to that MLflow run. Every engine that build_engine built
    (``engine``: the .pt2 on GPU nodes) is evaluated too and held to the same bound.
    """
    from retinaflow.kubeflow.steps.evaluation import evaluate_models

    summary = evaluate_models(
        dataset.path, model.path, onnx_model.path, report.path, max_export_drop, mlflow_run_id, engine.path
    )
    for name, value in summary.pytorch.items():
        metrics.log_metric(name, value)
    for name, value in summary.onnx.items():
        onnx_metrics.log_metric(name, value)
    report.metadata.update(summary.metadata())
    return (summary.map, summary.onnx_map)

"""register: a model version in the MLflow registry (alias challenger), then the promotion gate."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model

from retinaflow.kubeflow import images as image_tags


@dsl.component(base_image=image_tags.CPU_IMAGE, install_kfp_package=False)
def register(
    dataset: Input[Dataset],
    model: Input[Model],
    onnx_model: Input[Model],
    engine: Input[Artifact],
    report: Input[Artifact],
    model_name: str,
    mlflow_run_id: str,
    min_gain: float,
    max_latency_regression: float,
    first_champion_min_map: float,
) -> NamedTuple("RegisterOutputs", [("version", str), ("promoted", bool), ("decision", str)]):  # type: ignore[valid-type]  # KFP output syntax
    """Register checkpoint, ONNX (and the engine when built) under ``model_name``; gate promotion.

    The new version gets the alias ``challenger``; ``champion`` moves to it only when its mAP beats
    the current champion's by ``min_gain`` and its latency does not regress by more than
    ``max_latency_regression``; with no champion yet, when its mAP is above ``first_champion_min_map``
    (see ``retinaflow registry promote``).
    """
    from retinaflow.kubeflow.steps.registration import RegisterRequest, register_and_promote

    outcome = register_and_promote(
        RegisterRequest(
            dataset_dir=dataset.path,
            checkpoint=model.path,
            onnx_dir=onnx_model.path,
            engine_dir=engine.path,
            report_dir=report.path,
            model_name=model_name,
            mlflow_run_id=mlflow_run_id,
            min_gain=min_gain,
            max_latency_regression=max_latency_regression,
            first_champion_min_map=first_champion_min_map,
        )
    )
    return (outcome.version, outcome.promoted, outcome.decision)

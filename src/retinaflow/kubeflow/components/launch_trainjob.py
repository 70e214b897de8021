"""launch_trainjob: training past one node, as a Kubeflow Trainer TrainJob → Model artifact."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from retinaflow.kubeflow import images as image_tags


@dsl.component(base_image=image_tags.CPU_IMAGE, install_kfp_package=False)
def launch_trainjob(
    dataset: Input[Dataset],
    backbone: str,
    iters: int,
    batch: int,
    lr: float,
    precision: str,
    resize: int,
    max_size: int,
    nodes: int,
    gpus: int,
    val_every: int,
    checkpoint_every: int,
    backbone_weights: str,
    overrides: list[str],
    train_env: list[str],
    checkpoint_root: str,
    experiment: str,
    run_name: str,
    namespace: str,
    s3_secret: str,
    mlflow_secret: str,
    model: Output[Model],
) -> NamedTuple("TrainOutputs", [("mlflow_run_id", str), ("iterations", int)]):  # type: ignore[valid-type]  # KFP output syntax
    """Create a TrainJob (``torch-distributed`` runtime) of ``nodes`` x ``gpus`` workers, wait for it.

    The workers run the same ``retinaflow train`` command as the single-pod ``train`` component
    under ``torchrun``; the checkpoint goes to ``checkpoint_root`` (must be ``s3://``), from where
    it is copied into the Model artifact once the job succeeded. A failed job fails this step.
    """
    from retinaflow.kubeflow.steps.common import request_from
    from retinaflow.kubeflow.steps.training import TrainRequest
    from retinaflow.kubeflow.trainjob import TrainJobRequest, run_trainjob

    req = TrainJobRequest(
        train=request_from(TrainRequest, locals()),
        nodes=nodes,
        namespace=namespace,
        s3_secret=s3_secret,
        mlflow_secret=mlflow_secret,
    )
    result = run_trainjob(req, dataset.path, model.path)
    model.metadata.update(result.metadata())
    return (result.mlflow_run_id, result.iterations)

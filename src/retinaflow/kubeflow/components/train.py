"""train: ``torchrun`` over the pod's GPUs, resuming from its durable checkpoint → Model artifact."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Input, Model, Output

from retinaflow.kubeflow import images as image_tags


@dsl.component(base_image=image_tags.GPU_IMAGE, install_kfp_package=False)
def train(
    dataset: Input[Dataset],
    backbone: str,
    iters: int,
    batch: int,
    lr: float,
    precision: str,
    resize: int,
    max_size: int,
    gpus: int,
    val_every: int,
    checkpoint_every: int,
    backbone_weights: str,
    overrides: list[str],
    train_env: list[str],
    checkpoint_root: str,
    experiment: str,
    run_name: str,
    model: Output[Model],
) -> NamedTuple("TrainOutputs", [("mlflow_run_id", str), ("iterations", int)]):  # type: ignore[valid-type]  # KFP output syntax
    """Train a RetinaNet on the prepared dataset with ``retinaflow train``.

    ``gpus`` > 0 launches ``torchrun --nproc-per-node gpus``; 0 trains on the CPU in one process.
    The checkpoint lives at ``{checkpoint_root}/{run_name}/model.pth`` (``s3://`` on a cluster), so
    a retried pod resumes where the previous one stopped. ``overrides`` are ``section.key=value``
    config overrides; ``train_env`` (``KEY=VALUE``) is added to the training processes' environment.
    With ``MLFLOW_TRACKING_URI`` set (or the embedded store), the run is tracked
    in ``experiment``; its id is returned for the later steps.
    """
    from retinaflow.kubeflow.steps.common import request_from
    from retinaflow.kubeflow.steps.training import TrainRequest, run_training

    result = run_training(request_from(TrainRequest, locals()), dataset.path, model.path)
    model.metadata.update(result.metadata())
    return (result.mlflow_run_id, result.iterations)

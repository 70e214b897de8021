"""The training DAG: data_prep → train (one pod, or a Trainer job past one node) → export_onnx →
build_engine (TensorRT, .pt2) → evaluate (PyTorch, ONNX and engine mAP, export-drop gate) → register
(promotion gate).

Compiled with ``retinaflow pipeline compile``; the compiled YAML is checked in under ``pipelines/``.
Kubernetes specifics (GPU requests, node selector, tolerations, ``/dev/shm``, Secrets) come from
kfp-kubernetes and are ignored by ``kfp.local``, so the same DAG runs on this machine.
"""

from dataclasses import fields

from kfp import dsl, kubernetes
from kfp.dsl import PipelineTask

from retinaflow.kubeflow.cluster import GPU_NODE_LABEL, GPU_RESOURCE, MLFLOW_KEYS, S3_KEYS, SHM_SIZE
from retinaflow.kubeflow.components import (
    build_engine,
    data_prep,
    evaluate,
    export_onnx,
    launch_trainjob,
    register,
    train,
)
from retinaflow.kubeflow.steps.training import TrainRequest

PIPELINE_NAME = "retinaflow-train"
#: The train components' inputs that are pipeline parameters of the same name (all but run_name).
TRAIN_INPUTS = [f.name for f in fields(TrainRequest) if f.name != "run_name"]
TRAIN_RETRIES = 3


def _with_secrets(task: PipelineTask, s3_secret: str, mlflow_secret: str) -> PipelineTask:
    for secret, keys in ((s3_secret, S3_KEYS), (mlflow_secret, MLFLOW_KEYS)):
        kubernetes.use_secret_as_env(task, secret_name=secret, secret_key_to_env={k: k for k in keys})
    return task


def _on_gpu_nodes(task: PipelineTask, gpus) -> PipelineTask:
    task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
    kubernetes.add_node_selector(task, label_key=GPU_NODE_LABEL[0], label_value=GPU_NODE_LABEL[1])
    kubernetes.add_toleration(task, key=GPU_RESOURCE, operator="Exists", effect="NoSchedule")
    return task


def _package_and_register(prep, trained, opts: dict) -> None:
    """export → engine → evaluate → register after either training branch (kfp.local has no OneOf)."""
    exported = export_onnx(model=trained.outputs["model"], opset=opts["opset"], size=opts["size"])
    exported.set_display_name("export-onnx").set_caching_options(False)
    engine = build_engine(
        model=trained.outputs["model"],
        onnx_model=exported.outputs["onnx_model"],
        enabled=opts["engine"],
        precision=opts["engine_precision"],
    )
    _on_gpu_nodes(engine, 1).set_display_name("build-engine").set_caching_options(False)
    evaluated = evaluate(
        dataset=prep.outputs["dataset"],
        model=trained.outputs["model"],
        onnx_model=exported.outputs["onnx_model"],
        engine=engine.outputs["engine"],
        max_export_drop=opts["max_export_drop"],
        mlflow_run_id=trained.outputs["mlflow_run_id"],
    )
    _with_secrets(_on_gpu_nodes(evaluated, 1), opts["s3_secret"], opts["mlflow_secret"])
    evaluated.set_caching_options(False)
    registered = register(
        dataset=prep.outputs["dataset"],
        model=trained.outputs["model"],
        onnx_model=exported.outputs["onnx_model"],
        engine=engine.outputs["engine"],
        report=evaluated.outputs["report"],
        model_name=opts["model_name"],
        mlflow_run_id=trained.outputs["mlflow_run_id"],
        min_gain=opts["min_gain"],
        max_latency_regression=opts["max_latency_regression"],
        first_champion_min_map=opts["first_champion_min_map"],
    )
    _with_secrets(registered, opts["s3_secret"], opts["mlflow_secret"]).set_caching_options(False)


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Train, evaluate, export and register a RetinaNet/FPN detector (retinaflow).",
)
def retinaflow_pipeline(
    images: str,
    annotations: str,
    val_images: str = "",
    val_annotations: str = "",
    val_fraction: float = 0.1,
    classes: list[str] = [],  # noqa: B006  (KFP reads the default from the signature)
    backbone: str = "resnet50",
    iters: int = 90000,
    batch: int = 16,
    lr: float = 5e-4,
    precision: str = "auto",
    resize: int = 800,
    max_size: int = 1333,
    gpus: int = 1,
    nodes: int = 1,
    val_every: int = 0,
    checkpoint_every: int = 1000,
    backbone_weights: str = "",
    overrides: list[str] = [],  # noqa: B006
    train_env: list[str] = [],  # noqa: B006
    checkpoint_root: str = "",
    stage_uri: str = "",
    experiment: str = "retinaflow",
    model_name: str = "retinaflow",
    max_export_drop: float = 0.005,
    min_gain: float = 0.005,
    max_latency_regression: float = 0.1,
    first_champion_min_map: float = 0.0,
    export_opset: int = 17,
    export_size: int = 0,
    build_trt_engine: bool = True,
    engine_precision: str = "fp16",
    seed: int = 0,
    namespace: str = "kubeflow",
    s3_secret: str = "retinaflow-s3",
    mlflow_secret: str = "retinaflow-mlflow",
):
    """See ``pipelines/README.md`` for every parameter; ``nodes`` > 1 trains through Kubeflow Trainer.

    The parameters are spelled out because KFP builds the pipeline's interface from this signature; the
    config settings among them are named as their config key (``iters`` is ``train.iters``).
    """
    params = locals()
    prep = data_prep(
        images=images,
        annotations=annotations,
        val_images=val_images,
        val_annotations=val_annotations,
        val_fraction=val_fraction,
        seed=seed,
        classes=classes,
        stage_uri=stage_uri,
    )
    _with_secrets(prep, s3_secret, mlflow_secret).set_display_name("data-prep").set_caching_options(False)
    train_args = {name: params[name] for name in TRAIN_INPUTS}  # TrainRequest's fields, by name
    train_args.update(dataset=prep.outputs["dataset"], run_name=dsl.PIPELINE_JOB_NAME_PLACEHOLDER)
    opts = dict(
        opset=export_opset,
        size=export_size,
        max_export_drop=max_export_drop,
        engine=build_trt_engine,
        engine_precision=engine_precision,
        model_name=model_name,
        min_gain=min_gain,
        max_latency_regression=max_latency_regression,
        first_champion_min_map=first_champion_min_map,
        s3_secret=s3_secret,
        mlflow_secret=mlflow_secret,
    )
    with dsl.If(nodes > 1, name="multi-node"):
        launched = launch_trainjob(
            **train_args, nodes=nodes, namespace=namespace, s3_secret=s3_secret, mlflow_secret=mlflow_secret
        )
        _with_secrets(launched, s3_secret, mlflow_secret).set_display_name("train-trainjob")
        launched.set_caching_options(False)
        _package_and_register(prep, launched, opts)
    with dsl.Else(name="single-node"):
        trained = train(**train_args)
        _with_secrets(_on_gpu_nodes(trained, gpus), s3_secret, mlflow_secret)
        kubernetes.empty_dir_mount(
            trained, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=SHM_SIZE
        )
        trained.set_retry(num_retries=TRAIN_RETRIES, backoff_duration="60s", backoff_factor=2.0)
        trained.set_caching_options(False)
        _package_and_register(prep, trained, opts)

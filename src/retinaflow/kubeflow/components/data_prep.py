"""data_prep: validate a COCO dataset, split it if asked, fingerprint it, stage it → Dataset artifact."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Dataset, Output

from retinaflow.kubeflow import images as image_tags


@dsl.component(base_image=image_tags.CPU_IMAGE, install_kfp_package=False)
def data_prep(
    images: str,
    annotations: str,
    val_images: str,
    val_annotations: str,
    val_fraction: float,
    seed: int,
    classes: list[str],
    stage_uri: str,
    dataset: Output[Dataset],
) -> NamedTuple("DataPrepOutputs", [("fingerprint", str), ("num_train", int), ("num_val", int)]):  # type: ignore[valid-type]  # KFP output syntax
    """Validate (drop and count bad entries), optionally split train/val, fingerprint and stage.

    ``images``/``annotations`` are a folder and a COCO JSON, local or ``s3://``. Without a validation
    set, ``val_fraction`` of the images is split off with ``seed``. ``classes`` (may be empty) lists
    the category names to keep. With ``stage_uri`` (``s3://bucket/prefix``) the cleaned dataset is
    uploaded under ``{stage_uri}/{fingerprint}/``. The artifact is a folder holding ``dataset.json``
    (the manifest later steps read), the cleaned annotations and the validation report.
    """
    from retinaflow.kubeflow.steps.common import request_from
    from retinaflow.kubeflow.steps.data import DataPrepRequest, prepare_dataset

    manifest = prepare_dataset(request_from(DataPrepRequest, locals()), dataset.path)
    dataset.metadata.update(manifest.metadata())
    return (manifest.fingerprint, manifest.num_train, manifest.num_val)

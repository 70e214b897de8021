"""export_onnx: the trained checkpoint → ONNX model artifact (checker + ONNX Runtime parity)."""

from kfp import dsl
from kfp.dsl import Input, Model, Output

from retinaflow.kubeflow import images as image_tags


@dsl.component(base_image=image_tags.GPU_IMAGE, install_kfp_package=False)
def export_onnx(model: Input[Model], opset: int, size: int, onnx_model: Output[Model]):
    """Export ``model`` to ONNX at ``size`` x ``size`` (0: the padded training ``max_size``)."""
    from retinaflow.kubeflow.steps.packaging import export_model

    exported = export_model(model.path, onnx_model.path, opset=opset, size=size)
    onnx_model.metadata.update(exported.metadata())

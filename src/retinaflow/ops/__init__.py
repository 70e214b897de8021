"""Detection ops (decode, NMS, anchor matching) as ``torch.ops.retinaflow`` operators.

Importing this package registers the operators (:mod:`._library`: schema, CPU = the PyTorch reference,
fake); their CUDA kernels load on the first CUDA tensor (:mod:`._ext`). Public wrappers:
:mod:`.boxes` (``decode_detections``, ``batched_nms``, ``postprocess`` -> :class:`.detections.Detections`)
and :mod:`.matching` (``match_anchors``).
"""

from retinaflow.ops import _library  # noqa: F401  (registers the operators)

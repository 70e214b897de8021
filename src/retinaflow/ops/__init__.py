"""Post-processing ops (decode, NMS) with CUDA kernels and a pure-PyTorch reference.

Use :mod:`retinaflow.ops.boxes` (``decode``, ``nms``, ``postprocess``) and
:class:`retinaflow.ops.detections.Detections`; the CUDA kernels build on first use (``_ext``).
"""

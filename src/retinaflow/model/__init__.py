"""retinaflow.model: the RetinaNet detector network and its training targets.

backbones.py (registry of torchvision backbones -> C3..C5) · fpn.py (P3..P7) · head.py (shared subnets)
· retinanet.py (``build_model``, ``RetinaNet``, ``flatten_outputs``) · anchors.py (``generate_anchors``)
· box_coder.py (``encode``) · loss.py (``detection_loss``; matching: ``retinaflow.ops.matching``).
Submodules are imported explicitly (``from retinaflow.model.retinanet import build_model``) so that
``import retinaflow.model`` stays cheap.
"""

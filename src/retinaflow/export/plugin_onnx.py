"""Plugin-flavour ONNX: the network graph plus ``retinaflow.Decode`` and ``retinaflow.NMS`` nodes.

The graph takes ``images: (batch, 3, H, W) float32`` RGB 0..255 and ``sizes: (batch, 2) int32`` (height,
width of each unpadded image) and returns fixed-size detections: ``scores (batch, D) float32``,
``boxes (batch, D, 4) float32`` x1y1x2y2 in input pixels, ``classes (batch, D) int32`` (-1 = padding) and
``counts (batch,) int32`` with ``D = max_det``. The network part is the graph of
:func:`retinaflow.export.onnx.export_onnx`, unchanged; the anchors are constants of the graph (the
input size is fixed).

The two nodes are the TensorRT plugins of ``kernels/tensorrt`` (IPluginV3 ``retinaflow::Decode`` and
``retinaflow::NMS``, version 1): TensorRT's ONNX parser finds a plugin by the node's ``op_type`` and its
``plugin_namespace`` / ``plugin_version`` attributes and passes the other attributes as the plugin's
fields, so those attributes are exactly the fields of ``kernels/tensorrt/plugin_core.cpp`` (a test
compares the two).
Their semantics are the PyTorch ops' (:mod:`retinaflow.ops.boxes`); ONNX Runtime runs the graph with
Python implementations of the nodes (:mod:`retinaflow.export.plugin_ort`).
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retinaflow.config import Config, ExportConfig, InferConfig
from retinaflow.errors import MissingDependency, RetinaflowError

log = logging.getLogger(__name__)

DOMAIN = "retinaflow"
PLUGIN_NAMESPACE = "retinaflow"
PLUGIN_VERSION = "1"
DECODE_OP = "Decode"
NMS_OP = "NMS"
MAX_LEVELS = 8
# Attributes TensorRT's ONNX parser reads to find the plugin; they are not plugin fields.
PARSER_ATTRIBUTES = ("plugin_namespace", "plugin_version")
GRAPH_INPUTS = ("images", "sizes")
GRAPH_OUTPUTS = ("scores", "boxes", "classes", "counts")
DEFAULT_CAPACITY = 0  # the decode kernel's fast-path candidates per (image, level); <= 0: its default


class MissingPluginNodes(RetinaflowError):
    """An ONNX file given where a plugin-flavour graph is expected lacks the Decode/NMS nodes."""

    exit_code = 2


@dataclass(frozen=True)
class NodeSpec:
    """A plugin node's contract: fields (name, type) in order, tensor names in TensorRT's order."""

    fields: tuple[tuple[str, str], ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


DECODE = NodeSpec(
    fields=(("score_thresh", "float32"), ("top_n", "int32"), ("capacity", "int32")),
    inputs=(),  # per level: see decode_input_names
    outputs=("scores", "boxes", "classes"),
)
NMS = NodeSpec(
    fields=(("iou_threshold", "float32"), ("max_det", "int32")),
    inputs=("scores", "boxes", "classes"),
    outputs=("scores", "boxes", "classes", "counts"),
)


def decode_input_names(levels: int) -> list[str]:
    """Decode's inputs for ``levels`` pyramid levels: class heads, box heads, anchor sets, then sizes."""
    return [f"{kind}_{level}" for kind in ("cls", "box", "anchors") for level in range(levels)] + ["sizes"]


def export_plugin_onnx(
    checkpoint: str | Path,
    output: str | Path,
    cfg: ExportConfig | None = None,
    infer: InferConfig | None = None,
) -> Path:
    """Export ``checkpoint`` to ``output`` (.onnx) with the post-processing as plugin nodes.

    The network is exported and parity-checked by :func:`retinaflow.export.onnx.export_onnx`; ``infer``
    (default: the checkpoint's inference settings) gives score_thresh, top_n, nms_iou and max_det.
    """
    onnx = _onnx()
    from retinaflow.engine.checkpoint import load_checkpoint
    from retinaflow.export.onnx import export_onnx
    from retinaflow.export.spec import resolve
    from retinaflow.model.anchors import generate_anchors

    config = Config.from_dict(load_checkpoint(checkpoint)["config"])
    cfg = dataclasses.replace(cfg or ExportConfig(), postprocess=False)  # the plugins post-process
    spec = resolve(output, cfg, config, fmt="onnx")
    cfg.height, cfg.width = spec.height, spec.width
    infer = infer or config.infer
    with tempfile.TemporaryDirectory() as tmp:
        network = onnx.load(str(export_onnx(checkpoint, Path(tmp) / "network.onnx", cfg)))
    anchors = generate_anchors(config.model.anchors, (cfg.height, cfg.width), "cpu", torch.float32)
    model = add_postprocess(network, anchors, infer)
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(out))
    onnx.checker.check_model(str(out))
    log.info("exported %s with %s.%s and %s.%s plugin nodes", out, DOMAIN, DECODE_OP, DOMAIN, NMS_OP)
    return out


def add_postprocess(
    network: Any, anchors: list[torch.Tensor], infer: InferConfig, capacity: int = DEFAULT_CAPACITY
) -> Any:
    """Append Decode + NMS to a network-only ModelProto (outputs ``cls_*`` then ``box_*``); returns it.

    anchors: per level (H_l*W_l*A, 4) float32 for the graph's fixed input size.
    """
    onnx = _onnx()
    from onnx import TensorProto, helper, numpy_helper

    graph = network.graph
    heads = [o.name for o in graph.output]
    levels = len(heads) // 2
    if len(heads) != 2 * levels or levels != len(anchors) or not 1 <= levels <= MAX_LEVELS:
        raise MissingPluginNodes(
            f"expected a network-only graph with 2 x {len(anchors)} head outputs, got {heads}"
        )
    anchor_names = [f"anchors_{h.split('_', 1)[1]}" for h in heads[:levels]]
    for name, a in zip(anchor_names, anchors, strict=True):
        graph.initializer.append(numpy_helper.from_array(a.float().contiguous().numpy(), name))
    graph.input.append(helper.make_tensor_value_info("sizes", TensorProto.INT32, ["batch", 2]))
    decoded = ["decoded_scores", "decoded_boxes", "decoded_classes"]
    ident = {"plugin_namespace": PLUGIN_NAMESPACE, "plugin_version": PLUGIN_VERSION}
    graph.node.append(
        helper.make_node(
            DECODE_OP,
            [*heads, *anchor_names, "sizes"],
            decoded,
            name="retinaflow_decode",
            domain=DOMAIN,
            score_thresh=float(infer.score_thresh),
            top_n=int(infer.top_n),
            capacity=int(capacity),
            **ident,
        )
    )
    graph.node.append(
        helper.make_node(
            NMS_OP,
            decoded,
            list(GRAPH_OUTPUTS),
            name="retinaflow_nms",
            domain=DOMAIN,
            iou_threshold=float(infer.nms_iou),
            max_det=int(infer.max_det),
            **ident,
        )
    )
    d = int(infer.max_det)
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", d]),
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["batch", d, 4]),
            helper.make_tensor_value_info("classes", TensorProto.INT32, ["batch", d]),
            helper.make_tensor_value_info("counts", TensorProto.INT32, ["batch"]),
        ]
    )
    network.opset_import.append(onnx.helper.make_opsetid(DOMAIN, 1))
    return network


def find_plugin_nodes(model: Any) -> tuple[Any, Any]:
    """The (Decode, NMS) nodes of a plugin-flavour ModelProto; MissingPluginNodes if absent or miswired."""
    nodes = {(n.domain, n.op_type): n for n in model.graph.node}
    decode, nms = nodes.get((DOMAIN, DECODE_OP)), nodes.get((DOMAIN, NMS_OP))
    if decode is None or nms is None:
        raise MissingPluginNodes(
            f"ONNX graph has no {DOMAIN}.{DECODE_OP} / {DOMAIN}.{NMS_OP} nodes: export it with "
            "retinaflow.export.plugin_onnx.export_plugin_onnx (a network-only ONNX cannot become a .plan)"
        )
    outputs = [o.name for o in model.graph.output][: len(GRAPH_OUTPUTS)]
    if list(nms.input) != list(decode.output) or outputs != list(GRAPH_OUTPUTS):
        raise MissingPluginNodes(
            f"{DOMAIN}.{NMS_OP} must consume {DECODE_OP}'s outputs and give {GRAPH_OUTPUTS}"
        )
    return decode, nms


def node_fields(node: Any) -> dict[str, float | int]:
    """A plugin node's fields (its attributes less the parser's plugin_namespace / plugin_version)."""
    from onnx import helper

    return {a.name: helper.get_attribute_value(a) for a in node.attribute if a.name not in PARSER_ATTRIBUTES}


def _onnx() -> Any:
    try:
        import onnx
    except ImportError as exc:
        raise MissingDependency("plugin ONNX export needs onnx: pip install 'retinaflow[onnx]'") from exc
    return onnx

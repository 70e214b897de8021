"""The pipeline's KFP v2 components, one module each.

Every component body maps its inputs onto one function of :mod:`retinaflow.kubeflow.steps` (which
calls the library) and records the outputs; there is no logic here. A step's request dataclass is
filled with ``request_from(Request, locals())`` (every field from the input of the same name), so
its field list is written once; the signature itself stays explicit, as KFP needs (KFP builds the
component's interface from the signature at decoration time, and ships the function's source text to
the container: a generated signature would reach neither). Config settings keep their config key's
name (``iters``, ``checkpoint_every``: ``retinaflow.flags``). The modules do not use
``from __future__ import annotations``: KFP reads the annotations at decoration time to build
the component interface, and string annotations break that.
"""

from retinaflow.kubeflow.components.build_engine import build_engine
from retinaflow.kubeflow.components.data_prep import data_prep
from retinaflow.kubeflow.components.evaluate import evaluate
from retinaflow.kubeflow.components.export_onnx import export_onnx
from retinaflow.kubeflow.components.launch_trainjob import launch_trainjob
from retinaflow.kubeflow.components.register import register
from retinaflow.kubeflow.components.train import train

ALL_COMPONENTS = {
    "data_prep": data_prep,
    "train": train,
    "launch_trainjob": launch_trainjob,
    "export_onnx": export_onnx,
    "evaluate": evaluate,
    "build_engine": build_engine,
    "register": register,
}

__all__ = [
    "ALL_COMPONENTS",
    "build_engine",
    "data_prep",
    "evaluate",
    "export_onnx",
    "launch_trainjob",
    "register",
    "train",
]

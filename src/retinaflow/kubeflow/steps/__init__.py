"""What the components run: each function maps one component's inputs onto retinaflow library calls.

No kfp import here, so every step is testable as a plain function; the component bodies in
:mod:`retinaflow.kubeflow.components` only call these and record the outputs.
"""

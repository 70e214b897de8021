"""retinaflow.ops."""

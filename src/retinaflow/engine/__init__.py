"""retinaflow.engine."""

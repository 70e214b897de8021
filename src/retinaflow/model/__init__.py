"""retinaflow.model."""

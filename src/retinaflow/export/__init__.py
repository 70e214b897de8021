"""retinaflow.export."""

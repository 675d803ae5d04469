"""DAB-DETR for detectron2."""
__version__ = "0.1.0"

from setuptools import find_packages, setup

setup(
    name="dab_detr",
    version="0.1.0",
    description="DAB-DETR (Dynamic Anchor Boxes are Better Queries for DETR) for detectron2",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["dab_detr", "dab_detr.*"]),
    python_requires=">=3.9",
    # detectron2 is not listed: it has no official PyPI release (see README "Install").
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "numpy",
        "scipy",
        "fvcore",
        "iopath<0.1.11",
        "pycocotools",
        "omegaconf",
        "hydra-core",
        "matplotlib",
        "pillow",
        "opencv-python-headless",
        "faster-coco-eval",
        "safetensors",
    ],
    extras_require={
        "test": ["pytest", "transformers>=4.48", "timm"],
        # tools/export_model.py (onnx, onnxscript: torch.onnx's exporter) and tools/onnx_infer.py (onnxruntime)
        "export": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.2"],
    },
)

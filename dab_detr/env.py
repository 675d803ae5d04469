"""`python -m dab_detr.env`: print which torch / detectron2 this environment uses, and from where."""
import os
import sys


def collect_env() -> str:
    import torch
    import detectron2

    lines = [
        f"python       {sys.version.split()[0]} ({sys.executable})",
        f"torch        {torch.__version__} (cuda available: {torch.cuda.is_available()})",
        f"detectron2   {detectron2.__version__} from {os.path.dirname(detectron2.__file__)}",
    ]
    try:
        from detectron2 import _C  # noqa: F401

        lines.append("detectron2   compiled ops: available")
    except ImportError:
        lines.append("detectron2   compiled ops: not built (pure-Python fallbacks; DAB-DETR needs none)")
    import dab_detr

    lines.append(f"dab_detr     {dab_detr.__version__} from {os.path.dirname(dab_detr.__file__)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(collect_env())

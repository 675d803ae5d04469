import subprocess
import sys


def test_package_imports_with_detectron2_and_reports_versions():
    out = subprocess.run(
        [sys.executable, "-m", "dab_detr.env"], check=True, capture_output=True, text=True
    ).stdout
    for name in ("torch", "detectron2", "dab_detr"):
        assert name in out


def test_meta_arch_is_registered():
    import dab_detr  # noqa: F401  (registration happens on import)
    from detectron2.modeling import META_ARCH_REGISTRY

    assert "DABDETR" in META_ARCH_REGISTRY

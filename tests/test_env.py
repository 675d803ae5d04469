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


def test_importing_the_package_changes_nothing_in_detectron2_but_its_registry():
    code = (
        "from detectron2.data import DatasetCatalog\n"
        "from detectron2.evaluation import coco_evaluation\n"
        "before = (set(DatasetCatalog.list()), coco_evaluation.COCOeval_opt)\n"
        "import dab_detr\n"
        "after = (set(DatasetCatalog.list()), coco_evaluation.COCOeval_opt)\n"
        "assert before == after, (after[0] - before[0], after[1])\n"
        "dab_detr.register_synthetic_dataset()\n"
        "assert {'dab_synthetic_train', 'dab_synthetic_val'} <= set(DatasetCatalog.list())\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

"""Run our command-line tools without importing a `tools` package (detectron2's wheel ships one of its own)."""
import importlib.util
import os
import subprocess
import sys

import pytest

from tests.helpers import torch_threads

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def _load_by_path(module_name: str, path: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="session")
def load_tool():
    """`load_tool("demo")` -> tools/demo.py as a module, to call its `main(argv)` in this process."""
    return lambda name: _load_by_path(f"dab_detr_tool_{name}", os.path.join(ROOT, "tools", f"{name}.py"))


@pytest.fixture(scope="session")
def run_tool():
    """`run_tool("demo", *args)` -> CompletedProcess of `python tools/demo.py args` (text, captured), run like a
    user would from the repository root."""
    def run(name, *args):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        return subprocess.run([sys.executable, os.path.join("tools", f"{name}.py"), *map(str, args)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
    return run


@pytest.fixture(scope="session")
def official_reference():
    """tests/checkpoint/official_reference.py (random official state dicts from the reference key lists)."""
    return _load_by_path("official_reference", os.path.join(ROOT, "tests", "checkpoint", "official_reference.py"))

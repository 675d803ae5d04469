"""`keep_freed_memory` (tools/train_net.py on the CPU): freed activation memory is reused without new page faults."""
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Page faults of writing a fresh 8 MiB tensor, the second time (the first one's memory was freed in between).
SCRIPT = """
import resource, torch
from dab_detr.engine import keep_freed_memory
applied = keep_freed_memory()
def faults():
    x = torch.empty(2 << 20)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x.fill_(1.0)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(applied, faults())
"""


def _run(**env):
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=dict(os.environ, PYTHONPATH=ROOT, **env),
                          capture_output=True, text=True, timeout=120, check=True)
    applied, faults = proc.stdout.split()
    return applied == "True", int(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults_and_the_tuning_can_be_turned_off():
    applied, faults = _run()
    assert applied and faults < 64  # 8 MiB of fresh 4 KiB pages would be 2,048 faults
    applied, _ = _run(DAB_DETR_MALLOC_TUNING="0")
    assert not applied

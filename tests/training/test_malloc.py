"""`keep_freed_memory` (tools/train_net.py on the CPU): a training step's freed activation memory is reused by the
next step without new page faults."""
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Page faults of each of 8 "steps" that write and free tensors of 1-16 MiB (46 MiB alive at once). glibc's defaults
# map such blocks anew and, depending on the heap's layout, fault ~10k pages in again on every step; kept freed
# memory settles after the first few steps.
SCRIPT = """
import resource, torch
from dab_detr.engine import keep_freed_memory
applied = keep_freed_memory()
def step():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.empty(n << 18).fill_(1.0) for n in (1, 2, 4, 8, 16, 8, 4, 2, 1)]
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(applied, *[step() for _ in range(8)])
"""


def _run(**env):
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=dict(os.environ, PYTHONPATH=ROOT, **env),
                          capture_output=True, text=True, timeout=120, check=True)
    applied, *faults = proc.stdout.split()
    return applied == "True", [int(f) for f in faults]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults_and_the_tuning_can_be_turned_off():
    applied, faults = _run()
    assert applied and faults[0] > 5000  # the first step faults its ~11.8k pages in
    assert max(faults[3:]) < 64, faults  # later steps reuse them
    applied, _ = _run(DAB_DETR_MALLOC_TUNING="0")
    assert not applied

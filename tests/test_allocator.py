"""medseg.allocator: with freed memory retained, repeated forward passes reuse their pages (no page faults
after the first passes); glibc's default policy faults every large activation map in again."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from medseg import allocator

ROOT = Path(__file__).resolve().parents[1]
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"

# a convolution over a 1024² image: each 16-channel activation map is 64 MiB, over glibc's mmap threshold
_FAULTS = """
import resource, sys, torch
from medseg.allocator import retain_freed_memory
applied = retain_freed_memory(sys.argv[1] == "retain")
torch.set_num_threads(1)
net = torch.nn.Sequential(torch.nn.Conv2d(1, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3)).eval()
x = torch.rand(1, 1, 1024, 1024)
with torch.inference_mode():
    net(x); net(x)
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        net(x)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
"""


def _faults(policy: str) -> tuple[bool, int]:
    proc = subprocess.run(
        [sys.executable, "-c", _FAULTS, policy], capture_output=True, text=True, cwd=ROOT, check=True
    )
    applied, faults = proc.stdout.split()[-2:]
    return applied == "True", int(faults)


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's mallopt")
def test_retained_memory_spares_the_page_faults_of_repeated_passes() -> None:
    retained, released = _faults("retain"), _faults("release")
    assert retained[0] and released[0]
    # three passes allocate 3 x 2 x 64 MiB of activations, faulted in afresh without the policy (tens of
    # thousands of 4-KiB pages; fewer, 2-MiB faults where transparent huge pages are always on)
    assert released[1] > 100, released
    assert retained[1] < released[1] / 20, (retained, released)


def test_without_glibc_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    allocator._glibc.cache_clear()
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    try:
        assert allocator.retain_freed_memory() is False
        assert allocator.retain_freed_memory(False) is False
    finally:
        monkeypatch.undo()
        allocator._glibc.cache_clear()

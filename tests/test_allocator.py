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
faults = []
with torch.inference_mode():
    net(x)
    for _ in range(8):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        net(x)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
print(applied, *faults)
"""


def _faults(policy: str) -> tuple[bool, list[int]]:
    """Whether the policy was applied, and the page faults of each of 8 passes after a first one."""
    proc = subprocess.run(
        [sys.executable, "-c", _FAULTS, policy], capture_output=True, text=True, cwd=ROOT, check=True
    )
    applied, *faults = proc.stdout.split()[-9:]
    return applied == "True", [int(f) for f in faults]


@pytest.mark.skipif(not GLIBC, reason="the policy is glibc's mallopt")
def test_retained_memory_spares_the_page_faults_of_repeated_passes() -> None:
    (retained_ok, retained), (released_ok, released) = _faults("retain"), _faults("release")
    assert retained_ok and released_ok
    # each pass allocates 2 x 64 MiB of activations (and more for the convolutions), faulted in afresh
    # without the policy: tens of thousands of 4-KiB pages, or fewer 2-MiB faults where transparent huge
    # pages are always on
    assert min(released) > 100, released
    # with it, the heap settles within a few passes (how many varies with the interpreter's own small
    # allocations) and a settled pass faults in nothing new
    assert min(retained) < min(released) / 100, (retained, released)
    assert sum(retained) < sum(released) / 5, (retained, released)


def test_without_glibc_nothing_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    allocator._glibc.cache_clear()
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    try:
        assert allocator.retain_freed_memory() is False
        assert allocator.retain_freed_memory(False) is False
    finally:
        monkeypatch.undo()
        allocator._glibc.cache_clear()

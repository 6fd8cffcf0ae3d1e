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


class _RecordingLibc:
    """Stands in for glibc: records the ``mallopt`` calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []
        self.trimmed = False

    def mallopt(self, param: int, value: int) -> int:
        self.calls.append((param, value))
        return 1

    def malloc_trim(self, pad: int) -> int:
        self.trimmed = True
        return 1


@pytest.mark.parametrize(
    "env, mmap_max, trim",
    [
        ({}, 65536, 128 * 1024),
        ({"MALLOC_MMAP_MAX_": "16", "MALLOC_TRIM_THRESHOLD_": "0x200000"}, 16, 2 * 1024 * 1024),
        ({"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.trim_threshold=4194304"}, 65536, 4194304),
        ({"MALLOC_MMAP_MAX_": "16", "GLIBC_TUNABLES": "glibc.malloc.mmap_max=32"}, 32, 128 * 1024),
        ({"MALLOC_MMAP_MAX_": "lots", "MALLOC_TRIM_THRESHOLD_": "-5"}, 65536, 128 * 1024),
    ],
)
def test_lifting_the_policy_restores_the_environments_settings(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], mmap_max: int, trim: int
) -> None:
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    libc = _RecordingLibc()
    monkeypatch.setattr(allocator, "_glibc", lambda: libc)
    assert allocator.retain_freed_memory(True)
    assert libc.calls == [(allocator._M_MMAP_MAX, 0), (allocator._M_TRIM_THRESHOLD, 2**31 - 1)]
    assert not libc.trimmed
    libc.calls.clear()
    assert allocator.retain_freed_memory(False)
    assert libc.calls == [(allocator._M_MMAP_MAX, mmap_max), (allocator._M_TRIM_THRESHOLD, trim)]
    assert libc.trimmed

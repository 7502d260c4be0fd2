"""dydit_lab.memory: freed buffers kept for reuse, checked by the page faults a re-allocation costs
(in a fresh process each, since the setting lasts for the process)."""

import subprocess
import sys

import pytest

from dydit_lab import memory

# Allocate and free a 96 MB tensor (above glibc's largest automatic mmap threshold, 32 MB) six
# times, as a sampling loop does every step: print the minor page faults of the last round (with
# the setting, the first one to three rounds still take fresh pages while the heap settles).
PROBE = """
import sys, torch
from dydit_lab import memory
if sys.argv[1] == "keep":
    assert memory.keep_freed_memory() and memory.freed_memory_kept()
for _ in range(6):
    before = memory.minor_page_faults()
    x = torch.ones(24 * 2**20); del x
print(memory.minor_page_faults() - before)
"""


def reallocation_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_kept_freed_memory_is_reused_without_page_faults():
    pages = 96 * 2**20 // 4096
    assert reallocation_faults("default") > pages // 2  # handed back to the OS, faulted in again
    assert reallocation_faults("keep") < pages // 100  # reused from the heap


def test_bad_limits_are_refused():
    for bad in (0, -1, 2**31):
        with pytest.raises(ValueError, match="up_to_bytes"):
            memory.keep_freed_memory(bad)

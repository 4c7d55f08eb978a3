"""The CPU allocator setting: freed tensor memory stays in the process (measured as page faults)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from ddpm.core.runtime import configure_cpu_allocator

# Allocate, touch and free a 48 MiB tensor (above glibc's largest mmap threshold) and a heap-sized one
# 20 times; print the minor page faults of the last 10 rounds (the first ones may grow the heap).
_PROBE = textwrap.dedent(
    """
    import resource, sys, torch
    from ddpm.core.runtime import configure_cpu_allocator
    if sys.argv[1] == "on":
        assert configure_cpu_allocator(torch.device("cpu"))
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for i in range(20):
        if i == 10:
            start = faults()
        big = torch.ones(12 * 2**20)  # 48 MiB: mmap()ed and munmap()ed with glibc's defaults
        small = torch.ones(2**20)  # 4 MiB: from the heap, trimmed away when it is on top
        del big, small
    print(faults() - start)
    """
)


def _faults_per_round(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, check=True,
                         timeout=300)
    return int(out.stdout.strip()) / 10


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc is Linux-only")
def test_cpu_allocator_keeps_freed_tensors_in_the_process():
    # 52 MiB touched per round = 13,312 pages; the defaults fault them all in again, the setting none of them
    default = _faults_per_round("off")
    tuned = _faults_per_round("on")
    assert default > 10_000, default
    assert tuned < 100, tuned


def test_cpu_allocator_leaves_cuda_runs_alone():
    assert configure_cpu_allocator(torch.device("cuda", 0)) is False
    assert configure_cpu_allocator(torch.device("meta")) is False


_BACKENDS = textwrap.dedent(
    """
    import sys, torch
    from ddpm.core.runtime import configure_backends
    configure_backends(False)
    states = [torch.are_deterministic_algorithms_enabled(), "torch._inductor.config" in sys.modules]
    configure_backends(True)
    states.append(torch.are_deterministic_algorithms_enabled())
    import torch._inductor.config as inductor
    states.append(inductor.deterministic)
    configure_backends(False)
    states += [torch.are_deterministic_algorithms_enabled(), inductor.deterministic]
    print(states)
    """
)


def test_backends_switch_determinism_both_ways_without_importing_the_compiler_for_nothing():
    """Off (the default) costs no import of the inductor compiler (1.5-2.7 s of every stage's start-up), and
    on then off again reaches both torch's and inductor's flag."""
    out = subprocess.run([sys.executable, "-c", _BACKENDS], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == "[False, False, True, True, False, False]".split()

"""Benchmark tests: the peers are tiny here; one torch thread avoids OpenMP spin-waiting
on a shared machine."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # The peers are tiny here; one thread avoids OpenMP spin-waiting on a shared machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

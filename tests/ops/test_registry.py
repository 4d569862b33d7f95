"""Every op against its reference twin, driven by the one registry (tests/ops/registry.py):
each entry × backend × case."""

from __future__ import annotations

import pytest
from registry import REGISTRY, params


@pytest.mark.parametrize("entry,backend,case", params())
def test_op_matches_twin(entry, backend, case, monkeypatch):
    entry.check(entry, backend, case, monkeypatch)


def test_every_public_op_is_registered():
    import fastmaml.ops

    registered = {e.op for e in REGISTRY} | {fastmaml.ops.mlp_hvp}  # mlp_hvp: checked with mlp_loss_and_grad
    assert {getattr(fastmaml.ops, n) for n in fastmaml.ops.__all__} <= registered

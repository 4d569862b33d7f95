"""Hypothesis profiles of the property-based tests.

``FASTMAML_HYPOTHESIS_PROFILE`` selects one (default ``ci``):

* ``ci``: derandomized (a fixed seed: the same examples on every run), a bounded
  number of examples per test, no deadline (a shared CI machine has noisy timings);
* ``local``: random seeds and 10x the examples, for a longer search on a workstation;
* ``smoke``: a handful of examples, for a quick check while editing.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

_COMMON = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
               print_blob=True)
settings.register_profile("ci", max_examples=12, derandomize=True, **_COMMON)
settings.register_profile("local", max_examples=120, **_COMMON)
settings.register_profile("smoke", max_examples=3, derandomize=True, **_COMMON)
settings.load_profile(os.environ.get("FASTMAML_HYPOTHESIS_PROFILE", "ci"))

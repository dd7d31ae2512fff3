"""Sigmoid ramp-up weight of the spatial/semantic term (Laine & Aila; methods.md §1.9)."""

from __future__ import annotations

import math


def sigmoid_rampup(epoch: float, length: float) -> float:
    """``w(e) = exp(-5 (1 - min(e, R)/R)^2)``; 0.0067 at e = 0, 1 from e = R on; 1 if R <= 0."""
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(float(epoch), 0.0), float(length)) / float(length)
    return math.exp(-5.0 * phase * phase)

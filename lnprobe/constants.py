"""Numeric definitions shared by the recording side (torch) and the analysis side (no torch).

This module imports nothing, so ``lnprobe.analysis`` can use it on a machine without torch.
"""
from __future__ import annotations

#: Largest finite float16 value; ``over_fp16`` counts |x| above it (Inf included, NaN not).
FP16_MAX = 65504.0
#: Sun et al. (2024): an activation is *massive* when |x| > MASSIVE_ABS ...
MASSIVE_ABS = 100.0
#: ... and |x| >= MASSIVE_RATIO x the median |x| of its tensor.
MASSIVE_RATIO = 1000.0

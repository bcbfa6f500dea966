"""Hidden-state gradient statistics: the reduction in the tensor hook and the batched finalize.

Measurement point: the gradient of the loss with respect to a recorded forward output (a tensor hook
registered in ``lnprobe.hooks``), per backward; the micro-batches of one optimizer step are merged.
``grad_rms`` = sqrt(Σg² / n) and ``grad_absmax`` = max |g| over all elements of all micro-batches, both
divided by the AMP loss scale of that backward (``lnprobe.stats.REGISTRY`` holds their rows).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .runtime import stack_groups as _stack_groups
from .runtime import to_device as _to_device


@dataclass
class GradientPartial:
    """Reduction of one hidden-state gradient: ``packed (3,)`` float32 = ‖g‖₂, max g, min g."""

    packed: torch.Tensor
    n_elem: int



def reduce_gradient(g: torch.Tensor) -> GradientPartial:
    """Reduce one hidden-state gradient (any shape) to ‖g‖₂, max and min: three device operations,
    no temporary. The norm accumulates in float32 whatever g's dtype (no float32 copy of a bf16
    gradient); max and min are exact in g's own dtype."""
    gd = g.detach()
    if gd.dtype == torch.float64:  # rare; vector_norm would refuse to narrow it into float32
        gd = gd.float()
    if gd.numel() == 0:
        return GradientPartial(gd.new_zeros(3, dtype=torch.float32), 0)
    lo, hi = torch.aminmax(gd)  # NaN-propagating
    norm = torch.linalg.vector_norm(gd, dtype=torch.float32)
    return GradientPartial(torch.stack([norm, hi, lo]), gd.numel())  # (3,) float32 (stack promotes)


def finalize_gradients(groups: Sequence[Sequence[GradientPartial]],
                       loss_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(G, 2)`` float64: grad_rms and grad_absmax of G sites over all micro-batches, divided by the
    AMP loss scale."""
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("finalize_gradients: expected a non-empty list of non-empty groups of partials")
    pad = groups[0][0].packed.new_zeros(3)  # contributes nothing: ‖g‖ 0, max 0, min 0 (|0| ≤ any |g|)
    pk = _stack_groups(groups, lambda p: p.packed, pad).double()  # (G, M, 3)
    n = _to_device([float(sum(p.n_elem for p in g)) for g in groups], pk.device)  # (G,)
    sumsq = pk[..., 0].square().sum(1)  # (G,)
    absmax = torch.maximum(pk[..., 1].amax(1), pk[..., 2].amin(1).neg())  # (G,)
    out = torch.stack([(sumsq / n).sqrt(), absmax], 1)  # (G, 2)
    if loss_scale is not None:
        out = out / loss_scale.double()
    return out


def finalize_gradient(parts: list[GradientPartial], loss_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(2,)`` float64: grad_rms and grad_absmax over all micro-batches, divided by the AMP loss scale."""
    return finalize_gradients([parts], loss_scale)[0]

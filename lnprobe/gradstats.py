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

from .runtime import LayoutCache as _LayoutCache
from .runtime import fill_view as _fill_view
from .runtime import host_to_device as _host_to_device


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


_LAYOUTS = _LayoutCache()


def finalize_gradients(groups: Sequence[Sequence[GradientPartial]],
                       loss_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(G, 2)`` float64: grad_rms and grad_absmax of G sites over all micro-batches, divided by the
    AMP loss scale.

    A fixed number of device operations whatever G: one stack of every partial (sites padded to the
    same number of micro-batches with zeros, which add nothing: ‖0‖ = 0 and |0| ≤ any |g|), one
    conversion, then per column one reduction over the micro-batches. grad_rms = sqrt(Σ‖g‖² / n).
    """
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("finalize_gradients: expected a non-empty list of non-empty groups of partials")
    first = groups[0][0].packed
    m = max(len(g) for g in groups)
    pad = _fill_view(0.0, 3, first.dtype, first.device)
    items = [p.packed for g in groups for p in g] if all(len(g) == m for g in groups) else \
        [t for g in groups for t in [p.packed for p in g] + [pad] * (m - len(g))]
    pk = torch.stack(items).view(len(groups), m, 3).double()  # (G, M, 3): ‖g‖, max g, min g
    n = _LAYOUTS.get(("n", first.device, tuple(sum(p.n_elem for p in g) for g in groups)),
                     lambda: _host_to_device(torch.tensor([float(sum(p.n_elem for p in g)) for g in groups],
                                                          dtype=torch.float64), first.device))  # (G,)
    out = torch.empty((len(groups), 2), dtype=torch.float64, device=first.device)
    sumsq = pk[..., 0].square().sum(1)  # (G,)
    torch.sqrt(sumsq.div_(n), out=out[:, 0])
    torch.amax(pk[..., 1:].abs(), dim=(1, 2), out=out[:, 1])  # max(max g, −min g) = max |g|
    if loss_scale is not None:
        out = out.div_(loss_scale)  # the 0-d scale is read in float64, no conversion operation
    return out


def finalize_gradient(parts: list[GradientPartial], loss_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(2,)`` float64: grad_rms and grad_absmax over all micro-batches, divided by the AMP loss scale."""
    return finalize_gradients([parts], loss_scale)[0]

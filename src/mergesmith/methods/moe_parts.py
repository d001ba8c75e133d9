"""Internal method of MoE plans: expert tensors copied from dense models, with mergekit-moe's
per-expert noise and residual scale, concatenated when several make one output tensor."""

from __future__ import annotations

from .._torch import torch
from .registry import MergeInputs, MethodSpec, Scheduling, register_internal

MOE_PART = "moe_part"


def moe_part(m: MergeInputs) -> torch.Tensor:
    """Each input plus ``noise_scale``·N(0, 1) (drawn from the tensor's seeded generator),
    times ``residual_scale`` (set only on down projections), then concatenated along
    ``axis`` (gate and up projections of a fused expert, or several shared experts).
    Inputs come as stored (``raw_inputs``): plain copies and concatenations stay in their
    dtype (exact, no float32 round trip); noise and scale are computed in the compute
    dtype."""
    parts = []
    for x, p in zip(m.tensors, m.model_params):
        noise = p.get("noise_scale")
        if noise or p.get("residual_scale") is not None:  # arithmetic: in the compute dtype
            x = x.to(torch.promote_types(x.dtype, m.compute_dtype))
        if noise:
            x = x + noise * torch.randn(x.shape, generator=m.generator, dtype=x.dtype,
                                        device=x.device)
        scale = p.get("residual_scale")
        if scale is not None:
            x = x * scale
        parts.append(x)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=m.params.get("axis", 0))


register_internal(MethodSpec(name=MOE_PART, fn=moe_part,
                             scheduling=Scheduling(random=True, raw_inputs=True,
                                                     temp_buffers=1.0)))

"""The samplers users name in specs and manifests: one table, importable without torch.

Each name maps to the diffusers scheduler class built from the checkpoint's own scheduler
config (so betas and timestep spacing follow the model, as in A1111/diffusers docs), the
config overrides that make it that sampler, and the name A1111 writes in its infotext.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sampler:
    name: str
    cls: str
    a1111: str
    overrides: dict[str, Any] = field(default_factory=dict)


SAMPLERS: dict[str, Sampler] = {
    s.name: s
    for s in (
        Sampler("ddim", "DDIMScheduler", "DDIM"),
        Sampler("pndm", "PNDMScheduler", "PLMS"),
        Sampler("lms", "LMSDiscreteScheduler", "LMS"),
        Sampler("euler", "EulerDiscreteScheduler", "Euler"),
        Sampler("euler_a", "EulerAncestralDiscreteScheduler", "Euler a"),
        Sampler("heun", "HeunDiscreteScheduler", "Heun"),
        Sampler(
            "dpmpp_2m", "DPMSolverMultistepScheduler", "DPM++ 2M", {"algorithm_type": "dpmsolver++"}
        ),
        Sampler(
            "dpmpp_2m_karras",
            "DPMSolverMultistepScheduler",
            "DPM++ 2M Karras",
            {"algorithm_type": "dpmsolver++", "use_karras_sigmas": True},
        ),
        Sampler("dpmpp_sde", "DPMSolverSDEScheduler", "DPM++ SDE"),
        Sampler("unipc", "UniPCMultistepScheduler", "UniPC"),
    )
}

# 'default' keeps the checkpoint's own scheduler.
SCHEDULERS = ("default", *SAMPLERS)

# A checkpoint's own scheduler class → A1111's name (the first sampler built from it).
_BY_CLASS: dict[str, str] = {}
for _s in SAMPLERS.values():
    _BY_CLASS.setdefault(_s.cls, _s.a1111)


def a1111_name(scheduler: str, scheduler_class: str | None) -> str:
    """The sampler name A1111 writes for `scheduler` ('default': from the class used)."""
    if scheduler in SAMPLERS:
        return SAMPLERS[scheduler].a1111
    cls = scheduler_class or ""
    return _BY_CLASS.get(cls, cls)

"""Diffusion core shared by every model family.

- :mod:`~nucsynth.diffusion.schedules`: noise schedules and timestep respacing.
- :mod:`~nucsynth.diffusion.gaussian`: Gaussian diffusion (posterior, eps / v prediction,
  learned variance, hybrid loss).
- :mod:`~nucsynth.diffusion.sampling`: ancestral, DDIM and DPM-Solver++(2M) samplers with
  partial noising and masked re-rendering.
- :mod:`~nucsynth.diffusion.guidance`: classifier-free guidance in one batched pass.
- :mod:`~nucsynth.diffusion.multinomial`: multinomial (categorical) diffusion for labels.

See docs/diffusion.md for the mathematics and conventions.
"""

from nucsynth.diffusion.gaussian import GaussianDiffusion
from nucsynth.diffusion.guidance import guidance_scale_from, guided
from nucsynth.diffusion.multinomial import MultinomialDiffusion
from nucsynth.diffusion.sampling import Stepper, sample
from nucsynth.diffusion.schedules import make_betas, respace_betas, space_timesteps

__all__ = [
    "GaussianDiffusion",
    "MultinomialDiffusion",
    "Stepper",
    "guidance_scale_from",
    "guided",
    "make_betas",
    "respace_betas",
    "sample",
    "space_timesteps",
]

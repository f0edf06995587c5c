"""Diffusion core: schedules and the forward process, parameterizations and the denoiser, training
losses, samplers and classifier-free guidance."""
from vldm.diffusion.guidance import (batched_branches, classifier_free_guidance, dual_guidance,
                                     frame_guidance_scale)
from vldm.diffusion.losses import diffusion_loss, edm_weight, min_snr_weight
from vldm.diffusion.parameterization import Denoiser, Parameterization, convert_prediction
from vldm.diffusion.samplers import SAMPLERS, Plan, from_scheduler_config, make_plan, run, sample
from vldm.diffusion.schedules import DiscreteSchedule, karras_sigmas, q_sample

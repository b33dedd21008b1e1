"""Diffusion objectives (denoiser preconditionings, losses with noise multiplicity) and samplers."""
from .denoisers import DENOISERS, Denoiser, EDMDenoiser, VDenoiser, VEDenoiser, VPDenoiser, build_denoiser
from .losses import LOSSES, DiffusionLoss, EDMLoss, VELoss, VLoss, VPLoss, build_loss, drop_labels
from .samplers import SAMPLERS, ddim_sample, edm_sample, guided, noise_levels, sample

__all__ = ["Denoiser", "EDMDenoiser", "VDenoiser", "VEDenoiser", "VPDenoiser", "build_denoiser", "DENOISERS",
           "DiffusionLoss", "EDMLoss", "VLoss", "VELoss", "VPLoss", "build_loss", "LOSSES", "drop_labels",
           "sample", "ddim_sample", "edm_sample", "guided", "noise_levels", "SAMPLERS"]

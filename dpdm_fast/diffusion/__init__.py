"""Diffusion objectives: denoiser preconditionings and losses with noise multiplicity."""
from .denoisers import DENOISERS, Denoiser, EDMDenoiser, VDenoiser, VEDenoiser, VPDenoiser, build_denoiser
from .losses import LOSSES, DiffusionLoss, EDMLoss, VELoss, VLoss, VPLoss, build_loss, drop_labels

__all__ = ["Denoiser", "EDMDenoiser", "VDenoiser", "VEDenoiser", "VPDenoiser", "build_denoiser", "DENOISERS",
           "DiffusionLoss", "EDMLoss", "VLoss", "VELoss", "VPLoss", "build_loss", "LOSSES", "drop_labels"]

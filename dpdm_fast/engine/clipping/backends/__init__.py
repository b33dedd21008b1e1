"""Which code computes the per-group gradients and the clip / sum / noise pass: one interface.

The per-example buffer holds one contiguous (B, numel) block per parameter (see ``FlatLayout``).
A backend supplies

- ``norms(block, out)``: per-example norms of a block written by a torch rule;
- ``reduce(job, total, noise, out)``: fold a backward's buffer (``ClipJob``) into the clipped sum
  ``total``; in the final pass of a step (``noise`` given), write (total + noise) / expected batch
  size into ``out``, the parameters' flat gradient, leaving ``total`` as it is.

``"torch"`` is the reference and the CPU path; ``"triton"`` the fused Triton kernels
(``dpdm_fast.kernels``); ``"cuda"`` the CUDA C++ twins (``csrc/``). ``"auto"`` picks Triton for a
model on a GPU and torch on the CPU. A backend that cannot run here is an error saying why, never a
silent substitute.

Backends are found in a registry (``register_backend``), so the collector asks for one by name and
imports none of them; the fused kernels that compute some layers' per-group gradients for a backend
are capture's business (``dpdm_fast.engine.capture.kernel_rules``, keyed by the backend's name).
"""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from .jobs import ClipJob, Noise
from .torch_backend import TorchBackend, noise_seed

__all__ = ["get_backend", "register_backend", "BACKENDS", "ClipJob", "Noise", "TorchBackend", "noise_seed"]


BACKENDS = ("torch", "triton", "cuda")
_FACTORIES: dict = {}   # name -> factory(device) -> backend


def register_backend(name: str, factory) -> None:
    """Make ``get_backend(name, device)`` call ``factory(device)`` (a backend of one's own)."""
    if name == "auto":
        raise ValueError("'auto' is not a backend name: it chooses one")
    _FACTORIES[name] = factory


def get_backend(name: str = "auto", device: torch.device | str = "cpu"):
    """The backend by name for a model on ``device``; ``"auto"`` = Triton on a GPU, torch on the CPU."""
    device = torch.device(device)
    if name == "auto":
        name, reason = auto_choice(device)
        if reason is not None:
            warnings.warn(f"backend='auto': {reason}", stacklevel=3)
    if name not in _FACTORIES:
        raise ValueError(f"unknown backend {name!r}; available: {['auto', *_FACTORIES]}")
    return _FACTORIES[name](device)


MIN_TRITON_CAPABILITY = (7, 0)   # every Triton kernel compiles for sm_70, sm_75, sm_80 and sm_90 (tests/test_kernels.py)


def auto_choice(device: torch.device) -> tuple[str, str | None]:
    """The backend ``"auto"`` picks for ``device`` and, when it is not the fused kernels on a GPU, why: Triton on
    every CUDA GPU it compiles for (sm_70 / V100 and newer), the torch backend elsewhere."""
    if device.type != "cuda":
        return "torch", None
    if importlib.util.find_spec("triton") is None:
        return "torch", "Triton is not installed: using the torch backend (pip install triton for the fused kernels)"
    capability = torch.cuda.get_device_capability(device)
    if capability < MIN_TRITON_CAPABILITY:
        return "torch", (f"the GPU is sm_{capability[0]}{capability[1]}, older than the sm_70 the Triton kernels "
                         "compile for: using the torch backend")
    return "triton", None


def _triton_backend(device: torch.device):
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError("backend='triton' needs Triton, which is not installed: pip install triton "
                           "(or use backend='torch')")
    interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device.type == "cpu" and not interpret:
        raise RuntimeError("backend='triton' with the model on the CPU runs the kernels in Triton's interpreter, "
                           "which needs TRITON_INTERPRET=1 set before dpdm_fast is imported (slow: for tests); "
                           "on a CPU use backend='torch', or move the model to a GPU first")
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"backend='triton' runs on CUDA GPUs (or the CPU interpreter), not on {device.type}")
    from .triton_backend import TritonBackend
    return TritonBackend(device)


def _cuda_backend(device: torch.device):
    from .cuda_backend import CudaBackend
    return CudaBackend(device)


register_backend("torch", lambda device: TorchBackend())
register_backend("triton", _triton_backend)
register_backend("cuda", _cuda_backend)

"""The standard TF-ported Inception-v3 of FID, from torch-fidelity, without torchvision.

torch-fidelity's ``FeatureExtractorInceptionV3`` (the TensorFlow FID network, converted bit-exactly)
is used as is: uint8 inputs, resized to 299 with TensorFlow 1.x's bilinear interpolation inside the
extractor, 2048-d pool features. Importing ``torch_fidelity`` runs its package ``__init__``, which
imports every extractor and metric, some of which need torchvision, which does not import beside
the CPU build of torch. So the extractor's module (which needs only torch) is imported on its own:
the package's folder is registered without running ``__init__`` for that import, then unregistered.

Weights: ``--inception-weights PATH``, else torch's hub cache, else a download (first use) into that
cache; offline without the file, an error says where to get it and where to put it.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

WEIGHTS_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
               "weights-inception-2015-12-05-6726825d.pth")
WEIGHTS_FILE = WEIGHTS_URL.rsplit("/", 1)[1]


class InceptionUnavailable(RuntimeError):
    """The Inception network or its weights cannot be had here."""


def extractor_class():
    """torch-fidelity's FeatureExtractorInceptionV3, imported without its package __init__."""
    name = "torch_fidelity.feature_extractor_inceptionv3"
    if name in sys.modules:
        return sys.modules[name].FeatureExtractorInceptionV3
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None:
        raise InceptionUnavailable("FID needs torch-fidelity's Inception network: pip install --no-deps "
                                   "torch-fidelity==0.4.0 (--no-deps: its torchvision requirement is not needed "
                                   "here and would pull another torch)")
    stub = "torch_fidelity" not in sys.modules
    if stub:
        package = types.ModuleType("torch_fidelity")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["torch_fidelity"] = package
    try:
        return importlib.import_module(name).FeatureExtractorInceptionV3
    finally:
        if stub:  # a later `import torch_fidelity` runs the real __init__ (its submodules stay cached)
            del sys.modules["torch_fidelity"]


def weights_path(path: str | Path | None = None, download: bool = True) -> Path:
    """The Inception weights file: ``path``, else torch's hub cache, else downloaded into that cache."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InceptionUnavailable(f"--inception-weights {path}: no such file")
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_FILE
    if cached.is_file():
        return cached
    if download:
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.hub.download_url_to_file(WEIGHTS_URL, str(cached), progress=True)
            return cached
        except Exception as e:  # offline, proxy, disk: all the same advice
            cached.unlink(missing_ok=True)
            reason = f" ({type(e).__name__}: {e})"
    else:
        reason = ""
    raise InceptionUnavailable(f"the Inception-v3 weights for FID are not here and could not be downloaded{reason}. "
                               f"Get {WEIGHTS_URL} on a machine with internet, then pass --inception-weights PATH "
                               f"or copy it to {cached}")


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu",
                   download: bool = True) -> torch.nn.Module:
    """The FID Inception-v3 returning (N, 2048) pool features for uint8 (N, 3, H, W) images."""
    try:
        cls = extractor_class()
    except ImportError as e:
        raise InceptionUnavailable(f"torch-fidelity's Inception module does not import here: {e}") from e
    file = weights_path(path, download)
    try:
        model = cls("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(file))
    except Exception as e:  # a truncated download, another network's weights, not a torch file
        raise InceptionUnavailable(f"{file} is not the FID Inception-v3 weights file ({type(e).__name__}: "
                                   f"{str(e)[:200]}); get {WEIGHTS_URL}") from e
    return _FirstOutput(model.eval().to(device))


class _FirstOutput(torch.nn.Module):
    """torch-fidelity returns a tuple of the requested features; FID needs the one."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)[0]

"""The published DPDM network."""
from __future__ import annotations

from typing import Any, Mapping

from .layers import NIN, AttnBlock, ResnetBlockBigGAN
from .ncsnpp import NCSNpp

__all__ = ["NCSNpp", "NIN", "AttnBlock", "ResnetBlockBigGAN", "build_network"]


def build_network(network_cfg: Mapping[str, Any]) -> NCSNpp:
    """NCSNpp from a config's ``model.network`` section (a dict or an omegaconf node)."""
    try:
        from omegaconf import DictConfig, OmegaConf
        if isinstance(network_cfg, DictConfig):
            network_cfg = OmegaConf.to_container(network_cfg, resolve=True)
    except ImportError:  # pragma: no cover
        pass
    return NCSNpp(**dict(network_cfg))

import json

import pytest
import torch

from conftest import REFERENCE, need
from dpdm_fast.diffusion import build_denoiser
from dpdm_fast.models import NIN, NCSNpp, build_network

CASES = ["mnist28", "celeba32"]


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().mean()).item()


@pytest.mark.parametrize("name", CASES)
def test_state_dict_layout_matches_published(name, golden):
    layout = json.loads(need(REFERENCE / f"dpdm_state_dict_{name}.json").read_text())
    net = NCSNpp(**golden(name)["config"])
    sd = net.state_dict()
    assert list(sd) == list(layout["state_dict"])
    assert {k: list(v.shape) for k, v in sd.items()} == layout["state_dict"]
    assert sum(p.numel() for p in net.parameters()) == layout["num_parameters"]


def test_parameter_counts_of_released_configs():
    assert sum(p.numel() for p in NCSNpp(28, [7]).parameters()) == 1_753_345
    celeba = NCSNpp(32, [16, 8], num_in_channels=3, num_out_channels=3, label_dim=0, use_cfg=False)
    assert sum(p.numel() for p in celeba.parameters()) == 1_804_451


@pytest.mark.parametrize("name", CASES)
def test_golden_outputs(name, golden):
    g = golden(name)
    net = NCSNpp(**g["config"])
    net.load_state_dict(g["state_dict"], strict=True)
    net.eval()
    with torch.no_grad():
        assert rel_err(net(g["x"], g["net_input_c_noise"], g["labels"]), g["net_out"]) < 1e-4
        assert rel_err(build_denoiser("edm", net)(g["x"], g["sigma"], g["labels"]), g["edm_out"]) < 1e-4
        assert rel_err(build_denoiser("v", net)(g["x"], g["sigma"], g["labels"]), g["v_out"]) < 1e-4


def test_golden_detects_a_wrong_weight(golden):
    """The golden check is sensitive: perturbing one late convolution breaks it.

    (The golden weights damp the deep path strongly, so the perturbation is placed near the output.)
    """
    g = golden("mnist28")
    net = NCSNpp(**g["config"])
    sd = dict(g["state_dict"])
    key = "all_modules.28.Conv_1.weight"
    sd[key] = sd[key] + 0.01 * torch.randn(sd[key].shape, generator=torch.Generator().manual_seed(0))
    net.load_state_dict(sd)
    with torch.no_grad():
        assert rel_err(net(g["x"], g["net_input_c_noise"], g["labels"]), g["net_out"]) > 1e-4


def test_attention_projection_is_its_own_module():
    net = NCSNpp(28, [7])
    nins = [m for m in net.modules() if isinstance(m, NIN)]
    assert len(nins) == 16 and all(m.W.shape == (64, 64) for m in nins)


def test_full_backward_hooks_work_on_every_module():
    """No in-place op on activations: module backward hooks (used by DP engines) must not break."""
    net = NCSNpp(28, [7])
    seen = []
    for m in net.modules():
        if any(True for _ in m.parameters(recurse=False)):
            m.register_full_backward_hook(lambda mod, gi, go: seen.append(mod))
    x = torch.randn(2, 1, 28, 28)
    net(x, torch.randn(2), torch.tensor([1, 10])).square().mean().backward()
    assert len(seen) == sum(1 for m in net.modules() if any(True for _ in m.parameters(recurse=False)))


def test_conditional_network_requires_labels():
    with pytest.raises(ValueError, match="labels"):
        NCSNpp(28, [7])(torch.randn(1, 1, 28, 28), torch.zeros(1), None)


@pytest.mark.parametrize("arg", [{"fir": True}, {"resblock_type": "ddpm"}, {"progressive": "output_skip"}])
def test_unsupported_variants_are_refused(arg):
    with pytest.raises(ValueError, match="not supported"):
        NCSNpp(28, [7], **arg)


def test_build_network_from_config_section():
    from dpdm_fast.config import load_config
    cfg = load_config("configs/celeba_32/train_eps_10.0.yaml")
    assert sum(p.numel() for p in build_network(cfg.model.network).parameters()) == 1_804_451

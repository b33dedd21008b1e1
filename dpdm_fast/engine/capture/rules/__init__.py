"""Per-layer rules: the per-*group* gradient of a layer's parameters, computed directly.

A rule receives the layer's input activations ``x`` and the gradient ``g`` flowing into its
output, both with N = B*K rows laid out group-major (rows b*K .. b*K+K-1 are example b), and
returns, for each trainable parameter, the tensor (B, *param.shape) whose b-th entry is
sum over the K rows of example b of that row's gradient contribution. The sum over K happens
inside the GEMM/convolution: the B*K per-row gradients are never materialised.

Rules are registered per module type with ``@register_rule(nn.Conv2d, ...)``, one file per layer,
like Opacus's ``grad_sample/``. A rule is only correct for the computation it was written for, so
``find_rule`` gives it to a subclass only when the subclass keeps the methods that define that
computation (``forward``, and e.g. ``_conv_forward``) and has no parameters the rule does not know.
"""
from .registry import RULES, Rule, RuleSpec, block, find_rule, groups, register_rule
from . import conv, conv_nd, conv_transpose, embedding, embedding_bag, instance_norm, linear, nin, norm, rms_norm, sequence_bias  # noqa: E402,F401,E501  (registration, one file per layer)
from .functorch import functorch_rule

__all__ = ["RULES", "Rule", "RuleSpec", "register_rule", "find_rule", "groups", "block", "functorch_rule"]

"""dpdm_fast: exact, fast DP-SGD training of differentially private diffusion models (DPDM)."""
__version__ = "0.1.0"

from .engine import BatchMemoryManager, PrivacyEngine  # noqa: E402

__all__ = ["PrivacyEngine", "BatchMemoryManager", "__version__"]

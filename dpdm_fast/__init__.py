"""dpdm_fast: exact, fast DP-SGD training of differentially private diffusion models (DPDM)."""
__version__ = "0.1.0"

__all__ = ["PrivacyEngine", "BatchMemoryManager", "__version__"]


def __getattr__(name: str):
    # lazy, so that importing dpdm_fast (models, data, kernels) does not require Opacus
    if name in ("PrivacyEngine", "BatchMemoryManager"):
        from . import engine
        return getattr(engine, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Triton kernels of dpdm_fast, installed as ``dpdm_fast.kernels``.

Each kernel has a pure-torch reference in ``dpdm_fast.engine`` and a test comparing the two.
Importing this package never requires a GPU; kernels are selected by the engine's backend switch.
"""

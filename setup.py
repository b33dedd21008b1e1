from setuptools import find_packages, setup

setup(
    name="dpdm_fast",
    version="0.1.0",
    description="Fast, exact DP-SGD training of differentially private diffusion models (DPDM)",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ (Triton) lives at the top of the repository but installs as dpdm_fast.kernels.
    # csrc/ (CUDA C++ sources, compiled on first use) installs as dpdm_fast.csrc.
    packages=find_packages(include=["dpdm_fast", "dpdm_fast.*"]) + ["dpdm_fast.kernels", "dpdm_fast.csrc"],
    package_dir={"dpdm_fast.kernels": "kernels", "dpdm_fast.csrc": "csrc"},
    package_data={"dpdm_fast.csrc": ["*.cu", "*.cpp", "*.h"]},
    install_requires=[
        # Install torch first (pip install torch==2.13.0 for the CPU build), see README.
        "torch>=2.2",
        "opacus>=1.6,<1.7",
        "numpy",
        "scipy",          # (also an Opacus dependency) the audit's binomial tails, FID's matrix square root
        "triton; sys_platform == 'linux'",
        "ninja",
        "omegaconf>=2.3",
        "pillow",
        "tqdm",
        "matplotlib",
        "kornia>=0.7",    # the warm-up's augmentation (RandAugment) and post-processing filters
    ],
    extras_require={
        # the CUDA 12 compiler pieces (NVRTC, ptxas 12.9, headers): the sm_70 build check without nvcc
        "dev": ["pytest", "pytest-benchmark", "hypothesis",
                *(f"nvidia-cuda-{p}-cu12; sys_platform == 'linux'" for p in ("nvrtc", "runtime", "cccl", "nvcc"))],
        # optional: tests/test_audit.py then also checks the audit's bound against jax_privacy's
        "audit-check": ["jax-privacy"],
    },
    entry_points={"console_scripts": ["dpdm-fast=dpdm_fast.cli:main"]},
)

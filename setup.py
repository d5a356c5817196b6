"""Build script.

The Python package installs everywhere. The CUDA extension ``capsnet_ext._C`` (sources in
``csrc/``) is built only when the installed torch has CUDA and ``nvcc`` is found; otherwise it is
skipped with a message and the package still works (the CUDA backend can also be compiled
just in time, see ``capsnet_ext/cuda_ops``). Architectures come from ``TORCH_CUDA_ARCH_LIST``
(default ``8.0;9.0``). Install with ``pip install --no-build-isolation -e .`` so the build sees
the torch that is already installed.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_extensions():
    """The CUDA extension ``capsnet_ext._C`` when a CUDA torch and nvcc are present, else none
    (with a message saying why). Sources: ``csrc/*.cu`` (kernels, no torch headers) and
    ``csrc/*.cpp`` (the torch binding, which registers ``torch.ops.capsnet_ext``)."""
    if os.environ.get("CAPSNET_EXT_SKIP_CUDA_BUILD") == "1":
        print("capsnet_ext: CAPSNET_EXT_SKIP_CUDA_BUILD=1, CUDA extension skipped")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except Exception as exc:  # torch missing at build time: pure-Python install
        print(f"capsnet_ext: torch not importable at build time ({exc}); CUDA extension skipped")
        return [], {}
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda is None or not nvcc or not os.path.exists(nvcc):
        why = "the installed torch is a CPU-only build" if torch.version.cuda is None else "no nvcc was found"
        print(f"capsnet_ext: {why}; CUDA extension skipped (the reference and Triton backends are "
              "unaffected; the CUDA backend can still be compiled just in time where CUDA exists)")
        return [], {}
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*.cu")))
    if not sources:
        print("capsnet_ext: no sources in csrc/; CUDA extension skipped")
        return [], {}
    arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    print(f"capsnet_ext: building the CUDA extension for TORCH_CUDA_ARCH_LIST={arch_list}")
    ext = CUDAExtension(
        name="capsnet_ext._C",
        sources=sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        # The binding needs the C++ standard of torch's headers; the kernels include no torch.
        # The libstdc++ ABI is torch's, stated explicitly: torch 2.11's build passed no
        # _GLIBCXX_USE_CXX11_ABI (install log of 2026-12-04), and the GPU machine compiles
        # with its own /opt/gcc, whose default need not be torch's.
        extra_compile_args={"cxx": ["-O3", "-std=c++20",
                                    f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}"],
                            "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
    )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = cuda_extensions()

setup(
    name="capsnet_ext",
    version="0.1.0",
    description="Fast capsule networks with dynamic routing for PyTorch: reference, Triton and CUDA backends",
    packages=find_packages(include=["capsnet_ext", "capsnet_ext.*", "benchmarks", "benchmarks.*"]),
    package_data={"capsnet_ext": ["configs/*.json", "cuda_ops/verified.json",
                                  "triton_ops/tuning_table.json",
                                  "cuda_ops/tuning_table.json"]},
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "tqdm", "matplotlib"],
    extras_require={
        "triton": ["triton"],
        "train": ["tensorboard"],
        "data": ["scipy", "scikit-learn"],  # .mat files (SVHN, affNIST); scikit-learn's digits
        "test": ["pytest", "scipy", "scikit-learn"],
    },
    entry_points={"console_scripts": ["capsnet-ext=capsnet_ext.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)

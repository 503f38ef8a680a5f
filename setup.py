"""Builds udafast._C from csrc/ (CPU always; CUDA when torch has CUDA and a toolkit is found).

UDAFAST_NO_EXT=1 skips the extension entirely (reference backend only).
FORCE_CUDA=1 compiles csrc/cuda/*.cu even when torch cannot see a GPU.
UDAFAST_MARCH sets the -march of the CPU kernels (default: native, they are built where they run).
"""
import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def relative_glob(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extensions():
    if os.environ.get("UDAFAST_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    sources = relative_glob("csrc/*.cpp") + relative_glob("csrc/cpu/*.cpp")
    cuda_sources = relative_glob("csrc/cuda/*.cu")
    with_cuda = os.environ.get("FORCE_CUDA", "0") == "1" or (
        torch.version.cuda is not None and CUDA_HOME is not None
    )
    march = os.environ.get("UDAFAST_MARCH", "native")
    # no -std flag: BuildExtension adds the standard this torch was built with (C++20 from 2.14)
    cxx_flags = ["-O3", "-fopenmp"]
    if march:
        cxx_flags.append(f"-march={march}")
    extra_compile_args = {"cxx": cxx_flags}
    define_macros = []
    if with_cuda:
        extension = CUDAExtension
        sources += cuda_sources
        define_macros.append(("WITH_CUDA", None))
        # no --use_fast_math: SPEC 1.1 asks for IEEE division, and the losses for accurate exp/log
        extra_compile_args["nvcc"] = ["-O3"]
    else:
        extension = CppExtension
    module = extension(
        "udafast._C",
        sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        define_macros=define_macros,
        extra_compile_args=extra_compile_args,
        extra_link_args=["-fopenmp"],
    )
    return [module], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

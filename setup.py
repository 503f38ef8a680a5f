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
    cxx_flags = ["-O3", "-fopenmp", "-std=c++17"]
    if march:
        cxx_flags.append(f"-march={march}")
    extra_compile_args = {"cxx": cxx_flags}
    define_macros = []
    if with_cuda:
        extension = CUDAExtension
        sources += cuda_sources
        define_macros.append(("WITH_CUDA", None))
        extra_compile_args["nvcc"] = ["-O3", "--use_fast_math", "-std=c++17"]
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

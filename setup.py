"""Builds deqfuse and, when possible, its compiled extension deqfuse._C from csrc/.

Switches (environment; 1 or true: on, 0, false or empty: off, anything else an error):
  DEQFUSE_NO_EXT=1   skip the compiled extension entirely (pure Python + Triton + reference).
  DEQFUSE_NO_CUDA=1  build only the C++ CPU ops even if torch has CUDA and nvcc is present.
  TORCH_CUDA_ARCH_LIST  GPU targets (default here: "9.0" for Hopper).
Use `pip install --no-build-isolation -e .` so the build sees the torch you already have
(an isolated build would download a second, multi-GB torch).
"""
import glob
import importlib.util
import os

from setuptools import setup

# deqfuse/_env.py by path: the package itself cannot be imported before it is built
_spec = importlib.util.spec_from_file_location(
    "deqfuse_env", os.path.join(os.path.dirname(os.path.abspath(__file__)), "deqfuse", "_env.py"))
_env = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_env)

PACKAGES = ["deqfuse", "deqfuse.reference", "deqfuse.kernels"]
PACKAGE_DIR = {"deqfuse.kernels": "kernels"}  # Triton kernels live at top-level kernels/


def ext_modules():
    if _env.env_flag("DEQFUSE_NO_EXT"):
        print("deqfuse: DEQFUSE_NO_EXT set, skipping the compiled extension")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("deqfuse: torch not importable at build time, skipping the compiled extension "
              "(install torch first and use --no-build-isolation)")
        return [], {}
    cpp = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cu = sorted(glob.glob("csrc/cuda/*.cu"))
    # -fopenmp: at::parallel_for is serial in code compiled without it (ATen/ParallelOpenMP.h), and
    # `#pragma omp simd` vectorises the row reductions. -fno-math-errno: sqrt inline (no errno branch);
    # NaN/Inf semantics are kept (no -ffast-math). The C++ standard is left to torch. -g0: no debug info (Python's
    # CFLAGS ask for -g; without it a translation unit compiles in ~0.6x the time -- the symbol table still names
    # every function for perf).
    cxx = ["-O3", "-g0", "-fopenmp", "-fno-math-errno"]
    sha = [("DEQFUSE_SOURCES_SHA", f"0x{_env.sources_sha(HERE)}ULL")]  # deqfuse._C.sources_sha()
    with_cuda = bool(torch.version.cuda) and CUDA_HOME is not None and not _env.env_flag("DEQFUSE_NO_CUDA")
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        ext = CUDAExtension("deqfuse._C", cpp + cu, define_macros=[("WITH_CUDA", None)] + sha,
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo"]},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("deqfuse._C", cpp, define_macros=sha, extra_compile_args={"cxx": cxx},
                           extra_link_args=["-fopenmp"])
    print(f"deqfuse: building deqfuse._C ({'CUDA + CPU' if with_cuda else 'CPU only'})")

    class Build(BuildExtension):
        """One object directory per source tree (build/ext-cpu or build/ext-cuda): an editable install and a
        wheel built from the same tree share their objects (ninja rebuilds only what changed)."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = os.path.join(HERE, "build", f"ext-{'cuda' if with_cuda else 'cpu'}")
    return [ext], {"build_ext": Build.with_options(use_ninja=True)}


HERE = os.path.dirname(os.path.abspath(__file__))
exts, cmdclass = ext_modules()
setup(packages=PACKAGES, package_dir=PACKAGE_DIR, ext_modules=exts, cmdclass=cmdclass)

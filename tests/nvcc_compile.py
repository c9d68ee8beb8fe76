"""Compile-only check of the CUDA sources with nvcc (no GPU needed).

Compiles tests/cuda/compile_check.cu (every kernel template of csrc/cuda/*.cuh, instantiated) and the
csrc/cuda/*.cu launchers (op registration, dispatch, argument checks). A CPU torch wheel lacks one
generated header, c10/cuda/impl/cuda_cmake_macros.h (a single #define); a stand-in for it is put on the
include path then, which is enough for the headers the launchers use.
Usage: python tests/nvcc_compile.py [out_dir]   (exit 0 = everything attempted compiled)
"""
import glob
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile

from torch.utils.cpp_extension import include_paths


def resource_report(ptxas_log):
    """One line per kernel instance: template arguments, registers, spills (from ptxas -v)."""
    lines, name = [], "?"
    for ln in ptxas_log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", ln)
        if m:
            sym = m.group(1)
            try:
                sym = subprocess.run(["c++filt", sym], capture_output=True, text=True).stdout.strip() or sym
            except OSError:
                pass
            name = re.sub(r"\(.*", "", sym.replace("deqfuse::", "").replace("c10::", "").replace("void ", ""))
        elif "spill" in ln:
            spill = ln.strip().split(",")[1].strip()
        elif "registers" in ln:
            regs = re.search(r"Used (\d+) registers", ln).group(1)
            lines.append(f"  {name:<60} {regs:>3} regs  {spill}")
    return "\n".join(lines)


def main(out_dir=None):
    nvcc = shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc"
    if not os.path.exists(nvcc):
        print("nvcc not found")
        return 2
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out_dir = out_dir or tempfile.mkdtemp()
    incs = [f"-I{p}" for p in include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    ok = True
    # the launchers as one translation unit: parsing torch's headers is most of the time (~90 s)
    launchers = os.path.join(out_dir, "all_launchers.cu")
    with open(launchers, "w") as fh:
        fh.writelines(f'#include "{p}"\n' for p in sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu"))))
    srcs = [os.path.join(root, "tests", "cuda", "compile_check.cu"), launchers]
    if not os.path.exists(os.path.join(include_paths()[0], "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        stub = os.path.join(out_dir, "stub_include", "c10", "cuda", "impl")
        os.makedirs(stub, exist_ok=True)
        with open(os.path.join(stub, "cuda_cmake_macros.h"), "w") as fh:
            fh.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")  # what a CUDA build generates
        incs.insert(0, f"-I{os.path.join(out_dir, 'stub_include')}")
        print("CPU torch: stand-in for c10/cuda/impl/cuda_cmake_macros.h")
    for src in srcs:
        obj = os.path.join(out_dir, os.path.basename(src) + ".o")
        cmd = [nvcc, "-c", src, "-o", obj, "-std=c++17", "-O2", "-gencode=arch=compute_90,code=sm_90",
               "-DWITH_CUDA", "-DTORCH_EXTENSION_NAME=_C", "--expt-relaxed-constexpr", "-Xptxas", "-v", *incs]
        r = subprocess.run(cmd, capture_output=True, text=True)
        print(f"{os.path.basename(src)}: {'ok' if r.returncode == 0 else 'FAILED'}")
        if r.returncode:
            ok = False
            print(r.stderr[-4000:])
        else:
            print(resource_report(r.stderr))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))

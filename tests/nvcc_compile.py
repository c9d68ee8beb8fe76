"""Compile-only check of the CUDA sources with nvcc (no GPU needed).

Always compiles tests/cuda/compile_check.cu (every kernel template of csrc/cuda/*.cuh, instantiated);
also the full csrc/cuda/*.cu launchers when the installed torch ships complete CUDA headers (a CPU
torch wheel does not: its c10/cuda lacks cuda_cmake_macros.h, and there is no cusparse.h).
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
    srcs = [os.path.join(root, "tests", "cuda", "compile_check.cu")]
    torch_inc = include_paths()[0]
    if os.path.exists(os.path.join(torch_inc, "c10", "cuda", "impl", "cuda_cmake_macros.h")):
        srcs += sorted(glob.glob(os.path.join(root, "csrc", "cuda", "*.cu")))
    else:
        print("torch has no CUDA headers: compiling the kernel templates only (launchers build on a CUDA torch)")
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

"""Compile the Triton kernels for an H100 (sm_90) on a machine without a GPU.

The interpreter (TRITON_INTERPRET=1) checks what the kernels compute, not whether they compile for a
GPU: an unsupported dot (fp64), a layout the backend rejects, shared memory beyond the SM, register
spills. Triton can compile ahead of time for a named target with its bundled ptxas, so:
  1. `record(fn)` runs fn (calls of the kernel wrappers) under the interpreter and records every launch:
     kernel, argument types, constexpr values, num_warps / num_stages;
  2. `compile_recorded(calls, ...)` compiles them for sm_90 in a process without the interpreter (the
     same kernels are then JITFunctions), with the GPU's choices put back (tf32 dots, bf16 dots without
     the interpreter's upcast, the autotuner's tile configs), and reads registers / spills / shared
     memory from the cubin with the bundled cuobjdump.
Usage: python tests/triton_aot.py        (records the representative calls below, prints a table)
"""
import inspect
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
_TORCH_TO_TT = {"float32": "fp32", "float64": "fp64", "bfloat16": "bf16", "float16": "fp16", "int64": "i64",
                "int32": "i32", "int8": "i8", "uint8": "u8", "bool": "i1"}


def _arg_type(v):
    import torch
    if isinstance(v, torch.Tensor):
        return "*" + _TORCH_TO_TT[str(v.dtype).split(".")[-1]]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i64" if abs(v) >= 2 ** 31 else "i32"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"unsupported kernel argument {type(v).__name__}")


def _const(v):
    """JSON form of a constexpr value (Triton dtypes by name)."""
    import triton.language as tl
    if isinstance(v, tl.dtype):
        return {"tl_dtype": str(v)}
    return v


def record(fn):
    """Run fn() under the interpreter; returns the distinct kernel launches it made (JSON-able dicts)."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "record() needs TRITON_INTERPRET=1"
    from triton.runtime.interpreter import InterpretedFunction
    calls, seen = [], set()
    real_run = InterpretedFunction.run

    def spy(self, *args, **kwargs):
        params = list(inspect.signature(self.fn).parameters.values())
        bound = dict(zip([p.name for p in params], args))
        bound.update({k: v for k, v in kwargs.items() if k in {p.name for p in params}})
        sig, consts = {}, {}
        for p in params:
            if p.name not in bound:  # a defaulted constexpr
                consts[p.name] = _const(p.default)
            elif "constexpr" in str(p.annotation):
                consts[p.name] = _const(bound[p.name])
            else:
                sig[p.name] = _arg_type(bound[p.name])
        call = dict(module=self.fn.__module__, kernel=self.fn.__name__, signature=sig, constexprs=consts,
                    num_warps=kwargs.get("num_warps", 4), num_stages=kwargs.get("num_stages", 3))
        key = json.dumps(call, sort_keys=True)
        if key not in seen:
            seen.add(key)
            calls.append(call)
        return real_run(self, *args, **kwargs)

    InterpretedFunction.run = spy
    try:
        fn()
    finally:
        InterpretedFunction.run = real_run
    return calls


def gpu_variants(call, all_tiles=True):
    """The launches the GPU makes where the interpreter made `call`: dot precision as on the GPU, and
    for the fused cell's GEMMs the autotuning configs (all, or the first) at the widest group width."""
    c = call["constexprs"]
    out = []
    precs = [c["PREC"]] if "PREC" in c else [None]
    if precs == ["upcast"]:
        precs = ["ieee"]                            # bf16/fp16 dots run natively on the GPU
    elif precs == ["ieee"] and not {"*bf16", "*fp16"} & set(call["signature"].values()):
        precs = ["tf32"]                            # fp32 under allow_tf32, as benchmarked
    tiles = [None]
    if call["module"].endswith("cell_fused") and "BM" in c and c.get("PREC") != "fma":
        from deqfuse.kernels.cell_fused import _configs
        bn = 256 if "DG" in call["signature"] else 128  # group tiles at D / groups = 256; D/BN tiles at D >= 128
        tiles = [(cfg.kwargs["BM"], cfg.kwargs["BK"], cfg.num_warps, cfg.num_stages, bn)
                 for cfg in _configs(bn, "DG" in call["signature"])]
        tiles = tiles if all_tiles else tiles[:1]
    for prec in precs:
        for tile in tiles:
            v = json.loads(json.dumps(call))
            if prec is not None:
                v["constexprs"]["PREC"] = prec
            if tile is not None:
                v["constexprs"].update(BM=tile[0], BK=tile[1], BN=tile[4])
                v["num_warps"], v["num_stages"] = tile[2], tile[3]
            out.append(v)
    return out


def _resources(cubin_bytes):
    """REG / STACK / SHARED / LOCAL of the kernel in a cubin, by the cuobjdump Triton bundles."""
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as fh:
        fh.write(cubin_bytes)
        fh.flush()
        txt = subprocess.run([tool, "--dump-resource-usage", fh.name], capture_output=True, text=True).stdout
    res = {}
    for part in txt.replace(",", " ").split():
        if ":" in part:
            k, _, v = part.partition(":")
            if k in ("REG", "STACK", "SHARED", "LOCAL") and v.isdigit():
                res[k] = int(v)
    return res


def _compile_one(call):
    import importlib

    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn = getattr(importlib.import_module(call["module"]), call["kernel"])
    consts = {k: (tl.dtype(v["tl_dtype"]) if isinstance(v, dict) else v) for k, v in call["constexprs"].items()}
    src = ASTSource(fn=fn, signature={**call["signature"], **{k: "constexpr" for k in consts}}, constexprs=consts)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=call["num_warps"], num_stages=call["num_stages"]))
    return dict(shared=k.metadata.shared, **_resources(k.asm["cubin"]))


def compile_recorded(calls, all_tiles=True):
    """Compile each call (and its GPU variants) for sm_90 in a fresh process without the interpreter.
    Returns rows: kernel, constexprs digest, ok, error or resources."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "calls.json")
        json.dump([v for c in calls for v in gpu_variants(c, all_tiles)], open(src, "w"))
        r = subprocess.run([sys.executable, os.path.abspath(__file__), "--compile", src], env=env,
                           capture_output=True, text=True, cwd=os.path.join(HERE, ".."))
        if r.returncode:
            raise RuntimeError(f"AOT compile driver failed:\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def _compile_main(path):
    rows = []
    for call in json.load(open(path)):
        c = call["constexprs"]
        digest = " ".join(f"{k}={c[k]}" for k in ("BM", "BN", "BK", "PREC") if k in c)
        ptrs = sorted({t for t in call["signature"].values() if t.startswith("*")})
        row = dict(kernel=call["kernel"], config=f"{digest} w{call['num_warps']} s{call['num_stages']}",
                   dtypes=",".join(ptrs))
        try:
            row.update(ok=True, **_compile_one(call))
        except Exception as e:  # noqa: BLE001  reported, not raised: one table of every failure
            row.update(ok=False, error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
    print(json.dumps(rows))


def representative_calls(dtypes=("float32", "bfloat16", "float64")):
    """Every Triton kernel of the package at small shapes: the cell paths in these dtypes (both
    forwards, both VJPs, save on and off), the Anderson step (fp32, bf16 history), routing."""
    import torch
    sys.path.insert(0, HERE)
    from deqfuse.testing import make_inputs, make_params
    from deqfuse.bench import step_args
    from deqfuse.kernels.anderson import anderson_step_triton
    from deqfuse.kernels.cell import cell_forward_triton, cell_vjp_triton
    from deqfuse.kernels.cell_fused import cell_forward_fused, cell_vjp_fused
    from deqfuse.kernels.routing import gather_rows_multi_triton, group_by_choice_triton, scatter_rows_triton

    def run():
        for dt in (getattr(torch, d) for d in dtypes):
            p = make_params(3, 64, dtype=torch.float32 if dt != torch.float64 else dt)
            z, x, xf = make_inputs(5, 3, 64, dtype=dt)
            for fwd, vjp in ((cell_forward_triton, cell_vjp_triton), (cell_forward_fused, cell_vjp_fused)):
                fwd(z, x, xf, p)
                _, saved = fwd(z, x, xf, p, save=True)
                vjp(torch.randn_like(z), saved, p)
        for hist in (None, torch.bfloat16):
            args = step_args(4, 256, 6, "cpu", torch.float32, hist)
            anderson_step_triton(*args, check=False)
        order, _ = group_by_choice_triton(torch.randint(0, 3, (40,)), 3)
        srcs = [torch.randn(40, 7), torch.randn(40, 5)]
        outs = gather_rows_multi_triton(srcs, order)
        scatter_rows_triton(outs[0], order, torch.empty_like(srcs[0]))
    return record(run)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--compile":
        _compile_main(sys.argv[2])
        sys.exit(0)
    os.environ["TRITON_INTERPRET"] = "1"
    rows = compile_recorded(representative_calls())
    for r in rows:
        res = "  ".join(f"{k}={r[k]}" for k in ("REG", "LOCAL", "STACK", "shared") if k in r)
        print(f"{'ok  ' if r['ok'] else 'FAIL'} {r['kernel']:<24} {r['dtypes']:<22} {r['config']:<44} {res or r.get('error', '')}")
    sys.exit(0 if all(r["ok"] for r in rows) else 1)

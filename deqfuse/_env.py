"""Yes/no environment switches (DEQFUSE_NO_EXT, DEQFUSE_NO_CUDA) and the fingerprint of the extension's
sources. No imports beyond the standard library: setup.py loads this file by path before the package is built."""
import hashlib
import os

FLAG_OFF = ("", "0", "false")
FLAG_ON = ("1", "true")


def env_flag(var: str) -> bool:
    """The switch `var`: unset, '', '0' or 'false' -> off; '1' or 'true' -> on (case-insensitive); any other
    value raises ValueError naming the variable."""
    v = os.environ.get(var, "").strip().lower()
    if v in FLAG_OFF or v in FLAG_ON:
        return v in FLAG_ON
    raise ValueError(f"{var}={os.environ[var]!r} is not one of 1, true (on) or 0, false, empty (off)")


def sources_sha(root: str):
    """The first 15 hex digits of a sha256 over the compiled extension's sources under root/csrc (every .cpp,
    .h, .cu, .cuh: relative path and bytes, in sorted order), or None when root is not a source tree (no
    setup.py beside csrc/: an installed wheel). setup.py compiles it into deqfuse._C (sources_sha()), so a
    checkout whose sources changed after the build is recognised."""
    top = os.path.join(root, "csrc")
    if not (os.path.isdir(top) and os.path.isfile(os.path.join(root, "setup.py"))):
        return None
    h = hashlib.sha256()
    for d, dirs, files in sorted(os.walk(top)):
        dirs.sort()
        for f in sorted(files):
            if f.endswith((".cpp", ".h", ".cu", ".cuh")):
                p = os.path.join(d, f)
                h.update(os.path.relpath(p, top).encode() + b"\0")
                with open(p, "rb") as fh:
                    h.update(fh.read())
    return h.hexdigest()[:15]

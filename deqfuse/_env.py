"""Yes/no environment switches (DEQFUSE_NO_EXT, DEQFUSE_NO_CUDA). No imports beyond os: setup.py loads
this file by path before the package is built."""
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

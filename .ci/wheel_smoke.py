"""Smoke test of an installed deqfuse wheel, run from outside the checkout (CI: a clean venv): the
package and its compiled extension import from site-packages; a DEQFusion forward + backward and a
DynamicFusion routed forward run; `python -m deqfuse info` works."""
import os
import subprocess
import sys

import torch

import deqfuse
from deqfuse import DEQFusion, DynamicFusion, MLPHead, SubsetExpert

here = os.path.dirname(deqfuse.__file__)
assert "site-packages" in here, f"deqfuse imported from {here}, not from the installed wheel"
ext, why = deqfuse.extension_status()
assert ext is not None and os.path.dirname(ext.__file__) == here, why
torch.manual_seed(0)
layer = DEQFusion(32, 2, f_max_iter=10, b_max_iter=10, on_nonconvergence="ignore")
x = [torch.randn(8, 32, requires_grad=True) for _ in range(2)]
(layer(x) * torch.randn(8, 32)).sum().backward()
assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())
dyn = DynamicFusion([SubsetExpert([0], MLPHead(32, 4)), SubsetExpert([0, 1], MLPHead(64, 4))]).eval()
with torch.no_grad():
    assert dyn([t.detach() for t in x]).shape == (8, 4)
out = subprocess.run([sys.executable, "-m", "deqfuse", "info"], capture_output=True, text=True, check=True).stdout
assert deqfuse.__version__ in out and "backend cuda" in out
print(f"wheel smoke test: deqfuse {deqfuse.__version__} from {here}; extension: {why}")

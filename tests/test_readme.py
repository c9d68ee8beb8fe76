"""The README's usage snippet runs as written (CPU: without the .cuda() of the graphed layer)."""
import os
import re
import warnings

import torch

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")


def test_readme_usage_snippet_runs():
    code = re.search(r"## Use\n\n```python\n(.*?)```", open(README).read(), re.S).group(1)
    if not torch.cuda.is_available():
        code = code.replace(".cuda()", "")
    ns = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(code, "README.md", "exec"), ns)
    assert ns["z"].shape == (256, 512) and ns["fuse"].cell.w1.grad is not None
    assert ns["info"].forward_stats.rows <= 256 * 55

"""The README's "Use" snippets run as written, one after another in one namespace (CPU)."""
import os
import re
import warnings

import torch

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")


def test_readme_use_snippets_run():
    text = open(README).read()
    use = text[text.index("## Use\n"):text.index("\n## ", text.index("## Use\n") + 1)]
    blocks = re.findall(r"```python\n(.*?)```", use, re.S)
    assert len(blocks) >= 3
    ns = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for code in blocks:
            exec(compile(code, "README.md", "exec"), ns)
    assert ns["logits"].shape == (32, 10) and ns["model"].fuse.cell.w1.grad is not None
    assert all(type(v) in (int, float) for v in ns["stats"].values())
    assert ns["out"].shape == (32, 10)  # the DynMM snippet's
    assert torch.all(ns["fuse"]([ns["tokens"], ns["pooled"]], mask=ns["mask"])[~ns["mask"]] == 0)
    assert sum(ns["rinfo"].counts) == 32 and 0 <= ns["rinfo"].saving < 1

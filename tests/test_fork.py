"""docs/fork.md's worked example, applied to a fresh copy of cfm_couplings.py: the guide cannot drift."""

import importlib
import os
import re
import sys

import torch

from conftest import ROOT, TINY_FLAGS


def test_the_fork_guide_adds_a_coupling_that_pairs_by_rank_and_trains(tmp_path, npz_data, one_thread):
    with open(os.path.join(ROOT, "docs", "fork.md")) as f:
        guide = f.read()
    anchors = re.findall(r"```python anchor\n(.*?)```", guide, re.S)
    replacements = re.findall(r"```python replace\n(.*?)```", guide, re.S)
    assert len(anchors) == len(replacements) == 2
    with open(os.path.join(ROOT, "cfm_couplings.py")) as f:
        src = f.read()
    for old, new in zip(anchors, replacements, strict=True):
        assert src.count(old) == 1, old  # every anchor is still a line of cfm_couplings.py
        src = src.replace(old, new)
    added = sum(
        len(n.strip().splitlines()) - len(o.strip().splitlines())
        for o, n in zip(anchors, replacements, strict=True)
    )
    assert added <= 20
    (tmp_path / "norm_cfm.py").write_text(src)
    sys.path.insert(0, str(tmp_path))
    try:
        fork = importlib.import_module("norm_cfm")
        x0, x1 = (
            torch.randn(16, 3, 4, 4),
            torch.randn(16, 3, 4, 4) * torch.linspace(0.1, 2, 16)[:, None, None, None],
        )
        i0, i1 = fork.couple(x0, x1, None, "norm-sort")
        n0, n1 = x0[i0].flatten(1).norm(dim=1), x1[i1].flatten(1).norm(dim=1)
        assert torch.equal(n0.argsort(), n1.argsort())  # the k-th smallest noise with the k-th smallest image
        assert sorted(i0.tolist()) == list(range(16))  # every noise once
        out = tmp_path / "run"
        fork.main(["--coupling", "norm-sort", "--data", npz_data, "--outdir", str(out), "--batch", "8",
                   "--duration", str(2 * 8 / 1e6), "--grid", "0", "--log-every", "1", *TINY_FLAGS])  # fmt: skip
        ckpt = torch.load(out / "latest.pt", weights_only=True)
        assert ckpt["step"] == 2 and ckpt["args"]["coupling"] == "norm-sort"
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("norm_cfm", None)

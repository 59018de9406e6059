"""The shared runtime block: data order, EMA, seeding, checkpoints, the fenced blocks themselves."""

import glob
import os
import re

import pytest
import torch

import edm_teacher as E
from conftest import ROOT


@pytest.mark.parametrize("n,batch", [(12, 4), (10, 4), (5, 8)])
def test_batch_stream_is_a_permutation_per_epoch(n, batch):
    steps = 7 * n // batch + 2
    stream = torch.cat([E.batch_indices(n, batch, s, seed=3) for s in range(steps)])
    for e in range(len(stream) // n):
        assert sorted(stream[e * n : (e + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n : 2 * n])  # a new order each epoch
    assert torch.equal(
        E.batch_indices(n, batch, 5, seed=3), stream[5 * batch : 6 * batch]
    )  # step-addressable
    assert not torch.equal(E.batch_indices(n, batch, 0, seed=4), stream[:batch])  # the seed matters


def test_edm_ema_half_life():
    assert E.edm_ema_beta(512, 0, 500, 0.05) == 0.0  # first step: EMA = weights
    beta = E.edm_ema_beta(512, 10**9, 500, 0.05)  # past ramp-up: half-life 500 kimg
    assert beta ** (500_000 / 512) == pytest.approx(0.5, rel=1e-9)
    ramp = E.edm_ema_beta(512, 1_000_000, 500, 0.05)  # ramp-up: half-life = 0.05 * 1 Mimg = 50 kimg
    assert ramp ** (50_000 / 512) == pytest.approx(0.5, rel=1e-9)
    net, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    w_net, w_ema = net.weight.detach().clone(), ema.weight.detach().clone()
    E.ema_update(ema, net, 0.9)
    torch.testing.assert_close(ema.weight, 0.9 * w_ema + 0.1 * w_net)


def test_seed_step_depends_on_seed_rank_and_step_only():
    def draw(*a):
        E.seed_step(*a)
        return torch.randn(3)

    assert torch.equal(draw(0, 0, 1, 5), draw(0, 0, 1, 5))
    assert (
        len({tuple(draw(*a).tolist()) for a in [(0, 0, 1, 5), (0, 0, 1, 6), (1, 0, 1, 5), (0, 3, 4, 5)]}) == 4
    )
    # the per-rank stream is seed * world_size + rank
    assert torch.equal(draw(1, 0, 1, 5), draw(0, 1, 1, 5))


def test_checkpoint_save_is_atomic_and_latest_points_at_newest(tmp_path):
    E.save_checkpoint({"step": 1, "w": torch.ones(2)}, str(tmp_path), 1)
    E.save_checkpoint({"step": 2, "w": torch.zeros(2)}, str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000001.pt", "ckpt-0000002.pt", "latest.pt"]
    assert E.load_checkpoint(str(tmp_path))["step"] == 2
    assert E.load_checkpoint(str(tmp_path / "ckpt-0000001.pt"))["step"] == 1


class Evil:
    def __reduce__(self):
        return (open, ("/tmp/edm_teacher_pwned", "w"))


def test_checkpoint_loader_never_executes_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"net": Evil()}, path)
    if os.path.exists("/tmp/edm_teacher_pwned"):
        os.remove("/tmp/edm_teacher_pwned")
    with pytest.raises(SystemExit, match="weights-only") as e:
        E.load_checkpoint(str(path))
    assert "\n" not in str(e.value)
    assert not os.path.exists("/tmp/edm_teacher_pwned")
    with pytest.raises(SystemExit, match="not found"):
        E.load_checkpoint(str(tmp_path / "missing.pt"))


FENCE = re.compile(r"^# --- shared: (.+) \(identical in (.+)\) ---$", re.M)
EVERY = "every method file"


def read(path):
    with open(path) as f:
        return f.read()


def shared_blocks(path):
    """{name: (scope, text)} of the fenced shared blocks of one file, fences included."""
    text, out = read(path), {}
    for m in FENCE.finditer(text):
        name, scope = m.group(1), m.group(2)
        end = f"# --- end shared: {name} ---\n"
        assert text.count(m.group(0)) == 1 and text.count(end) == 1, f"{path}: fence of the {name} block"
        out[name] = (scope, text[m.start() : text.index(end) + len(end)])
    return out


def test_fenced_shared_blocks_are_byte_identical_across_method_files():
    files = {os.path.basename(p)[:-3]: p for p in sorted(glob.glob(os.path.join(ROOT, "*.py")))}
    blocks = {m: shared_blocks(p) for m, p in files.items()}
    methods = [m for m, p in files.items() if re.search(r"^METHOD = ", read(p), re.M)]
    assert {"edm_teacher", "lmm"} <= set(methods)
    names = {name: scope for b in blocks.values() for name, (scope, _) in b.items()}
    assert {"UNet", "runtime", "data", "EDM preconditioning", "pairs reader"} <= set(names)
    for name, scope in names.items():
        owners = methods if scope == EVERY else [m for m in scope.split(", ") if m in files]
        holders = [m for m in files if name in blocks[m]]
        assert sorted(holders) == sorted(owners), f"shared {name} block: in {holders}, should be in {owners}"
        ref = blocks[owners[0]][name][1]
        assert len(ref.splitlines()) > 20
        for m in owners:
            assert blocks[m][name] == (scope, ref), f"{m}.py: shared {name} block drifted"


class _Parser(Exception):
    """Carries a script's ArgumentParser out of its parse_args (nothing is parsed or run)."""


def script_flags(name):
    """Every option string of `name`.py's command line, read from its real ArgumentParser."""
    import argparse
    import importlib

    module = importlib.import_module(name)
    original = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        raise _Parser(self)

    argparse.ArgumentParser.parse_args = grab
    try:
        module.parse_args([])
    except _Parser as e:
        return {o for action in e.args[0]._actions for o in action.option_strings}
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError(f"{name}.parse_args did not build an ArgumentParser")


SCRIPTS = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "*.py")))


@pytest.mark.parametrize("name", SCRIPTS)
def test_docstring_commands_name_real_flags(name):
    """Each command in a script's docstring (python X.py ... / torchrun ... X.py ...) uses only flags that
    X.py's parser defines, whichever script the docstring belongs to."""
    import importlib

    doc = (importlib.import_module(name).__doc__ or "").replace("\\\n", " ")
    checked = 0
    for line in doc.splitlines():
        m = re.search(r"\b(\w+)\.py\b(.*)", line)
        if not m or not re.search(r"\b(python|torchrun)\b", line):
            continue
        flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9_-]*)", m.group(2).split("#")[0]))  # not comments
        assert flags <= script_flags(m.group(1)), (name, m.group(1), flags - script_flags(m.group(1)))
        checked += 1
    assert checked or not hasattr(
        importlib.import_module(name), "METHOD"
    )  # every method file shows its commands


APPENDIX = "# === shared below this line: identical in every file; the method is above ==="


def test_each_file_opens_on_its_method_and_ends_on_the_shared_appendix():
    import ast

    for path in sorted(glob.glob(os.path.join(ROOT, "*.py"))):
        text = read(path)
        if not FENCE.search(text):
            continue  # evaluate.py, toy2d.py: no shared blocks
        lines, name = text.splitlines(), os.path.basename(path)
        assert text.count(APPENDIX) == 1, f"{name}: one appendix fence"
        at = lines.index(APPENDIX) + 1
        starts = [text[: m.start()].count("\n") + 1 for m in FENCE.finditer(text)]
        assert min(starts) > at, f"{name}: a shared block above the appendix"
        tree = ast.parse(text)
        first = next(n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef))
        assert first.lineno < at, f"{name}: the first definition is in the appendix"
        assert first.lineno <= 90, (
            f"{name}: the method starts at line {first.lineno}, not on the first screen"
        )
        after = [n for n in tree.body if n.lineno > at and not isinstance(n, ast.FunctionDef | ast.ClassDef)]
        after = [n for n in after if not isinstance(n, ast.Assign | ast.AnnAssign)]  # block constants
        assert len(after) == 1 and isinstance(after[0], ast.If) and after[0] is tree.body[-1], name
        ends = [i for i, line in enumerate(lines, 1) if line.startswith("# --- end shared: ")]
        assert all(not line.strip() for line in lines[max(ends) : after[0].lineno - 1]), (
            f"{name}: only `if __name__ == '__main__'` after the appendix"
        )

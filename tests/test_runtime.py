"""The runtime helpers: data order, EMA, seeding, checkpoints, the fenced blocks themselves, in edm_teacher
and aot_edm (their own small versions of data order, EMA, atomic saves and the safe checkpoint loader)."""

import glob
import os
import re
import sys

import pytest
import torch

import aot_edm as A
import edm_teacher as E
from conftest import ROOT

MODULES = {"aot_edm": A, "edm_teacher": E}


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("n,batch", [(12, 4), (10, 4), (5, 8)])
def test_batch_stream_is_a_permutation_per_epoch(n, batch, module):
    M = MODULES[module]
    steps = 7 * n // batch + 2
    stream = torch.cat([M.batch_indices(n, batch, s, seed=3) for s in range(steps)])
    for e in range(len(stream) // n):
        assert sorted(stream[e * n : (e + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n : 2 * n])  # a new order each epoch
    assert torch.equal(
        M.batch_indices(n, batch, 5, seed=3), stream[5 * batch : 6 * batch]
    )  # step-addressable
    assert not torch.equal(M.batch_indices(n, batch, 0, seed=4), stream[:batch])  # the seed matters


def test_aot_edm_keeps_edm_teachers_data_order():
    """aot_edm's rounds are slices of edm_teacher's data order."""
    for n, batch, step, seed in [(12, 4, 7, 3), (10, 4, 9, 0), (5, 8, 3, 1), (50000, 512, 300, 2)]:
        assert torch.equal(E.batch_indices(n, batch, step, seed), A.batch_indices(n, batch, step, seed))


@pytest.mark.parametrize("rampup, halflife, beta", [(1000, 0.016, 0.5**0.5), (0.5, 1, 0.5**2)])
def test_edm_ema_half_life_and_ramp_up(npz_data, tmp_path, one_thread, rampup, halflife, beta):
    """EDM's EMA: the first step copies the weights; then beta = 0.5 ** (batch / min(half-life, ramp-up ratio
    x images seen)): a half-life of 16 images (batch 8: beta = 0.5^0.5), or the ramp-up's 0.5 x 8 images."""
    flags = ["--data", npz_data, "--outdir", str(tmp_path), "--batch", "8", "--duration", "16e-6", "--tiny"]
    flags += ["--grid", "0", "--augment", "0", "--snap-every", "1", "--ema-halflife", str(halflife)]
    E.main([*flags, "--ema-rampup", str(rampup), "--lr-rampup", "0"])
    one, two = (torch.load(tmp_path / f"ckpt-000000{s}.pt", weights_only=True) for s in (1, 2))
    for k in one["net"]:
        assert torch.equal(one["ema"][k], one["net"][k])  # step 1: EMA = weights
        torch.testing.assert_close(two["ema"][k], two["net"][k].lerp(one["ema"][k], beta))
    assert any(not torch.equal(two["ema"][k], two["net"][k]) for k in one["net"])


def test_seed_step_depends_on_seed_rank_and_step_only():
    def draw(*a):
        A.seed_step(*a)
        return torch.randn(3)

    assert torch.equal(draw(0, 0, 1, 5), draw(0, 0, 1, 5))
    assert (
        len({tuple(draw(*a).tolist()) for a in [(0, 0, 1, 5), (0, 0, 1, 6), (1, 0, 1, 5), (0, 3, 4, 5)]}) == 4
    )
    # the per-rank stream is seed * world_size + rank
    assert torch.equal(draw(1, 0, 1, 5), draw(0, 1, 1, 5))


def test_checkpoint_save_is_atomic_and_latest_points_at_newest(npz_data, tmp_path, one_thread):
    flags = ["--data", npz_data, "--outdir", str(tmp_path), "--batch", "8", "--duration", "16e-6", "--tiny"]
    A.main([*flags, "--grid", "0", "--aot-pairs", "8", "--augment", "0", "--snap-every", "1"])
    names = sorted(n for n in os.listdir(tmp_path) if ".pt" in n)
    assert names == ["ckpt-0000001.pt", "ckpt-0000002.pt", "latest.pt"]
    assert A.load_checkpoint(str(tmp_path))["step"] == 2
    assert A.load_checkpoint(str(tmp_path / "ckpt-0000001.pt"))["step"] == 1
    # edm_teacher's loader reads the same layout: a run folder means its latest.pt
    assert E.load_checkpoint(str(tmp_path))["step"] == 2
    assert E.load_checkpoint(str(tmp_path / "ckpt-0000001.pt"))["step"] == 1


@pytest.mark.parametrize("module", MODULES)
def test_a_failed_save_never_leaves_a_half_written_file_under_the_final_name(tmp_path, monkeypatch, module):
    M, path = MODULES[module], str(tmp_path / "ckpt-0000001.pt")
    ckpt = dict(method=module, version=1, net_kwargs={}, net={}, ema={})  # the keys a loader requires
    M.atomic_save(dict(ckpt, step=1), path)
    assert os.listdir(tmp_path) == ["ckpt-0000001.pt"] and M.load_checkpoint(path)["step"] == 1
    save = torch.save

    def disk_full(obj, f, *a, **k):  # half a file, then the disk is full
        save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        M.atomic_save(dict(ckpt, step=2), path)
    assert M.load_checkpoint(path)["step"] == 1  # the old file, whole


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("module", MODULES)
def test_checkpoint_loader_never_executes_pickled_code(tmp_path, module):
    M, path, pwned = MODULES[module], tmp_path / "evil.pt", tmp_path / "pwned"
    torch.save({"net": Evil(str(pwned))}, path)
    with pytest.raises(SystemExit, match="weights-only") as e:
        M.load_checkpoint(str(path))
    assert "\n" not in str(e.value)
    assert not os.path.exists(pwned)
    with pytest.raises(SystemExit, match="not found") as e:
        M.load_checkpoint(str(tmp_path / "missing.pt"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("module", MODULES)
def test_a_corrupt_or_truncated_checkpoint_is_one_line(tmp_path, module):
    M, path = MODULES[module], tmp_path / "ckpt-0000001.pt"
    ckpt = dict(method=module, version=1, net_kwargs={}, net={}, ema={}, step=1)  # a loader's keys
    torch.save(dict(ckpt, w=torch.arange(20000.0)), path)  # 80 kB: the middle is tensor data
    data, mid = bytearray(path.read_bytes()), path.stat().st_size // 2
    data[mid : mid + 4] = bytes(b ^ 0xFF for b in data[mid : mid + 4])
    (tmp_path / "flipped.pt").write_bytes(bytes(data))  # torch.load alone would read changed weights
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:mid])  # a killed write
    for name, words in (("flipped.pt", "CRC"), ("cut.pt", "not a complete torch checkpoint")):
        with pytest.raises(SystemExit, match=words) as e:
            M.load_checkpoint(str(tmp_path / name))
        msg = str(e.value)
        assert msg.startswith("error: ") and "\n" not in msg and name in msg and "corrupt" in msg, msg
    assert M.load_checkpoint(str(path))["step"] == 1


def read(path):
    with open(path) as f:
        return f.read()


UNET_START = (
    "# --- UNet: identical in every file that builds a net (EDM's SongUNet / DhariwalUNet keys) ---\n"
)
UNET_END = "# --- end UNet ---\n"


def unet_block(path):
    text = read(path)
    assert text.count(UNET_START) == 1 and text.count(UNET_END) == 1, f"{path}: fences of the UNet block"
    return text[text.index(UNET_START) : text.index(UNET_END) + len(UNET_END)]


def method_files():
    files = {os.path.basename(p)[:-3]: p for p in sorted(glob.glob(os.path.join(ROOT, "*.py")))}
    return {m: p for m, p in files.items() if re.search(r"^METHOD = ", read(p), re.M)}


def test_the_unet_block_is_byte_identical_in_every_method_file_and_the_only_copy_in_edm_teacher():
    methods = method_files()
    assert {"edm_teacher", "aot_edm", "lmm", "cfm_couplings", "loom_cfm", "dansm"} <= set(methods)
    ref = unet_block(methods["edm_teacher"])
    assert 250 < len(ref.splitlines()) <= 320
    for m, p in methods.items():
        assert unet_block(p) == ref, f"{m}.py: the UNet block drifted from edm_teacher.py's"
    for m, p in methods.items():  # nothing else fenced or shared: no appendix, no "# --- shared: X" blocks
        assert "# === shared below" not in read(p) and "# --- shared: " not in read(p), m


class _Parser(Exception):
    """Carries a script's ArgumentParser out of its parse_args (nothing is parsed or run)."""


def script_flags(name):
    """Every option string of `name`.py's command line, read from its real ArgumentParser."""
    import argparse
    import importlib

    if (
        os.path.isfile(os.path.join(ROOT, "tools", name + ".py"))
        and os.path.join(ROOT, "tools") not in sys.path
    ):
        sys.path.append(os.path.join(ROOT, "tools"))
    module = importlib.import_module(name)
    original = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        raise _Parser(self)

    argparse.ArgumentParser.parse_args = grab
    try:
        (getattr(module, "parse_args", None) or module.main)([])  # tools/*.py build theirs in main
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


def test_a_minimal_file_opens_on_its_method_and_ends_on_the_unet_block():
    import ast

    for m, path in method_files().items():
        text = read(path)
        tree = ast.parse(text)
        first = next(n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef))
        assert first.lineno <= 120, f"{m}: the method starts at line {first.lineno}"
        tail = text[text.index(UNET_END) + len(UNET_END) :]
        assert tail.strip() == 'if __name__ == "__main__":\n    main()', (
            f"{m}: only the main guard after the UNet"
        )

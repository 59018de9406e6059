"""Nothing lost, nothing mixed, nothing executed: locks, refusals, integrity, non-finite values, leftovers."""

import fcntl
import json
import os
import re
import sys

import numpy as np
import pytest
import torch
from test_edm_train import train_flags
from test_gen_pairs import pairs_flags

import aot_edm as A
import cfm_couplings as C
import edm_teacher as E
import evaluate as V
import gen_pairs as G
import lmm as L
from conftest import read_log


def held_by_another(path, holder="pid 4242 on node7, started 2026-12-01 10:00:00"):
    """Hold `path`'s lock through a second open file description, as a concurrent run would."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.ftruncate(fd, 0)
    os.pwrite(fd, holder.encode(), 0)
    return fd


def test_a_second_writer_stops_at_once_and_names_the_holder(npz_data, teacher_ckpt, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    fd = held_by_another(str(out / ".lock"))
    with pytest.raises(SystemExit, match=r"locked by a running job \(pid 4242 on node7"):
        E.main(train_flags(npz_data, out, 1))
    assert sorted(os.listdir(out)) == [".lock"]  # nothing written
    pairs = tmp_path / "p.npz"
    fd2 = held_by_another(str(pairs) + ".lock")
    with pytest.raises(SystemExit, match="locked by a running job"):
        G.main(pairs_flags(teacher_ckpt, pairs))
    assert not os.path.exists(str(pairs) + ".partial")
    os.close(fd), os.close(fd2)  # the holder ends (or is killed): its stale lock file is taken over
    E.claim_outdir(str(out), None, False)
    assert (out / ".lock").read_text().startswith(f"pid {os.getpid()} on ")


def test_a_new_run_never_overwrites_an_old_one(npz_data, tmp_path, one_thread):
    out = tmp_path / "run"
    E.main(train_flags(npz_data, out, 2, extra=["--grid", "0"]))
    with pytest.raises(SystemExit, match="holds a run at step 2: pass --resume"):
        E.main(train_flags(npz_data, out, 1, extra=["--grid", "0"]))
    assert torch.load(out / "latest.pt", weights_only=True)["step"] == 2 and len(read_log(out)) == 2
    E.claim_outdir(str(out), None, overwrite=True)  # --overwrite: the old run's checkpoints and log go
    assert sorted(os.listdir(out)) == [".lock"]
    (tmp_path / "s.npz").write_bytes(b"earlier samples")
    gen = ["--generate", "2", "--ckpt", str(tmp_path / "none"), "--out", str(tmp_path / "s.npz")]
    with pytest.raises(SystemExit, match="s.npz exists; pass --overwrite"):  # before the checkpoint is read
        E.main(gen)
    with pytest.raises(SystemExit, match="checkpoint not found"):
        E.main([*gen, "--overwrite"])


def test_a_checkpoint_cannot_choose_which_module_runs(teacher_ckpt, tmp_path, monkeypatch):
    (tmp_path / "evil_module.py").write_text("import os\nos.environ['EVIL_RAN'] = '1'\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ckpt = torch.load(teacher_ckpt, weights_only=True)
    torch.save(dict(ckpt, method="evil_module"), tmp_path / "evil.pt")
    with pytest.raises(SystemExit, match="unknown method 'evil_module'; this project's are edm_teacher"):
        G.load_model(str(tmp_path / "evil.pt"), "cpu")
    with pytest.raises(SystemExit, match="unknown method"):
        V.load_checkpoint(str(tmp_path / "evil.pt"))
    assert "EVIL_RAN" not in os.environ and "evil_module" not in sys.modules


def write_pairs(path, noise, data, label=None):
    arrays = dict(noise=noise, data=data, **({} if label is None else dict(label=label)))
    np.savez(path, **arrays)
    return str(path)


def test_non_finite_or_unusable_pairs_are_refused_naming_the_pair(tmp_path):
    x = np.random.default_rng(0).standard_normal((40, 3, 4, 4)).astype(np.float32)
    bad = x.copy()
    bad[37, 1, 2, 3] = np.nan
    inf = x.copy()
    inf[3, 0, 0, 0] = np.inf
    for noise, data, where in ((x, bad, "'data' is not finite (NaN/inf) in pair 37"),
                               (inf, x, "'noise' is not finite (NaN/inf) in pair 3")):  # fmt: skip
        with pytest.raises(SystemExit, match=re.escape(where)):  # lmm.py refuses them at start-up
            L.load_pairs(write_pairs(tmp_path / "nan.npz", noise, data))
    for name, noise, label, what in (("int8", x.astype(np.int8), None, "must be float16/32/64"),
                                     ("zero", x[:0], None, "with at least one pair"),
                                     ("neg", x, -np.ones(40, np.int64), "'label' must be class indices >= 0")):  # fmt: skip
        p = write_pairs(tmp_path / f"{name}.npz", noise, noise, label)
        with pytest.raises(SystemExit, match=re.escape(what)):  # and cfm_couplings.py
            C.check_pairs(C.load_pairs(p), p, label is not None)
    p = write_pairs(tmp_path / "lab.npz", x, x, np.arange(40) % 3)
    assert C.check_pairs(C.load_pairs(p), p, True)[1] == 3


def test_a_non_finite_loss_stops_training_before_the_checkpoint(npz_data, tmp_path, monkeypatch):
    loss, calls = E.edm_loss, []

    def nan_at_step_2(*a, **k):
        calls.append(1)
        out = loss(*a, **k)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(E, "edm_loss", nan_at_step_2)
    with pytest.raises(SystemExit, match="non-finite loss at step 2: stopped before a checkpoint") as e:
        E.main(train_flags(npz_data, tmp_path / "run", 3, extra=["--snap-every", "1"]))
    assert "\n" not in str(e.value)
    assert sorted(n for n in os.listdir(tmp_path / "run") if n.startswith("ckpt")) == ["ckpt-0000001.pt"]


def test_aot_edm_stops_on_a_non_finite_loss_before_the_checkpoint(npz_data, tmp_path, monkeypatch):
    loss, calls = A.edm_loss, []

    def nan_at_step_2(*a, **k):
        calls.append(1)
        out = loss(*a, **k)
        return out * float("nan") if len(calls) == 2 else out

    monkeypatch.setattr(A, "edm_loss", nan_at_step_2)
    flags = ["--snap-every", "1", "--aot-pairs", "16", "--augment", "0"]
    with pytest.raises(SystemExit, match="non-finite loss at step 2: stopped before a checkpoint") as e:
        A.main(train_flags(npz_data, tmp_path / "run", 3, extra=flags))
    assert "\n" not in str(e.value)
    assert sorted(n for n in os.listdir(tmp_path / "run") if n.startswith("ckpt")) == ["ckpt-0000001.pt"]


def nan_teacher(teacher_ckpt, tmp_path):
    ckpt = torch.load(teacher_ckpt, weights_only=True)
    ema = dict(ckpt["ema"])
    key = next(k for k in ema if k.endswith("out_conv.weight") or k.endswith("aux_conv.weight"))
    ema[key] = torch.full_like(ema[key], float("nan"))
    torch.save(dict(ckpt, ema=ema), tmp_path / "nan.pt")
    return str(tmp_path / "nan.pt")


def test_non_finite_samples_never_become_pairs_or_a_score(teacher_ckpt, tmp_path, one_thread):
    bad = nan_teacher(teacher_ckpt, tmp_path)
    out = tmp_path / "p.npz"
    with pytest.raises(SystemExit, match="non-finite samples among pairs 0-3; no pairs file was written"):
        G.main(pairs_flags(bad, out))
    assert not out.exists() and not np.load(str(out) + ".partial/nfe.npy").any()  # no batch marked made
    module, net, _, _ = G.load_model(bad, "cpu")
    noise, labels, gens = V.inputs_for_seeds(range(2), (3, 16, 16), 3)
    with pytest.raises(SystemExit, match="made non-finite samples at NFE 3"):
        V.run_sampler(module, net, noise, 3, labels, gens)


def flip_bytes(path):
    data = bytearray(path.read_bytes())
    for i in np.random.default_rng(0).integers(2000, len(data) - 4000, 2000):  # inside the tensor data
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_edm_teacher_refuses_a_corrupt_or_empty_checkpoint_in_one_line(tmp_path):
    ckpt = dict(method="edm_teacher", version=1, net_kwargs={}, net={}, ema={}, step=1, w=torch.randn(20000))
    E.atomic_save(ckpt, str(tmp_path / "a.pt"))
    assert E.load_checkpoint(str(tmp_path / "a.pt"))["step"] == 1
    flip_bytes(tmp_path / "a.pt")
    with pytest.raises(SystemExit, match=r"a.pt is corrupt: its member .* fails its CRC check") as e:
        E.load_checkpoint(str(tmp_path / "a.pt"))
    assert "\n" not in str(e.value)
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(SystemExit, match="empty.pt is corrupt: not a complete torch checkpoint") as e:
        E.load_checkpoint(str(tmp_path / "empty.pt"))
    assert "\n" not in str(e.value)


def test_bad_numbers_and_shapes_are_one_line_errors(npz_data, tmp_path, capsys):
    for flag, value in (("--batch-gpu", "-1"), ("--lr", "-1e-3"), ("--generate", "-5")):
        with pytest.raises(SystemExit) as e:
            E.parse_args(train_flags(npz_data, tmp_path / "r", 1, extra=[flag, value]))
        assert e.value.code == 2 and flag in capsys.readouterr().err
    with pytest.raises(SystemExit):
        C.parse_args(["--coupling", "independent", "--sinkhorn-reg", "0"])
    assert "argument --sinkhorn-reg: 0 is not in (0, inf]" in capsys.readouterr().err
    net = C.build_net(dict(img_resolution=8, img_channels=3, channel_mult=[1], num_blocks=1,
                           attn_resolutions=[], model_channels=16))  # fmt: skip
    with pytest.raises(ValueError, match="dopri5 needs atol > 0 and rtol > 0"):  # it would never end
        C.sample(net, torch.randn(1, 3, 8, 8), 0, solver="dopri5", atol=0.0, rtol=0.0)
    E.main(train_flags(npz_data, tmp_path / "e", 1, extra=["--grid", "0"]))  # edm_teacher: other data
    np.savez(tmp_path / "d8.npz", images=np.zeros((4, 8, 8, 3), np.uint8))
    with pytest.raises(SystemExit, match="was trained on other data") as e:
        E.main(
            train_flags(str(tmp_path / "d8.npz"), tmp_path / "e", 2, extra=["--resume", str(tmp_path / "e")])
        )
    assert "\n" not in str(e.value)


def test_resume_cleans_leftovers_and_cuts_the_log_back_to_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "ckpt-0000009.pt.tmp123").write_bytes(b"half")
    (out / "latest.tmp").write_bytes(b"")  # the symlink aot_edm writes before renaming it latest.pt
    lines = [json.dumps(dict(step=s, loss=1.0)) + "\n" for s in range(1, 6)]
    (out / "log.jsonl").write_text("".join(lines) + '{"step": 6, "lo')  # killed mid-line
    A.claim_outdir(str(out), dict(step=3), False)  # aot_edm's
    assert sorted(os.listdir(out)) == [".lock", "log.jsonl"]
    assert (out / "log.jsonl").read_text() == "".join(lines[:3])
    out = tmp_path / "edm"  # and edm_teacher's own claim_outdir, with lines that are not its records
    out.mkdir()
    (out / "ckpt-0000009.pt.tmp123").write_bytes(b"half")
    junk = '["not", "ours"]\n{"no": "step"}\n{"step": "x"}\n'
    (out / "log.jsonl").write_text("".join(lines[:2]) + junk + "".join(lines[2:]) + '{"step": 6, "lo')
    E.claim_outdir(str(out), dict(step=3), False)
    assert sorted(os.listdir(out)) == [".lock", "log.jsonl"]
    assert (out / "log.jsonl").read_text() == "".join(lines[:3])


def test_a_kill_while_zipping_is_finished_by_the_rerun(teacher_ckpt, tmp_path, monkeypatch, one_thread):
    import zipfile

    out = tmp_path / "p.npz"

    def killed(*a, **k):
        raise KeyboardInterrupt  # as if killed while copying the arrays into the final zip

    monkeypatch.setattr(zipfile.ZipFile, "write", killed)
    with pytest.raises(SystemExit, match="130"):  # Ctrl-C: exit 130, no traceback
        G.main(pairs_flags(teacher_ckpt, out, num=6, batch=3))
    assert not out.exists() and (np.load(str(out) + ".partial/nfe.npy") == 5).all()  # both batches made
    monkeypatch.undo()
    G.main(pairs_flags(teacher_ckpt, out, num=6, batch=3))  # makes nothing again, zips, renames
    assert len(C.load_pairs(str(out))["noise"]) == 6 and not os.path.exists(str(out) + ".partial")
    assert sorted(os.listdir(tmp_path)) == sorted(["p.npz", "p.npz.lock", "teacher.pt"])


def test_gen_pairs_refuses_sampler_keywords_the_method_does_not_take(teacher_ckpt, tmp_path):
    with pytest.raises(SystemExit, match=r"--sampler-kw \{'atol': 1e-05\}: edm_teacher.sample refuses it"):
        G.main(pairs_flags(teacher_ckpt, tmp_path / "p.npz", extra=["--sampler-kw", "atol=1e-5"]))

"""gen_pairs.py: deterministic, resumable, memory-mapped pairs from any checkpoint."""

import json
import math
import os
import pathlib
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import cfm_couplings as C
import edm_teacher as E
import gen_pairs as G
from conftest import ROOT, TINY_NET, run_script

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def pairs_flags(teacher, out, num=14, batch=4, extra=()):
    return [
        "--ckpt",
        teacher,
        "--num-pairs",
        str(num),
        "--out",
        str(out),
        "--batch",
        str(batch),
        "--nfe",
        "5",
        "--seed",
        "100",
        "--cond",
        *extra,
    ]


def read(path):
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def test_pairs_identical_for_one_and_two_ranks_and_two_batch_sizes(teacher_ckpt, tmp_path, one_thread):
    G.main(pairs_flags(teacher_ckpt, tmp_path / "a.npz", batch=4))
    G.main(pairs_flags(teacher_ckpt, tmp_path / "b.npz", batch=3))
    r = run_script([*TORCHRUN, "gen_pairs.py", *pairs_flags(teacher_ckpt, tmp_path / "c.npz", batch=4)])
    assert r.returncode == 0, r.stderr[-3000:]
    a, b, c = read(tmp_path / "a.npz"), read(tmp_path / "b.npz"), read(tmp_path / "c.npz")
    assert a["noise"].shape == (14, 3, 16, 16) and a["label"].dtype == np.int64
    for key in ("noise", "data", "label"):
        assert np.array_equal(a[key], c[key]), key  # 1 vs 2 processes: bit-identical
    assert np.array_equal(a["noise"], b["noise"]) and np.array_equal(a["label"], b["label"])
    # batch 4 vs 3: the convolution kernels differ with the batch shape, so data agree to float rounding only
    assert np.abs(a["data"] - b["data"]).max() <= 1e-5 * np.abs(a["data"]).max()
    assert not os.path.exists(tmp_path / "a.npz.partial")  # removed once the file is complete
    meta = json.loads(str(a["meta"]))
    assert (
        meta["nfe_used"] == 5 and meta["seed"] == 100 and meta["num"] == 14 and len(meta["weights_crc"]) == 8
    )
    mm = C.load_pairs(str(tmp_path / "a.npz"))  # memory-mapped by its readers, the meta decoded
    assert isinstance(mm["data"], np.memmap) and np.array_equal(mm["data"], a["data"]) and mm["meta"] == meta
    # pair i is edm_teacher's image seed + i: same noise and label, and data = its sampler output
    noise, labels = E.noise_for_seeds(range(100, 114), (3, 16, 16), label_dim=3)
    assert np.array_equal(a["noise"], noise.numpy()) and np.array_equal(a["label"], labels.numpy())
    ckpt = torch.load(teacher_ckpt, weights_only=True)
    net = E.build_net(ckpt["net_kwargs"]).eval()
    net.load_state_dict(ckpt["ema"])
    x, _ = E.sample(net, noise[:4], 5, labels[:4])
    assert np.array_equal(a["data"][:4], x.numpy())
    assert np.abs(a["data"]).mean() > 0.05  # a non-trivial teacher


def test_kill_and_resume_equals_uninterrupted(teacher_ckpt, tmp_path):
    flags = pairs_flags(teacher_ckpt, tmp_path / "k.npz", num=24, batch=2, extra=["--nfe", "15"])
    nfe_file = tmp_path / "k.npz.partial" / "nfe.npy"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "gen_pairs.py", *flags], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip

    def made():
        try:
            return int((np.load(nfe_file) > 0).sum())
        except (OSError, ValueError):
            return 0

    deadline = time.time() + 120
    while time.time() < deadline and made() < 2:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    present = made()
    assert 2 <= present < 12 and not (tmp_path / "k.npz").exists()  # really interrupted mid-way
    # resume (makes only the missing batches), and an uninterrupted run: both with the killed run's thread count
    r = run_script([sys.executable, "gen_pairs.py", *flags])
    assert r.returncode == 0 and f"{present} of 12 batches present" in r.stdout, r.stderr[-2000:]
    u = pairs_flags(teacher_ckpt, tmp_path / "u.npz", num=24, batch=2, extra=["--nfe", "15"])
    r = run_script([sys.executable, "gen_pairs.py", *u])
    assert r.returncode == 0, r.stderr[-2000:]
    k, u = read(tmp_path / "k.npz"), read(tmp_path / "u.npz")
    for key in ("noise", "data", "label"):
        assert np.array_equal(k[key], u[key]), key


def test_no_flag_is_taken_by_torchrun():
    # torchrun parses every --flag on its command line, also those after the script: one that abbreviates
    # a torchrun option (e.g. --num for --numa-binding) breaks the torchrun command
    import argparse

    import torch.distributed.run

    theirs = [o for a in torch.distributed.run.get_args_parser()._actions for o in a.option_strings]
    import aot_edm
    import cfm_couplings
    import dansm
    import evaluate
    import lmm
    import loom_cfm

    for module in (E, G, lmm, evaluate, cfm_couplings, loom_cfm, aot_edm, dansm):
        parser = capture_parser(module, argparse)
        assert len(parser._actions) > 10
        for flag in (o for a in parser._actions for o in a.option_strings if o.startswith("--")):
            # --num: the documented single-process alias of --num-pairs / --num-images
            if flag in ("--help", "--num"):
                continue
            assert not [t for t in theirs if t.startswith(flag)], (module.__name__, flag)


def capture_parser(module, argparse):
    """The ArgumentParser that module.parse_args builds."""
    captured = {}
    original = argparse.ArgumentParser.parse_args

    def grab(self, *a, **k):
        captured["parser"] = self
        raise SystemExit(0)

    argparse.ArgumentParser.parse_args = grab
    try:
        module.parse_args([])
    except SystemExit:
        pass
    finally:
        argparse.ArgumentParser.parse_args = original
    return captured["parser"]


def gaussian_denoiser(x, s, class_labels=None):  # exact D for y ~ N(0.2, 0.5^2 I)
    return 0.2 + 0.25 / (0.25 + torch.as_tensor(s, dtype=torch.float64) ** 2) * (x - 0.2)


def test_pairs_of_a_gaussian_teacher_are_its_ode_endpoints():
    x0, x1, label, used = G.make_pairs(
        E, gaussian_denoiser, 3, 11, 7, (2, 4, 4), 0, 399, 3, torch.device("cpu")
    )
    assert label is None and used == 399 and x0.shape == (8, 2, 4, 4)
    assert torch.equal(x0, E.noise_for_seeds(range(10, 18), (2, 4, 4))[0])  # pair i: seed 7 + i
    exact = 0.2 + (80 * x0.double() - 0.2) * 0.5 / math.sqrt(0.25 + 80**2)  # closed-form x(sigma = 0)
    assert (x1.double() - exact).abs().max() < 1e-3 * (exact - 0.2).abs().max()


def test_the_readers_memory_map_the_pairs_instead_of_reading(tmp_path):
    n, shape = 4096, (3, 32, 32)  # 2 x 48 MiB of float32
    path = tmp_path / "big.npz"
    rng = np.random.default_rng(0)
    chunks = [rng.standard_normal((512, *shape), dtype=np.float32) for _ in range(n // 512)]
    big = np.concatenate(chunks)
    np.savez(path, noise=big, data=big, label=np.arange(n), meta=np.array("{}"))
    del big
    size = os.path.getsize(path)
    probe = (
        "import os, sys, numpy as np\n"
        f"sys.path.insert(0, {ROOT!r})\n"
        "import cfm_couplings\n"
        "rss = lambda: int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1]) * 1024\n"
        "before = rss()\n"
        f"p = cfm_couplings.load_pairs({str(path)!r})\n"
        "rows = p['data'][[5, 1000, 4000]]\n"
        "print(rss() - before, float(rows.sum()), p['noise'].shape, p['label'][4095])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout.split()
    grown = int(out[0])
    assert grown < size / 20, (grown, size)  # a few pages, not the 96 MiB file
    assert float(out[1]) == pytest.approx(float(np.concatenate(chunks)[[5, 1000, 4000]].sum()), rel=1e-5)
    # np.savez files (uncompressed) read the same way
    np.savez(tmp_path / "small.npz", noise=chunks[0][:3], label=np.arange(3))
    small = C.load_pairs(str(tmp_path / "small.npz"))
    assert np.array_equal(small["noise"], chunks[0][:3]) and small["label"].tolist() == [0, 1, 2]
    np.savez_compressed(tmp_path / "zip.npz", noise=chunks[0][:3])
    with pytest.raises(ValueError, match="compressed"):
        C.load_pairs(str(tmp_path / "zip.npz"))


def one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert msg.startswith("error: ") and "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


def test_bad_input(teacher_ckpt, tmp_path):
    with pytest.raises(SystemExit) as e:
        G.main(pairs_flags(str(tmp_path / "none.pt"), tmp_path / "o.npz"))
    one_line_error(e, "not found", "none.pt")
    (tmp_path / "corrupt.pt").write_bytes(b"garbage")
    with pytest.raises(SystemExit) as e:
        G.main(pairs_flags(str(tmp_path / "corrupt.pt"), tmp_path / "o.npz"))
    one_line_error(e, "corrupt.pt")
    pkl, url = str(tmp_path / "edm-cifar10-32x32-cond-vp.pkl"), "https://x.org/edm-cifar10-32x32-cond-vp.pkl"
    for teacher, pt in ((pkl, pkl[:-4] + ".pt"), (url, "edm-cifar10-32x32-cond-vp.pt")):
        with pytest.raises(SystemExit) as e:  # no unpickling or download here: tools/convert_edm.py first
            G.main(pairs_flags(teacher, tmp_path / "o.npz"))
        one_line_error(e, f"python tools/convert_edm.py {teacher} {pt} and pass {pt}")
    for num in ("0", "-5"):
        with pytest.raises(SystemExit) as e:
            G.main([*pairs_flags(teacher_ckpt, tmp_path / "o.npz"), "--num-pairs", num])
        assert e.value.code == 2  # argparse error
    with pytest.raises(SystemExit) as e:  # no abbreviations: torchrun reads --num as its --numa-binding
        G.main([*pairs_flags(teacher_ckpt, tmp_path / "o.npz"), "--num", "3"])
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        G.main(pairs_flags(teacher_ckpt, tmp_path / "missing_dir" / "o.npz"))
    one_line_error(e, "not writable")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:  # its folder is a file
        G.main(pairs_flags(teacher_ckpt, tmp_path / "file" / "o.npz"))
    one_line_error(e, "not writable")
    with pytest.raises(SystemExit) as e:
        G.main([a for a in pairs_flags(teacher_ckpt, tmp_path / "o.npz") if a != "--cond"])
    one_line_error(e, "class-conditional", "--cond")
    G.main(pairs_flags(teacher_ckpt, tmp_path / "o.npz", num=4))
    with pytest.raises(SystemExit) as e:
        G.main(pairs_flags(teacher_ckpt, tmp_path / "o.npz", num=4))
    one_line_error(e, "exists", "--overwrite")
    G.main([*pairs_flags(teacher_ckpt, tmp_path / "o.npz", num=4), "--overwrite"])


def interrupted_run(flags, monkeypatch, after=1):
    """Run gen_pairs in-process, stopped as if killed once `after` batches are on disk."""
    real, calls = G.make_pairs, []

    def make_then_stop(*a, **k):
        if len(calls) == after:
            raise KeyboardInterrupt  # Ctrl-C: exit 130, the batches made stay
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(G, "make_pairs", make_then_stop)
    with pytest.raises(SystemExit) as e:
        G.main(flags)
    assert e.value.code == 130
    monkeypatch.undo()


def test_refuses_to_mix_a_partial_run_of_another_seed_or_teacher(teacher_ckpt, tmp_path, monkeypatch):
    out = tmp_path / "m.npz"
    interrupted_run(pairs_flags(teacher_ckpt, out, num=8), monkeypatch)
    assert (np.load(str(out) + ".partial/nfe.npy") > 0).tolist() == [True, False]
    with pytest.raises(SystemExit) as e:
        G.main([*pairs_flags(teacher_ckpt, out, num=8), "--seed", "101"])
    one_line_error(e, "refusing to mix", "seed")
    other = tmp_path / "other.pt"
    ckpt = torch.load(teacher_ckpt, weights_only=True)
    ckpt["ema"]["model.enc.16x16_conv.bias"] += 1
    torch.save(ckpt, other)
    with pytest.raises(SystemExit) as e:
        G.main(pairs_flags(str(other), out, num=8))
    one_line_error(e, "refusing to mix", "weights_crc")
    G.main(pairs_flags(teacher_ckpt, out, num=8))  # the same settings: it resumes
    G.main(pairs_flags(teacher_ckpt, tmp_path / "u.npz", num=8))
    assert all(np.array_equal(read(out)[k], read(tmp_path / "u.npz")[k]) for k in ("noise", "data", "label"))


def test_a_forked_method_file_is_run_only_when_named(teacher_ckpt, tmp_path):
    fork = tmp_path / "my_edm.py"
    fork.write_text("import edm_teacher\nfrom edm_teacher import *  # noqa: F403\n\n\n"
                    "def sample(net, noise, nfe, labels=None, **kw):\n"
                    "    return edm_teacher.sample(net, -noise, nfe, labels, **kw)\n")  # fmt: skip
    ckpt = torch.load(teacher_ckpt, weights_only=True)
    torch.save(dict(ckpt, method="my_edm"), tmp_path / "fork.pt")
    with pytest.raises(SystemExit) as e:
        G.main(pairs_flags(str(tmp_path / "fork.pt"), tmp_path / "f.npz", num=4))
    one_line_error(e, "unknown method 'my_edm'", "--method")
    G.main([*pairs_flags(str(tmp_path / "fork.pt"), tmp_path / "f.npz", num=4), "--method", str(fork)])
    G.main(pairs_flags(teacher_ckpt, tmp_path / "e.npz", num=4))
    f, e_ = read(tmp_path / "f.npz"), read(tmp_path / "e.npz")
    assert np.array_equal(f["noise"], e_["noise"]) and not np.array_equal(f["data"], e_["data"])


def flag_a_member_as_directory(src, dst):
    """Set bit 4 ("directory", MS-DOS attributes) of a tensor member's central-directory record: the CRCs
    still pass, and torch would load that tensor from uninitialised memory."""
    data = bytearray(pathlib.Path(src).read_bytes())
    pos = data.index(b"PK\x01\x02")
    while b"/data/" not in data[pos + 46 : pos + 46 + struct.unpack_from("<H", data, pos + 28)[0]]:
        pos = data.index(b"PK\x01\x02", pos + 1)
    data[pos + 38] |= 0x10
    pathlib.Path(dst).write_bytes(bytes(data))


def wrong_checkpoints(teacher_ckpt, tmp_path):
    """Well-formed files with the wrong content, and a structurally damaged zip -> {path: expected words}."""
    ck = torch.load(teacher_ckpt, weights_only=True)
    flag_a_member_as_directory(teacher_ckpt, tmp_path / "dir.pt")
    files = {"tensor.pt": (torch.zeros(3), "not a checkpoint of this project"),
             "nokw.pt": ({k: v for k, v in ck.items() if k != "net_kwargs"}, "not a checkpoint of this project"),
             "shape.pt": (dict(ck, ema={k: v[:1] for k, v in ck["ema"].items()}), "do not fit"),
             "arch.pt": (dict(ck, net_kwargs=dict(ck["net_kwargs"], arch="nope")), "do not fit"),
             "future.pt": (dict(ck, version="2"), "version 2")}  # fmt: skip
    for name, (obj, _) in files.items():
        torch.save(obj, tmp_path / name)
    return {str(tmp_path / "dir.pt"): "is damaged", **{str(tmp_path / n): w for n, (_, w) in files.items()}}


def test_damaged_or_wrong_checkpoints_are_one_line_errors(teacher_ckpt, tmp_path):
    for path, words in wrong_checkpoints(teacher_ckpt, tmp_path).items():
        with pytest.raises(SystemExit) as e:
            G.main(pairs_flags(path, tmp_path / "o.npz", num=2))
        one_line_error(e, path, words)
    assert not os.path.exists(tmp_path / "o.npz.partial")


def test_bad_numbers_are_argparse_errors(teacher_ckpt, tmp_path):
    for flag, value in (("--seed", "-1"), ("--seed", str(2**63)), ("--batch", str(2**20 + 1)), ("--nfe", "nan"),
                        ("--num-pairs", "inf"), ("--batch", "0")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            G.parse_args([*pairs_flags(teacher_ckpt, tmp_path / "o.npz"), flag, value])
        assert e.value.code == 2, (flag, value)


def flow_teacher(tmp_path):
    torch.manual_seed(0)
    kw = dict(img_resolution=16, img_channels=3, label_dim=0, dropout=0.0, **TINY_NET)
    sd = C.build_net(kw).state_dict()
    torch.save(
        dict(method="cfm_couplings", version=1, args={}, net_kwargs=kw, net=sd, ema=sd, step=0),
        tmp_path / "f.pt",
    )
    return str(tmp_path / "f.pt")


def test_sampler_values_a_method_refuses_and_os_errors_are_one_line(teacher_ckpt, tmp_path, monkeypatch):
    flow = flow_teacher(tmp_path)
    kws = [
        "solver=dopri5,atol=0",
        "solver=rk99",
        "solver=dopri5,atol=abc",
        "solver=dopri5,atol=1e-300,rtol=1e-300",
    ]
    for i, kw in enumerate(kws):  # values sample() refuses, tolerances that underflow torchdiffeq's dt
        flags = pairs_flags(flow, tmp_path / f"o{i}.npz", num=2, extra=["--sampler-kw", kw])
        with pytest.raises(SystemExit) as e:
            G.main([f for f in flags if f != "--cond"])
        one_line_error(e, "--sampler-kw", "cfm_couplings.sample refuses it")
    with pytest.raises(SystemExit) as e:  # OUT.partial would be a name over 255 characters: before any work
        G.main(pairs_flags(teacher_ckpt, tmp_path / ("p" * 244 + ".npz"), num=2))
    one_line_error(e, "too long")
    monkeypatch.setattr(
        G, "write_rows", lambda path, *a: (_ for _ in ()).throw(OSError(28, "No space left on device", path))
    )
    with pytest.raises(SystemExit) as e:  # a full disk
        G.main(pairs_flags(teacher_ckpt, tmp_path / "full.npz", num=2))
    one_line_error(e, "full.npz.partial/noise.npy: No space left on device")

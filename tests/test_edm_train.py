"""edm_teacher.py as a program: training, resume, torchrun, generation and its errors."""

import json
import os
import re
import sys

import numpy as np
import pytest
import torch

import edm_teacher as E
from conftest import TINY_FLAGS, read_log, run_script
from conftest import TINY_NET as TINY_NET_KW


def train_flags(data, outdir, steps, batch=8, extra=(), net=TINY_FLAGS):
    # duration is in Mimg: `steps` steps of `batch` images
    return [
        "--data",
        data,
        "--outdir",
        str(outdir),
        "--batch",
        str(batch),
        "--duration",
        str(steps * batch / 1e6),
        "--lr-rampup",
        "0",
        "--ema-halflife",
        "0.05",
        "--augment",
        "0",
        "--grid",
        "4",
        "--nfe",
        "3",
        "--log-every",
        "1",
        *net,
        *extra,
    ]


def test_training_writes_checkpoint_grid_and_log(npz_data, tmp_path):
    out = tmp_path / "run"
    E.main(train_flags(npz_data, out, 3, extra=["--cond", "--xflip", "copies", "--snap-every", "2"]))
    files = sorted(os.listdir(out))
    assert files == [
        ".lock",
        "ckpt-0000002.pt",
        "ckpt-0000003.pt",
        "grid-0000002.png",
        "grid-0000003.png",
        "latest.pt",
        "log.jsonl",
    ]
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert ckpt["method"] == "edm_teacher" and ckpt["step"] == 3 and ckpt["kimg"] == 0.024
    assert ckpt["net_kwargs"]["label_dim"] == 3 and ckpt["args"]["cond"]
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    assert [r["lr"] for r in read_log(out)] == [1e-3] * 3  # --lr-rampup 0: no warm-up
    net = E.build_net(ckpt["net_kwargs"])
    net.load_state_dict(ckpt["ema"])
    x, nfe = E.sample(net.eval(), torch.randn(2, 3, 16, 16), 5, labels=torch.tensor([0, 2]))
    assert x.shape == (2, 3, 16, 16) and nfe == 5 and torch.isfinite(x).all()


def test_loss_decreases_on_a_tiny_overfit_problem(tmp_path, one_thread):
    images = np.zeros((4, 16, 16, 3), dtype=np.uint8)  # four flat colours
    images[:] = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255]], dtype=np.uint8)[:, None, None, :]
    data = tmp_path / "flat.npz"
    np.savez(data, images=images)
    extra = ["--dropout", "0", "--snap-every", "1000", "--grid", "0", "--lr", "5e-3"]
    E.main(train_flags(str(data), tmp_path / "run", 100, batch=16, extra=extra))
    ckpt = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)
    torch.manual_seed(0)  # the run's initial weights: same seed, same constructor
    net = E.build_net(ckpt["net_kwargs"]).eval()
    y = torch.from_numpy(images).permute(0, 3, 1, 2).float().repeat(4, 1, 1, 1) / 127.5 - 1
    sigma = torch.tensor([0.02, 0.1, 0.3, 1.0]).repeat_interleave(4).view(-1, 1, 1, 1)  # fixed evaluation
    n = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = E.edm_loss(net, y, sigma=sigma, n=n).mean().item()
        net.load_state_dict(ckpt["net"])
        after = E.edm_loss(net, y, sigma=sigma, n=n).mean().item()
    assert after < 0.5 * before, (before, after)  # measured: 1.85 -> 0.76


def test_resume_equals_uninterrupted_bit_exact(npz_data, tmp_path):
    # with gradient accumulation and EDM's augmentation (p = 0.5 so that every batch has resampled images)
    flags = ["--xflip", "copies", "--cond", "--batch-gpu", "4", "--snap-every", "100", "--augment", "0.5"]
    E.main(train_flags(npz_data, tmp_path / "a", 6, extra=flags))
    E.main(train_flags(npz_data, tmp_path / "b", 3, extra=flags))
    E.main(train_flags(npz_data, tmp_path / "b", 6, extra=[*flags, "--resume", str(tmp_path / "b")]))
    a = torch.load(tmp_path / "a" / "ckpt-0000006.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt-0000006.pt", weights_only=True)
    assert a["step"] == b["step"] == 6
    for key in ("net", "ema"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), (key, name)
    for i, state in a["opt"]["state"].items():
        assert all(torch.equal(v, b["opt"]["state"][i][k]) for k, v in state.items())
    # and the run did move: different from its own step-3 checkpoint
    mid = torch.load(tmp_path / "b" / "ckpt-0000003.pt", weights_only=True)
    assert not torch.equal(mid["net"]["model.enc.16x16_conv.weight"], a["net"]["model.enc.16x16_conv.weight"])


def test_torchrun_two_processes_train_and_generate_reads_the_run(npz_data, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = tmp_path / "run"
    # an augment-label net trained without augmentation: its mapping gets zero labels, so DDP sees every weight
    flags = ["--cond", "--augment-dim", "9", "--augment", "0"]
    r = run_script([*torchrun, "edm_teacher.py", *train_flags(npz_data, out, 2, extra=flags)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(f for f in os.listdir(out) if f.startswith("ckpt")) == ["ckpt-0000002.pt"]
    assert [rec["step"] for rec in read_log(out)] == [1, 2]  # rank 0 logs, once per step
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert ckpt["args"]["batch"] == 8 and ckpt["kimg"] == 0.016 and ckpt["net_kwargs"]["augment_dim"] == 9
    assert ckpt["state"]["world"] == 2
    gen = ["--generate", "8", "--ckpt", str(out), "--nfe", "3", "--seed", "7", "--S-churn", "10"]
    E.main([*gen, "--out", str(tmp_path / "one.npz"), "--gen-batch", "3"])
    one = np.load(tmp_path / "one.npz")
    assert one["images"].shape == (8, 16, 16, 3) and one["images"].dtype == np.uint8
    assert one["seeds"].tolist() == list(range(7, 15)) and one["labels"].shape == (8,)
    assert os.path.isfile(tmp_path / "one.png")


def test_churn_noise_is_per_image_for_any_batch_split_and_window():
    """EDM Alg. 2 with per-seed generators: 8 seeds sampled as one batch of 8 or as batches of 3 agree."""
    torch.manual_seed(0)
    net = E.build_net(dict(img_resolution=16, img_channels=3, label_dim=3, dropout=0.0, **TINY_NET_KW)).eval()
    seeds = list(range(100, 108))
    for window in (dict(), dict(S_min=0.05, S_max=5.0)):
        kw = dict(S_churn=20.0, **window)
        noise, labels, gens = E.noise_for_seeds(seeds, (3, 16, 16), 3, with_generators=True)
        whole, _ = E.sample(net, noise, 7, labels, generator=gens, **kw)
        parts = []
        for i in range(0, 8, 3):
            noise, labels, gens = E.noise_for_seeds(seeds[i : i + 3], (3, 16, 16), 3, with_generators=True)
            parts.append(E.sample(net, noise, 7, labels, generator=gens, **kw)[0])
        assert torch.allclose(torch.cat(parts), whole, atol=1e-5)
        # one generator for the whole batch would tie image i to its batch: the test can tell
        noise, labels = E.noise_for_seeds(seeds[:3], (3, 16, 16), 3)
        shared, _ = E.sample(net, noise, 7, labels, generator=torch.Generator().manual_seed(100), **kw)
        assert (shared - whole[:3]).abs().max() > 0.1
        deterministic, _ = E.sample(net, noise, 7, labels)
        assert (deterministic - whole[:3]).abs().max() > 0.1  # churn is on


def test_churn_noise_is_drawn_at_every_step_as_edms_sampler():
    """EDM's edm_sampler draws each step's churn noise whether or not the step lies in [S_min, S_max]: a window
    that excludes every step gives the deterministic result, yet each image's generator has advanced by one
    draw per step, so the stream matches EDM's for any window."""
    torch.manual_seed(0)
    net = E.build_net(dict(img_resolution=16, img_channels=3, dropout=0.0, **TINY_NET_KW)).eval()
    noise, _, gens = E.noise_for_seeds([5, 6], (3, 16, 16), with_generators=True)
    x, nfe = E.sample(net, noise, 7, generator=gens, S_churn=10.0, S_min=1e6)  # 4 steps, none in the window
    assert nfe == 7 and torch.equal(x, E.sample(net, noise, 7)[0])
    _, _, ref = E.noise_for_seeds([5, 6], (3, 16, 16), with_generators=True)
    for g in ref:
        torch.randn((4, 3, 16, 16), generator=g, dtype=torch.float64)  # 4 draws of the image's shape
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(gens, ref, strict=True))


def one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert msg.startswith("error: ") and "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_bad_input_gives_one_line_errors(npz_data, tmp_path, monkeypatch):
    with pytest.raises(SystemExit) as e:
        E.main(train_flags(str(tmp_path / "missing.npz"), tmp_path / "o", 1))
    one_line_error(e, "not found", "missing.npz")

    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 16, 16), dtype=np.uint8))
    with pytest.raises(SystemExit) as e:
        E.main(train_flags(str(bad), tmp_path / "o", 1))
    one_line_error(e, "[N, H, W, C]", "(4, 16, 16)")

    np.savez(bad, pixels=np.zeros((4, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(SystemExit) as e:
        E.main(train_flags(str(bad), tmp_path / "o", 1))
    one_line_error(e, "images", "bad.npz")

    np.savez(bad, images=np.zeros((4, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(SystemExit) as e:
        E.main(train_flags(str(bad), tmp_path / "o", 1, extra=["--cond"]))
    one_line_error(e, "--cond", "labels")

    with pytest.raises(SystemExit) as e:
        E.main(train_flags(npz_data, tmp_path / "o", 1, extra=["--batch-gpu", "3"]))
    one_line_error(e, "--batch-gpu 3")

    monkeypatch.setattr(E, "setup", lambda: (False, 0, 3, torch.device("cpu")))  # as if 3 processes
    with pytest.raises(SystemExit) as e:
        E.main(train_flags(npz_data, tmp_path / "o", 1))
    one_line_error(e, "--batch 8", "divisible", "3 processes")


def test_cifar10_offline_is_a_clear_error(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    def offline(*a, **k):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(cifar, "download_and_extract_archive", offline)
    with pytest.raises(SystemExit) as e:
        E.main(train_flags("cifar10", tmp_path / "o", 1, extra=["--data-dir", str(tmp_path / "ds")]))
    one_line_error(e, "CIFAR-10", "cifar-10-python.tar.gz", str(tmp_path / "ds"))


def test_error_exit_code_and_no_traceback_from_the_command_line(tmp_path):
    r = run_script([sys.executable, "edm_teacher.py", "--data", str(tmp_path / "nope.npz")])
    assert r.returncode != 0
    assert "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert "nope.npz" in r.stderr


def test_sigterm_saves_a_checkpoint_that_resumes(npz_data, tmp_path):
    import signal
    import subprocess

    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "edm_teacher.py",
        *train_flags(npz_data, out, 10**6, extra=["--snap-every", "100000"]),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=os.path.dirname(E.__file__), env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step=2/"):  # progress with its ETA, also when stdout is a pipe or file
            assert f"step=2/{10**6} " in line and " eta=" in line, line
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143 and "stopped by signal" in rest, rest  # 128 + SIGTERM: requeue me
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert ckpt["step"] >= 2
    E.main(train_flags(npz_data, out, ckpt["step"] + 1, extra=["--resume", str(out)]))
    assert torch.load(out / "latest.pt", weights_only=True)["step"] == ckpt["step"] + 1
    with open(out / "log.jsonl") as f:  # cut back to the checkpoint on resume: each step once
        steps = [json.loads(line)["step"] for line in f]
    assert steps == list(range(1, ckpt["step"] + 2)), steps


def test_prepared_array_from_an_edm_folder_trains_conditionally(tmp_path):
    """tools/prepare_data.py's memory-mapped array (labels from dataset.json) is --data; --xflip copies mirrors."""
    from PIL import Image

    sys.path.insert(0, os.path.join(os.path.dirname(E.__file__), "tools"))
    import prepare_data

    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    os.makedirs(tmp_path / "imgs" / "sub")
    names = ["sub/b.png", "a.png", "c.png", "d.png"]
    for name, img in zip(names, images, strict=True):
        Image.fromarray(img).save(tmp_path / "imgs" / name)
    with open(tmp_path / "imgs" / "dataset.json", "w") as f:
        json.dump({"labels": [[n, i % 3] for i, n in enumerate(names)]}, f)
    prepare_data.main([str(tmp_path / "imgs"), str(tmp_path / "data.npy")])
    x, y = E.load_data(str(tmp_path / "data.npy"))
    order = [1, 2, 3, 0]  # sorted paths: a.png, c.png, d.png, sub/b.png
    assert isinstance(x, np.memmap) and np.array_equal(x, images[order]) and y.tolist() == [1, 2, 0, 0]
    batch, labels = E.get_batch(x, y, torch.tensor([0, 4]), torch.device("cpu"))  # 4: image 0 mirrored
    assert torch.equal(batch[1], batch[0].flip(2)) and labels.tolist() == [1, 1]
    assert torch.equal(batch[0], torch.from_numpy(images[1]).permute(2, 0, 1).float() / 127.5 - 1)
    flags = ["--cond", "--xflip", "copies"]
    E.main(train_flags(str(tmp_path / "data.npy"), tmp_path / "run", 2, batch=4, extra=flags))
    assert torch.load(tmp_path / "run" / "latest.pt", weights_only=True)["net_kwargs"]["label_dim"] == 3


ADM_FLAGS = ["--arch", "adm", "--model-channels", "64", "--channel-mult", "1,2", "--num-blocks", "1"]
ADM_FLAGS += ["--attn-res", "8", "--cond"]  # 2 heads of 64 channels at 8x8, class-conditional


def test_adm_trains_resumes_bit_exactly_under_torchrun_and_samples(npz_data, tmp_path, one_thread):
    snap = ["--snap-every", "100"]
    E.main(train_flags(npz_data, tmp_path / "a", 3, extra=snap, net=ADM_FLAGS))
    E.main(train_flags(npz_data, tmp_path / "b", 2, extra=snap, net=ADM_FLAGS))
    E.main(train_flags(npz_data, tmp_path / "b", 3, extra=["--resume", str(tmp_path / "b")], net=ADM_FLAGS))
    ca, cb = (torch.load(tmp_path / d / "latest.pt", weights_only=True) for d in ("a", "b"))
    assert ca["net_kwargs"]["arch"] == "adm" and "model.out_conv.weight" in ca["ema"]  # ADM's keys
    assert ca["step"] == cb["step"] == 3 and all(torch.equal(v, cb["net"][k]) for k, v in ca["net"].items())
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = tmp_path / "tr"
    r = run_script([*torchrun, "edm_teacher.py", *train_flags(npz_data, out, 1, net=ADM_FLAGS)])
    assert r.returncode == 0, r.stderr[-3000:]
    E.main(["--generate", "4", "--ckpt", str(out), "--nfe", "3", "--out", str(tmp_path / "adm.npz")])
    assert np.load(tmp_path / "adm.npz")["images"].shape == (4, 16, 16, 3)


# --- reliability (issue 35): nothing lost, nothing silently wrong ---


def test_resume_into_another_runs_folder_is_refused_unless_overwrite(npz_data, tmp_path, one_thread):
    a, b, quiet = tmp_path / "a", tmp_path / "b", ["--grid", "0"]
    E.main(train_flags(npz_data, a, 1, extra=quiet))
    E.main(train_flags(npz_data, b, 3, extra=quiet))
    msg = re.escape(f"{b} holds another run (step 3); resume {a} into its own folder or pass --overwrite")
    with pytest.raises(SystemExit, match=msg):
        E.main(train_flags(npz_data, b, 2, extra=[*quiet, "--resume", str(a)]))
    assert torch.load(b / "latest.pt", weights_only=True)["step"] == 3 and len(read_log(b)) == 3
    E.main(train_flags(npz_data, b, 2, extra=[*quiet, "--resume", str(a / "latest.pt"), "--overwrite"]))
    assert sorted(n for n in os.listdir(b) if n.startswith("ckpt")) == ["ckpt-0000002.pt"]
    assert [r["step"] for r in read_log(b)] == [2]  # the old run's checkpoints and log went first
    E.main(train_flags(npz_data, tmp_path / "c", 2, extra=[*quiet, "--resume", str(a)]))  # a new folder: fine


def test_non_finite_weights_are_never_saved_or_sampled(npz_data, tmp_path, one_thread):
    E.main(train_flags(npz_data, tmp_path / "run", 1, extra=["--grid", "0"]))
    ckpt = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)
    ckpt["ema"]["model.enc.16x16_conv.weight"][0, 0, 0, 0] = float("nan")  # one NaN EMA weight
    E.atomic_save(ckpt, str(tmp_path / "nan.pt"))
    resume = ["--grid", "0", "--resume", str(tmp_path / "nan.pt")]
    with pytest.raises(SystemExit, match="non-finite weights at step 2: not saved; the newest checkpoint is"):
        E.main(train_flags(npz_data, tmp_path / "r2", 2, extra=resume))
    assert not [n for n in os.listdir(tmp_path / "r2") if n.endswith(".pt")]
    out = tmp_path / "s.npz"
    with pytest.raises(SystemExit, match="non-finite samples") as e:
        E.main(["--generate", "2", "--ckpt", str(tmp_path / "nan.pt"), "--nfe", "3", "--out", str(out)])
    one_line_error(e, "nan.pt")
    assert not out.exists() and not (tmp_path / "s.png").exists()


def test_generate_locks_its_outputs_and_never_replaces_them_without_overwrite(teacher_ckpt, tmp_path):
    import fcntl

    gen = ["--generate", "2", "--ckpt", teacher_ckpt, "--nfe", "3", "--out", str(tmp_path / "s.npz")]
    fd = os.open(tmp_path / "s.npz.lock", os.O_RDWR | os.O_CREAT)  # a second job on the same --out
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(SystemExit, match="s.npz is locked by a running job"):
        E.main(gen)
    os.close(fd)
    (tmp_path / "s.png").write_bytes(b"a figure")
    with pytest.raises(SystemExit, match="s.png exists; pass --overwrite"):
        E.main(gen)
    assert (tmp_path / "s.png").read_bytes() == b"a figure" and not (tmp_path / "s.npz").exists()
    E.main([*gen, "--overwrite"])
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 16, 16, 3)


def test_only_this_files_temporaries_are_removed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("ckpt-0000009.pt.tmp12", "latest.tmp", "log.jsonl.tmp", "notes.tmp2024", "p.npz.tmp_backup"):
        (out / name).write_text("x")
    E.claim_outdir(str(out), None, False)
    assert sorted(os.listdir(out)) == [".lock", "notes.tmp2024", "p.npz.tmp_backup"]


def test_a_checkpoint_member_flagged_as_a_folder_is_refused(teacher_ckpt, tmp_path):
    import zipfile

    with zipfile.ZipFile(teacher_ckpt) as z:
        name = next(i.filename for i in z.infolist() if i.filename.endswith("/data/0"))
    with open(teacher_ckpt, "rb") as f:
        data = bytearray(f.read())
    pos = data.find(b"PK\x01\x02")  # central-directory records: name length at 28, name at 46
    while data[pos + 46 : pos + 46 + int.from_bytes(data[pos + 28 : pos + 30], "little")].decode() != name:
        pos = data.find(b"PK\x01\x02", pos + 1)
    data[pos + 38] |= 0x10  # the MS-DOS "directory" attribute: the CRCs still pass
    (tmp_path / "flip.pt").write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=re.escape(f"flip.pt is corrupt: its member {name} is damaged")):
        E.load_checkpoint(str(tmp_path / "flip.pt"))


def test_resume_with_another_world_size_prints_a_note(npz_data, tmp_path, monkeypatch, capsys, one_thread):
    out = tmp_path / "run"
    E.main(train_flags(npz_data, out, 1, extra=["--grid", "0"]))
    assert torch.load(out / "latest.pt", weights_only=True)["state"]["world"] == 1
    monkeypatch.setattr(E, "setup", lambda: (False, 0, 2, torch.device("cpu")))  # as if rank 0 of 2
    E.main(train_flags(npz_data, out, 2, extra=["--grid", "0", "--resume", str(out)]))
    assert "note: saved with 1 process(es), resumed with 2: the per-rank noise" in capsys.readouterr().out


def test_os_errors_are_one_line(npz_data, teacher_ckpt, tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit) as e:  # --outdir that is a file
        E.main(train_flags(npz_data, tmp_path / "file", 1))
    one_line_error(e, "file")
    with pytest.raises(SystemExit) as e:  # --out in a folder that is a file
        E.main(["--generate", "1", "--ckpt", teacher_ckpt, "--out", str(tmp_path / "file" / "s.npz")])
    one_line_error(e, "s.npz")


def test_numbers_out_of_range_are_argparse_errors(capsys):
    bad = [("--lr", "nan"), ("--ema-halflife", "inf"), ("--seed", "-1"), ("--seed", str(2**63)), ("--dropout", "1"),
           ("--channel-mult", ","), ("--S-churn", "nan"), ("--S-noise", "-1"), ("--augment", "1.5"),
           ("--batch", str(2**21)), ("--duration", "0"), ("--grid", "-1"), ("--nfe", "0")]  # fmt: skip
    for flag, value in bad:
        with pytest.raises(SystemExit) as e:
            E.parse_args(["--data", "shapes", flag, value])
        assert e.value.code == 2 and flag in capsys.readouterr().err, (flag, value)


def test_bad_labels_and_truncated_data_files_are_one_line(tmp_path):
    x = np.zeros((4, 8, 8, 3), np.uint8)
    for name, lab in (("float", np.arange(4.0)), ("bool", np.ones(4, bool)), ("huge", np.full(4, 2**40))):
        np.savez(tmp_path / f"{name}.npz", images=x, labels=lab)
        with pytest.raises(SystemExit, match="labels must be integer class indices in") as e:
            E.load_data(str(tmp_path / f"{name}.npz"))
        one_line_error(e, f"{name}.npz")
    np.savez(tmp_path / "ok.npz", images=np.zeros((64, 8, 8, 3), np.uint8))
    data = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit, match="cannot read .*cut.npz") as e:
        E.load_data(str(tmp_path / "cut.npz"))
    one_line_error(e)


def test_checkpoints_with_the_wrong_content_are_one_line(npz_data, teacher_ckpt, tmp_path, one_thread):
    ckpt = torch.load(teacher_ckpt, weights_only=True)
    cases = dict(
        tensor=(torch.zeros(3), "it lacks method, version"),
        no_kwargs=({k: v for k, v in ckpt.items() if k != "net_kwargs"}, "it lacks net_kwargs"),
        future=(dict(ckpt, version=99), "version 99"),
        other=(dict(ckpt, method="lmm"), "a 'lmm' checkpoint"),
        arch=(dict(ckpt, net_kwargs=dict(ckpt["net_kwargs"], arch="unet9")), "unknown network architecture"),
        shapes=(dict(ckpt, ema={k: v[:1] for k, v in ckpt["ema"].items()}), "size mismatch"),
    )
    for name, (obj, words) in cases.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        with pytest.raises(SystemExit) as e:
            E.main(["--generate", "1", "--ckpt", str(tmp_path / f"{name}.pt"), "--out", str(tmp_path / "s")])
        one_line_error(e, f"{name}.pt", words)
    net = {k: v[:1] for k, v in ckpt["net"].items()}
    torch.save(dict(ckpt, net=net, ema=net, opt={}, state=dict(nimg=0)), tmp_path / "r.pt")
    with pytest.raises(SystemExit) as e:  # --resume: the same one line
        E.main(train_flags(npz_data, tmp_path / "o", 1, extra=["--cond", "--resume", str(tmp_path / "r.pt")]))
    one_line_error(e, "r.pt", "size mismatch")

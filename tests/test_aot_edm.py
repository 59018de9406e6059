"""aot_edm.py: the assignment against brute force, class-wise solve, equality with edm_teacher.py when the
coupling is off, round consumption over ranks, the overlapped solve, resume inside a round, torchrun, the rho
sweep, the recipe's defaults, bad input, and what issue 35 asks of every file (nothing lost, nothing silently
wrong)."""

import fcntl
import itertools
import json
import os
import sys
import threading
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import aot_edm as A
import edm_teacher as E
from conftest import TINY_FLAGS, read_log, run_script


@pytest.mark.parametrize("n", [2, 4, 6])
def test_assignment_is_a_permutation_with_brute_force_cost(n):
    g = torch.Generator().manual_seed(n)
    eps, y = torch.randn(n, 3, 4, 4, generator=g), torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    perm = A.aot_assign(eps, y)
    assert sorted(perm.tolist()) == list(range(n))
    w = A.aot_cost(eps, y)
    assert torch.allclose(w[1, 0], (y[1] - eps[0]).double().norm())  # Sec. 4: the L2 distance
    best = min(sum(w[i, p[i]].item() for i in range(n)) for p in itertools.permutations(range(n)))
    got = sum(w[i, perm[i]].item() for i in range(n))
    assert got == pytest.approx(best, rel=1e-9) and got <= w.diag().sum().item() + 1e-9


def test_classwise_assignment_stays_in_class_and_keeps_each_class_noise():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (30,), generator=g)
    eps, y = torch.randn(30, 8, generator=g), torch.randn(30, 8, generator=g)
    perm = A.aot_assign(eps, y, labels)
    assert torch.equal(labels[perm], labels)  # image i's noise came from a position of its own class
    for k in range(3):
        own = torch.nonzero(labels == k).flatten()
        assert sorted(perm[own].tolist()) == own.tolist()
    assert not torch.equal(perm, torch.arange(30))


def tiny(out, data, *extra, steps=3, batch=8):
    argv = [
        "--data",
        data,
        "--outdir",
        str(out),
        "--batch",
        str(batch),
        "--duration",
        str(steps * batch / 1e6),
    ]
    return argv + [*TINY_FLAGS, "--log-every", "1", "--grid", "0", *extra]


def weights(out):
    return torch.load(os.path.join(out, "latest.pt"), weights_only=True)


def test_without_the_assignment_a_step_is_edm_teachers_step(tmp_path, npz_data, one_thread):
    E.main(tiny(tmp_path / "edm", npz_data, "--cond", "--augment", "0"))
    A.main(tiny(tmp_path / "off", npz_data, "--cond", "--aot-pairs", "8", "--assign", "0", "--augment", "0"))
    A.main(tiny(tmp_path / "on", npz_data, "--cond", "--aot-pairs", "8", "--augment", "0"))
    edm, off, on = (weights(tmp_path / d) for d in ("edm", "off", "on"))
    for k in edm["net"]:
        assert torch.equal(edm["net"][k], off["net"][k]), k
    assert any(not torch.equal(edm["net"][k], on["net"][k]) for k in edm["net"])  # the coupling matters


def test_every_pair_of_a_round_is_used_once_across_ranks(npz_data):
    images, _ = A.load_data(npz_data)
    args = SimpleNamespace(batch=8, aot_pairs=8, seed=0, P_mean=-1.2, P_std=1.2, augment=0.0)
    for r in range(3):  # each round: 8 pairs per rank, 16 of the epoch stream's images in all
        rounds = [A.aot_round(args, images, None, 32, r, rank, 2, "cpu") for rank in range(2)]
        used = torch.cat([y for y, *_ in rounds])
        assert torch.equal(used, A.get_batch(images, None, A.batch_indices(32, 16, r, 0), "cpu")[0])
        noise = torch.cat([eps for *_, eps in rounds])
        assert len({tuple(v.flatten()[:4].tolist()) for v in noise}) == 16  # each rank its own noise


def test_resume_inside_a_round_equals_uninterrupted(tmp_path, npz_data, one_thread):
    flags = ["--aot-pairs", "24", "--cond", "--augment", "0.5"]  # 3 steps a round; stop inside rounds
    A.main(tiny(tmp_path / "a", npz_data, *flags, "--overlap", "off", steps=5))  # b: overlapped (default)
    A.main(tiny(tmp_path / "b", npz_data, *flags, steps=2))
    A.main(tiny(tmp_path / "b", npz_data, *flags, steps=4) + ["--resume", str(tmp_path / "b")])
    A.main(tiny(tmp_path / "b", npz_data, *flags, steps=5) + ["--resume", str(tmp_path / "b")])
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    for key in ("net", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)


def test_overlap_solves_the_next_round_in_the_background_with_the_serial_numbers(
    tmp_path, npz_data, one_thread, monkeypatch
):
    solve, where = A.aot_solve, []

    def spy(eps, y, labels, args):
        where.append(threading.current_thread() is threading.main_thread())
        return solve(eps, y, labels, args)

    monkeypatch.setattr(A, "aot_solve", spy)
    for overlap in ("on", "off"):  # 3 rounds of 2 steps
        A.main(tiny(tmp_path / overlap, npz_data, "--aot-pairs", "16", "--overlap", overlap, steps=6))
    assert where == [True, False, False] + [True, True, True]  # rounds 1 and 2 solved while 0 and 1 train
    on, off = weights(tmp_path / "on"), weights(tmp_path / "off")
    assert all(torch.equal(on[p][k], off[p][k]) for p in ("net", "ema") for k in on[p])
    rec_on, rec_off = (read_log(tmp_path / d) for d in ("on", "off"))
    assert [r["cost_after"] for r in rec_on] == [r["cost_after"] for r in rec_off]
    assert all(r["cost_after"] < r["cost_before"] for r in rec_on)


def test_a_failed_background_solve_stops_training(tmp_path, npz_data, monkeypatch):
    assign, calls = A.aot_assign, []

    def broken_at_round_2(*a, **k):
        calls.append(threading.current_thread().name)
        if len(calls) == 3:
            raise ValueError("cost matrix is infeasible")
        return assign(*a, **k)

    monkeypatch.setattr(A, "aot_assign", broken_at_round_2)
    with pytest.raises(ValueError, match="cost matrix is infeasible"):  # not lost in the thread
        A.main(tiny(tmp_path / "run", npz_data, "--aot-pairs", "8", "--augment", "0", steps=4))
    assert len(calls) == 3 and calls[2] != threading.main_thread().name


def test_torchrun_two_ranks(tmp_path, npz_data):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "aot_edm.py"]
    flags = ["--aot-pairs", "8", "--batch-gpu", "2", "--augment", "0.5"]  # with EDM's augmentation
    r = run_script([*cmd, *tiny(tmp_path / "run", npz_data, *flags)])
    assert r.returncode == 0, r.stderr[-2000:]
    with open(tmp_path / "run" / "log.jsonl") as f:
        recs = [json.loads(line) for line in f]
    assert len(recs) == 3 and all(r["cost_after"] < r["cost_before"] for r in recs)


def test_rho_sweep_prints_a_table_through_evaluate(tmp_path, npz_data, one_thread, capsys):
    A.main(tiny(tmp_path / "run", npz_data, steps=1, batch=8) + ["--aot-pairs", "8"])
    evaluate = f"--test-features random-cnn --ref-data {npz_data} --batch 8 --num-images 8"
    argv = ["--sweep-rho", "3,90", "--ckpt", str(tmp_path / "run"), "--sweep-steps", "2,3", "--eval-args"]
    values = np.array(A.sweep_rho(A.parse_args([*argv, evaluate])), dtype=float)
    head, *rows = [line.split() for line in capsys.readouterr().out.splitlines()[-3:]]
    assert head[-2:] == ["2", "3"] and [float(row[0]) for row in rows] == [3, 90]
    assert np.allclose([[float(v) for v in row[1:]] for row in rows], values, rtol=1e-3)
    assert A.parse_args(["--sweep-rho", "--ckpt", "x"]).sweep_rho == [3, 5, 9, 16, 27, 47, 81, 140, 243, 421]
    assert values.shape == (2, 2) and np.isfinite(values).all()
    assert values[0, 0] == values[1, 0]  # 2 steps are (80, 0.002, 0) for any rho
    assert values[0, 1] != values[1, 1]  # with 3 the middle level moves: rho reaches the sampler


def test_generate_writes_per_seed_images_of_the_ema(tmp_path, npz_data, one_thread):
    A.main(tiny(tmp_path / "run", npz_data, "--cond", "--aot-pairs", "8", steps=1))
    out = ["--ckpt", str(tmp_path / "run"), "--nfe", "5", "--rho", "90", "--gen-batch", "2"]
    A.main(["--generate", "3", *out, "--out", str(tmp_path / "a.npz")])
    A.main(["--generate", "2", *out, "--out", str(tmp_path / "b.npz"), "--seed", "1"])
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["images"].shape == (3, 16, 16, 3) and a["images"].dtype == np.uint8 and len(a["labels"]) == 3
    assert np.array_equal(a["images"][1:], b["images"]) and np.array_equal(a["labels"][1:], b["labels"])
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        A.main(["--generate", "3", *out, "--out", str(tmp_path / "a.npz")])


def test_recipe_defaults():
    """EDM-AOT's runs: NCSN++ on CIFAR-10, EDM's augmentation p = 0.12, Sec. 5.1's batch and pairs."""
    args = A.parse_args(["--data", "cifar10"])
    assert (args.arch, args.augment, args.augment_dim, args.batch, args.aot_pairs) == (
        "ncsnpp",
        0.12,
        9,
        256,
        512,
    )
    assert (args.model_channels, args.channel_mult, args.num_blocks, args.attn_res) == (
        128,
        [2, 2, 2],
        4,
        [16],
    )
    args = A.parse_args(["--data", "x.npz", "--cond"])
    assert (args.arch, args.augment, args.batch, args.aot_pairs) == ("ddpmpp", 0.12, 128, 2048)
    assert (args.nfe, args.rho, args.ema_halflife, args.lr_rampup, args.overlap) == (35, 7.0, 500, 10, True)


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--aot-pairs", "12"], "multiple of the per-process batch 8"),
        (["--cond", "--aot-pairs", "2", "--batch", "2"], "smaller than the 3 classes"),
        (["--aot-pairs", "64"], "exceeds the 32 training images"),
    ],
)
def test_bad_input_gives_one_line_errors(tmp_path, npz_data, extra, match):
    argv = tiny(tmp_path / "run", npz_data)
    with pytest.raises(SystemExit, match=match):
        A.main(argv + extra)


# --- issue 35: nothing lost, nothing silently wrong ---


def test_resuming_into_another_runs_folder_needs_overwrite(tmp_path, npz_data, one_thread):
    flags = ("--aot-pairs", "8", "--augment", "0")
    A.main(tiny(tmp_path / "a", npz_data, *flags, steps=1))
    A.main(tiny(tmp_path / "b", npz_data, *flags, steps=2))
    b = weights(tmp_path / "b")
    resume = tiny(tmp_path / "b", npz_data, *flags, steps=2) + [
        "--resume",
        str(tmp_path / "a" / "ckpt-0000001.pt"),
    ]
    with pytest.raises(
        SystemExit, match=r"b holds another run \(step 2\); resume .*ckpt-0000001.pt into its own"
    ) as e:
        A.main(resume)
    assert (
        "\n" not in str(e.value)
        and weights(tmp_path / "b")["step"] == 2
        and len(read_log(tmp_path / "b")) == 2
    )
    A.main(resume + ["--overwrite"])  # b's old files go first, as for a new run
    assert sorted(n for n in os.listdir(tmp_path / "b") if ".pt" in n) == ["ckpt-0000002.pt", "latest.pt"]
    assert [r["step"] for r in read_log(tmp_path / "b")] == [2]
    assert all(torch.equal(b["net"][k], v) for k, v in weights(tmp_path / "b")["net"].items())  # a, resumed
    A.main(
        tiny(tmp_path / "c", npz_data, *flags, steps=2) + ["--resume", str(tmp_path / "a")]
    )  # a new folder
    assert weights(tmp_path / "c")["step"] == 2


def test_non_finite_weights_are_never_saved_nor_sampled(tmp_path, npz_data, one_thread):
    A.main(tiny(tmp_path / "run", npz_data, "--aot-pairs", "8", steps=1))
    ckpt = weights(tmp_path / "run")
    ckpt["ema"][next(k for k in ckpt["ema"] if k.endswith("aux_conv.weight"))][0, 0, 0, 0] = float("nan")
    torch.save(ckpt, tmp_path / "nan.pt")
    msg = "non-finite weights at step 2: not saved; the newest checkpoint is the last good one"
    with pytest.raises(SystemExit, match=msg):
        A.main(
            tiny(tmp_path / "more", npz_data, "--aot-pairs", "8", steps=2)
            + ["--resume", str(tmp_path / "nan.pt")]
        )
    assert not [n for n in os.listdir(tmp_path / "more") if n.startswith("ckpt")]
    gen = [
        "--generate",
        "2",
        "--ckpt",
        str(tmp_path / "nan.pt"),
        "--nfe",
        "3",
        "--out",
        str(tmp_path / "s.npz"),
    ]
    with pytest.raises(SystemExit, match=r"non-finite samples from .*nan.pt \(seeds 0...\): nothing written"):
        A.main(gen)
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.png").exists()


def test_generate_refuses_a_second_writer_its_png_and_reports_os_errors_in_one_line(
    tmp_path, npz_data, one_thread, monkeypatch
):
    A.main(tiny(tmp_path / "run", npz_data, "--aot-pairs", "8", steps=1))
    gen = ["--generate", "2", "--ckpt", str(tmp_path / "run"), "--nfe", "3", "--out", str(tmp_path / "s.npz")]
    fd = os.open(tmp_path / "s.npz.lock", os.O_RDWR | os.O_CREAT)  # another job holds --out
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(SystemExit, match="s.npz is locked by a running job"):
        A.main(gen)
    os.close(fd)
    (tmp_path / "s.png").write_bytes(b"a figure")
    with pytest.raises(SystemExit, match="s.png exists; pass --overwrite"):
        A.main(gen)
    assert (tmp_path / "s.png").read_bytes() == b"a figure" and not (tmp_path / "s.npz").exists()
    A.main([*gen, "--overwrite"])
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 16, 16, 3)
    assert (tmp_path / "s.png").read_bytes()[1:4] == b"PNG"
    (tmp_path / "file").write_text("not a folder")
    for argv, words in ((tiny(tmp_path / "file", npz_data, "--aot-pairs", "8"), "file: File exists"),
                        ([*gen[:-1], str(tmp_path / "file" / "s.npz")], "s.npz.lock: Not a directory")):  # fmt: skip
        with pytest.raises(SystemExit, match=words) as e:
            A.main(argv)
        assert str(e.value).startswith("error: ") and "\n" not in str(e.value)

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(A, "sample", ctrl_c)
    with pytest.raises(SystemExit) as e:
        A.main([*gen, "--overwrite"])
    assert e.value.code == 130


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path, npz_data, monkeypatch, one_thread):
    real_open = open

    def full_disk(path, *a, **k):  # the checkpoint's temporary file is on a full disk (Linux's /dev/full)
        return real_open("/dev/full" if ".pt.tmp" in str(path) else path, *a, **k)

    monkeypatch.setattr(A, "open", full_disk, raising=False)  # torch.save to a path would raise RuntimeError
    with pytest.raises(SystemExit, match="No space left on device") as e:
        A.main(tiny(tmp_path / "run", npz_data, "--aot-pairs", "8", steps=1))
    assert "\n" not in str(e.value) and not (tmp_path / "run" / "latest.pt").exists()


def test_claim_outdir_removes_only_the_temporary_files_it_writes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    ours = ["ckpt-0000009.pt.tmp123", "latest.tmp", "log.jsonl.tmp"]
    users = ["notes.tmp2024", "ckpt-0000001.pt.tmp_backup", "latest.pt.tmp", "grid.tmp.png"]
    for name in ours + users:
        (out / name).write_bytes(b"")
    A.claim_outdir(str(out), None, False)
    assert sorted(os.listdir(out)) == sorted([".lock", *users])


def test_a_member_flagged_as_a_folder_is_a_corrupt_checkpoint(tmp_path, npz_data, one_thread):
    A.main(tiny(tmp_path / "run", npz_data, "--aot-pairs", "8", steps=1))
    data = bytearray((tmp_path / "run" / "ckpt-0000001.pt").read_bytes())
    name = data.rindex(
        b"/data/0"
    )  # its central-directory record: external_attr at byte 38, "directory" bit 4
    data[data.rindex(b"PK\x01\x02", 0, name) + 38] |= 0x10
    (tmp_path / "flagged.pt").write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r"flagged.pt is corrupt: its member .*/data/0 is damaged") as e:
        A.load_checkpoint(str(tmp_path / "flagged.pt"))
    assert "\n" not in str(e.value)


def test_the_world_size_is_stored_and_a_change_is_noted_on_resume(tmp_path, npz_data, one_thread, capsys):
    A.main(tiny(tmp_path / "run", npz_data, "--aot-pairs", "8", steps=1))
    ckpt = weights(tmp_path / "run")
    assert ckpt["state"]["world"] == 1
    ckpt["state"]["world"] = 2
    torch.save(ckpt, tmp_path / "run" / "ckpt-0000001.pt")
    capsys.readouterr()
    A.main(
        tiny(tmp_path / "run", npz_data, "--aot-pairs", "8", steps=2) + ["--resume", str(tmp_path / "run")]
    )
    assert "note: saved with 2 process(es), resumed with 1: the rounds" in capsys.readouterr().out


def test_every_number_flag_refuses_out_of_range_values(capsys):
    cases = [("--lr", "nan"), ("--ema-halflife", "inf"), ("--duration", "0"), ("--seed", "-1"),
             ("--seed", str(2**63)), ("--dropout", "1"), ("--batch", str(2**20 + 1)), ("--channel-mult", ""),
             ("--model-channels", "0"), ("--augment", "1.5"), ("--rho", "0"), ("--rho", "nan"),
             ("--sweep-rho", "3,nan"), ("--P-mean", "-inf"), ("--generate", "-1")]  # fmt: skip
    for flag, value in cases:
        with pytest.raises(SystemExit) as e:
            A.parse_args(["--data", "x.npz", flag, value])
        assert e.value.code == 2 and flag in capsys.readouterr().err, (flag, value)


def test_data_files_that_are_not_what_they_claim_are_one_line_errors(tmp_path):
    x = np.zeros((4, 8, 8, 3), np.uint8)
    np.savez(tmp_path / "float.npz", images=x, labels=np.zeros(4))
    np.savez(tmp_path / "bool.npz", images=x, labels=np.zeros(4, bool))
    np.savez(tmp_path / "huge.npz", images=x, labels=np.full(4, 2**40))
    np.savez(tmp_path / "ok.npz", images=x)
    (tmp_path / "cut.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:300])
    with open(tmp_path / "over.npy", "wb") as f:  # the header says 40 images, the file holds 4
        np.lib.format.write_array_header_1_0(
            f, {"descr": "|u1", "fortran_order": False, "shape": (40, 8, 8, 3)}
        )
        f.write(x.tobytes())
    for name in ("float.npz", "bool.npz", "huge.npz", "cut.npz", "over.npy"):
        with pytest.raises(SystemExit) as e:
            A.load_data(str(tmp_path / name))
        assert str(e.value).startswith("error: ") and name in str(e.value) and "\n" not in str(e.value)


def test_checkpoints_with_the_wrong_content_are_one_line_errors(tmp_path, npz_data, one_thread):
    A.main(tiny(tmp_path / "run", npz_data, "--aot-pairs", "8", steps=1))
    good = weights(tmp_path / "run")
    bad = {"tensor": (torch.zeros(3), "it lacks method, version, net_kwargs"),
           "no_kwargs": ({k: v for k, v in good.items() if k != "net_kwargs"}, "it lacks net_kwargs"),
           "edm": (dict(good, method="edm_teacher"), "is a 'edm_teacher' checkpoint"),
           "future": (dict(good, version=2), "of version 2"),
           "shape": (dict(good, net_kwargs=dict(good["net_kwargs"], model_channels=32)), "size mismatch"),
           "arch": (dict(good, net_kwargs=dict(good["net_kwargs"], arch="unet3000")), "unknown network arch")}  # fmt: skip
    for name, (content, words) in bad.items():
        torch.save(content, tmp_path / f"{name}.pt")
        out = ["--out", str(tmp_path / f"{name}.npz")]
        for argv in (["--generate", "1", "--ckpt", str(tmp_path / f"{name}.pt"), *out],
                     tiny(tmp_path / name, npz_data, "--aot-pairs", "8", steps=2) + ["--resume", str(tmp_path / f"{name}.pt")]):  # fmt: skip
            with pytest.raises(SystemExit, match=words) as e:
                A.main(argv)
            assert str(e.value).startswith("error: ") and "\n" not in str(e.value), (name, str(e.value))


def test_the_sampler_refuses_keywords_it_cannot_use():
    net = A.build_net(
        dict(img_resolution=8, img_channels=3, model_channels=16, channel_mult=[1], num_blocks=1)
    )
    for kw in (dict(rho=0.0), dict(rho=float("nan")), dict(sigma_min=0.0), dict(sigma_max=float("inf"))):
        with pytest.raises(ValueError, match="sample needs"):
            A.sample(net, torch.randn(1, 3, 8, 8), 3, **kw)

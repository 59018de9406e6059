"""aot_edm.py: the assignment against brute force, class-wise solve, equality with edm_teacher.py when the
coupling is off, round consumption over ranks, the overlapped solve, resume inside a round, torchrun, the rho
sweep, the recipe's defaults, bad input."""

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
@pytest.mark.parametrize("cost", ["l2", "sqeuclidean"])
def test_assignment_is_a_permutation_with_brute_force_cost(n, cost):
    g = torch.Generator().manual_seed(n)
    eps, y = torch.randn(n, 3, 4, 4, generator=g), torch.rand(n, 3, 4, 4, generator=g) * 2 - 1
    perm = A.aot_assign(eps, y, cost=cost)
    assert sorted(perm.tolist()) == list(range(n))
    w = A.aot_cost(eps, y, cost)
    best = min(sum(w[i, p[i]].item() for i in range(n)) for p in itertools.permutations(range(n)))
    got = A.pair_cost(eps[perm], y, cost).sum().item()
    assert got == pytest.approx(best, rel=1e-9) and got <= A.pair_cost(eps, y, cost).sum().item() + 1e-9


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


def test_rho_sweep_writes_a_table_through_evaluate(tmp_path, npz_data, one_thread):
    A.main(tiny(tmp_path / "run", npz_data, steps=1, batch=8) + ["--aot-pairs", "8"])
    out = tmp_path / "sweep.json"
    eval_args = f"--test-features random-cnn --ref-data {npz_data} --batch 8 --num-images 8"
    A.main(["--sweep-rho", "3,90", "--ckpt", str(tmp_path / "run"), "--sweep-steps", "2,3",
            "--eval-args", eval_args, "--out-json", str(out)])  # fmt: skip
    table = json.loads(out.read_text())
    assert A.parse_args(["--sweep-rho", "--ckpt", "x"]).sweep_rho == [3, 5, 9, 16, 27, 47, 81, 140, 243, 421]
    values = np.array(table["fid"], dtype=float)
    assert table["rhos"] == [3, 90] and values.shape == (2, 2) and np.isfinite(values).all()
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

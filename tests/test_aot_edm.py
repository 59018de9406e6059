"""aot_edm.py: the assignment against brute force, class-wise solve, equality with edm_teacher.py when the
coupling is off, round consumption over ranks, resume inside a round, torchrun, the rho sweep, bad input."""

import itertools
import json
import os
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import aot_edm as A
import edm_teacher as E
from conftest import TINY_FLAGS, run_script


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
    E.main(tiny(tmp_path / "edm", npz_data, "--cond", "--augment", "0"))  # aot_edm's default for an .npz
    A.main(tiny(tmp_path / "off", npz_data, "--cond", "--aot-pairs", "8", "--assign", "0"))
    A.main(tiny(tmp_path / "on", npz_data, "--cond", "--aot-pairs", "8"))
    edm, off, on = (weights(tmp_path / d) for d in ("edm", "off", "on"))
    for k in edm["net"]:
        assert torch.equal(edm["net"][k], off["net"][k]), k
    assert any(not torch.equal(edm["net"][k], on["net"][k]) for k in edm["net"])  # the coupling matters


def test_every_pair_of_a_round_is_used_once_across_ranks(npz_data):
    images, labels = A.load_images(npz_data)
    args = SimpleNamespace(
        batch=8, aot_pairs=8, seed=0, P_mean=-1.2, P_std=1.2, assign=1, cost="l2", augment=0.0, overlap=False
    )
    ranks = [A.Rounds(args, images, None, 32, (3, 16, 16), torch.device("cpu"), r, 2) for r in range(2)]
    for rnd in range(3):  # each round: 2 steps of 4 images per rank
        used = torch.cat([rk.step(rnd * 2 + s)[0] for rk in ranks for s in range(2)])
        idx = A.batch_indices(32, 16, rnd, 0)
        expect = A.get_batch(images, None, idx, "cpu")[0]
        assert torch.equal(used, expect)  # the round's 16 images, each exactly once
        noise = torch.cat([rk.step(rnd * 2 + s)[2] for rk in ranks for s in range(2)])
        assert len({tuple(v.flatten()[:4].tolist()) for v in noise}) == 16


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


def rounds_for(npz_data, overlap, assign=1):
    images, _ = A.load_images(npz_data)
    args = SimpleNamespace(batch=8, aot_pairs=16, seed=3, P_mean=-1.2, P_std=1.2, assign=assign,
                           cost="l2", augment=0.3, overlap=overlap)  # fmt: skip
    return A.Rounds(args, images, None, 32, (3, 16, 16), torch.device("cpu"), 0, 1)


def test_overlapped_solve_gives_the_serial_assignments_and_random_state(npz_data):
    serial, overlapped = rounds_for(npz_data, False), rounds_for(npz_data, True)
    for step in range(6):  # 3 rounds of 2 steps
        outs = []
        for rk in (serial, overlapped):
            A.seed_step(3, 0, 1, step)
            A.draw_sigma(8, -1.2, 1.2, "cpu")
            y, _, eps, stats, aug = rk.step(step)
            outs.append((y, eps, aug, torch.randn(4)))  # the global RNG after the step's draws
            if step % 2 == 0:
                assert (rk.pending is not None) == rk.args.overlap  # the next round is being solved
        for a, b in zip(*outs, strict=True):
            assert torch.equal(a, b)
    overlapped.close()


def test_a_failed_background_solve_stops_with_one_line(npz_data, monkeypatch):
    def broken(*a, **k):
        raise ValueError("cost matrix is infeasible")

    rk = rounds_for(npz_data, True)
    rk.step(0)  # round 0 in the foreground, round 1 started in the background
    rk.pending[1].join()
    monkeypatch.setattr(A, "aot_assign", broken)  # the thread started at round 1 for round 2 calls this
    rk.step(2)
    with pytest.raises(
        SystemExit, match="background assignment solve of round 2 failed: ValueError: cost matrix"
    ):
        rk.step(4)


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
    eval_args = f"--feature-extractor random-cnn --ref-data {npz_data} --batch 8"
    A.main(["--sweep-rho", "--ckpt", str(tmp_path / "run"), "--rhos", "3,90", "--sweep-steps", "2,3",
            "--num-images", "8", "--eval-args", eval_args, "--out-json", str(out)])  # fmt: skip
    table = json.loads(out.read_text())
    assert A.parse_args(["--sweep-rho", "--ckpt", "x"]).fid_seeds == 3  # the paper's lowest of three
    values = np.array(table["table"], dtype=float)
    assert table["rhos"] == [3, 90] and values.shape == (2, 2) and np.isfinite(values).all()
    assert values[0, 0] == values[1, 0]  # 2 steps are (80, 0.002, 0) for any rho
    assert values[0, 1] != values[1, 1]  # with 3 the middle level moves: rho reaches the sampler


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

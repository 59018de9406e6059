"""loom_cfm.py: the counter-based noise against a Python reference and N(0, 1), Theorem 1 (non-increasing
cost, stationarity, no improving swap in a tried minibatch, larger minibatch no worse), the noise marginal per
epoch, ablations, resume with the assignment, a 2-rank torchrun with identical tau, bad input."""

import math
import os
import sys

import pytest
import torch

import loom_cfm as L
from conftest import read_log, run_script

MASK = (1 << 64) - 1


def splitmix64_reference(x):
    """SplitMix64 in Python integers modulo 2^64 (the published constants)."""
    z = (x + 0x9E3779B97F4A7C15) & MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_splitmix64_wraps_like_the_unsigned_reference():
    values = [0, 1, 2, 12345, 2**31, 2**40 + 7, 2**62, 2**63 - 1, -1, -(2**63), -987654321]
    got = L.splitmix64(torch.tensor(values, dtype=torch.long)).tolist()
    assert [g & MASK for g in got] == [splitmix64_reference(v & MASK) for v in values]


def test_noise_of_an_id_is_standard_normal_and_depends_only_on_seed_and_id():
    from scipy import stats

    shape = (3, 8, 8)
    a = L.noise_for_ids(torch.tensor([5, 9, 2]), 7, shape)
    assert torch.equal(a, L.noise_for_ids(torch.tensor([5, 9, 2]), 7, shape))
    assert torch.equal(a[1], L.noise_for_ids(torch.tensor([9]), 7, shape)[0])  # independent of the batch
    assert torch.equal(a[[2, 0]], L.noise_for_ids(torch.tensor([2, 5]), 7, shape))
    assert not torch.allclose(a, L.noise_for_ids(torch.tensor([5, 9, 2]), 8, shape))
    z = L.noise_for_ids(torch.arange(2000), 0, shape)
    flat = z.flatten().double()
    assert abs(flat.mean().item()) < 0.01 and abs(flat.std().item() - 1) < 0.01
    assert stats.kstest(flat[::7].numpy(), "norm").pvalue > 1e-3
    pairs = z.flatten(1)
    assert abs(torch.corrcoef(torch.stack([pairs[:, 0], pairs[:, 1]]))[0, 1]) < 0.1  # neighbouring pixels
    assert abs(torch.corrcoef(torch.stack([pairs[:, 0], pairs[:, 96]]))[0, 1]) < 0.1  # the Box-Muller partner


def test_noise_is_identical_in_another_process_and_in_the_memory_bank(tmp_path):
    out = tmp_path / "z.pt"
    code = f"import torch, loom_cfm as L; torch.save(L.noise_for_ids(torch.tensor([0, 41, 77]), 3, (1, 4, 4)), {str(out)!r})"
    r = run_script([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    assert torch.equal(torch.load(out), L.noise_for_ids(torch.tensor([0, 41, 77]), 3, (1, 4, 4)))
    bank = L.NoiseBank("memory", 100, 3, (1, 4, 4), "cpu", chunk=16)
    assert torch.equal(bank(torch.tensor([0, 41, 77])), torch.load(out))


def run_loom(x, z, batch, steps, seed=0):
    """Alg. 1 on fixed data x [n, d] and noise z [n, d] with one cache: total costs after every step."""
    n = len(x)
    tau, costs, tried = torch.arange(n), [], []
    cost = lambda: L.path_cost(z[tau], x).sum().item()  # noqa: E731
    costs.append(cost())
    for step in range(steps):
        idx, slots = L.minibatch_slots(n, 1, batch, step, seed)
        L.loom_reassign(tau, slots, x[idx], z[tau[slots]])
        assert sorted(tau.tolist()) == list(range(n))  # a permutation at all times
        costs.append(cost())
        tried.append(idx)
    return tau, costs, tried


def test_theorem1_cost_never_increases_and_becomes_stationary_without_improving_swaps():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(32, 6, generator=g) * 2 + 1, torch.randn(32, 6, generator=g)
    tau, costs, tried = run_loom(x, z, 8, 1500)  # measured: the last change at step 474
    assert all(b <= a + 1e-9 for a, b in zip(costs, costs[1:], strict=False))
    assert costs[-1] < 0.8 * costs[0]
    assert costs[-500:] == [costs[-1]] * 500  # stationary
    for idx in tried[-60:]:  # no tried minibatch can still be improved
        perm = L.ot_permutation(z[tau[idx]], x[idx])
        assert L.path_cost(z[tau[idx]][perm], x[idx]).sum().item() == pytest.approx(
            L.path_cost(z[tau[idx]], x[idx]).sum().item(), rel=1e-12
        )


def test_larger_minibatches_end_at_lower_cost_and_never_below_the_global_optimum():
    final = {4: 0.0, 8: 0.0, 16: 0.0}
    for s in range(6):  # mean over six problems: one problem can go either way between close batch sizes
        g = torch.Generator().manual_seed(100 + s)
        x, z = torch.randn(32, 6, generator=g) * 2 + 1, torch.randn(32, 6, generator=g)
        optimum = L.path_cost(z[L.ot_permutation(z, x)], x).sum().item()  # exact OT over all 32
        for batch, steps in ((4, 2000), (8, 800), (16, 400)):
            cost = run_loom(x, z, batch, steps)[1][-1]
            assert cost >= optimum - 1e-9
            final[batch] += cost / 6
    assert final[16] < final[8] < final[4]  # measured 596.0 < 598.0 < 601.1 (optimum 595.3)


def test_each_epoch_uses_every_noise_once_with_one_cache_and_none_twice_with_three():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(24, 3, generator=g)
    for caches in (1, 3):
        tau = torch.arange(24 * caches)
        for epoch in range(3):
            used = []
            for step in range(epoch * 4, epoch * 4 + 4):  # 24 images, batch 6: 4 steps per epoch
                idx, slots = L.minibatch_slots(24, caches, 6, step, 0)
                ids = tau[slots].clone()
                perm = L.loom_reassign(tau, slots, x[idx], L.noise_for_ids(ids, 0, (3,)))
                used += ids[perm].tolist()
            assert len(set(used)) == 24
            if caches == 1:
                assert sorted(used) == list(range(24))
        assert sorted(tau.tolist()) == list(range(24 * caches))


def tiny(tmp_path, npz_data, *extra, steps=4, batch=8):
    out = str(tmp_path / "run")
    argv = [
        "--data",
        npz_data,
        "--outdir",
        out,
        "--batch",
        str(batch),
        "--duration",
        str(steps * batch / 1e6),
    ]
    return out, argv + [
        "--tiny",
        "--log-every",
        "1",
        "--grid",
        "4",
        "--grid-nfe",
        "1",
        "--warmup",
        "2",
        *extra,
    ]


def test_training_keeps_an_exact_running_global_cost_that_never_increases(tmp_path, npz_data, one_thread):
    out, argv = tiny(tmp_path, npz_data, "--caches", "2", "--cost-every", "1000", steps=8)
    L.main(argv)
    recs = read_log(out)
    costs = [r["global_cost"] for r in recs]
    assert all(b <= a + 1e-9 for a, b in zip(costs, costs[1:], strict=False)) and costs[-1] < costs[0]
    assert all(r["cost_after"] <= r["cost_before"] for r in recs)
    ckpt = torch.load(os.path.join(out, "latest.pt"), weights_only=True)
    tau = ckpt["state"]["tau"]
    assert sorted(tau.tolist()) == list(range(64))
    images, _ = L.load_images(npz_data)
    bank = L.NoiseBank("regenerate", 64, 0, (3, 16, 16), "cpu")
    exact = L.assignment_cost(tau, images, 32, bank, "l2", "cpu")  # the default cost
    assert costs[-1] == pytest.approx(exact, rel=1e-9)  # the running value is the exact one


@pytest.mark.parametrize(
    "flag", ["--no-reassign", "--fresh-noise", "--train-after-convergence", "--noise-store"]
)
def test_ablations_train(tmp_path, npz_data, flag, one_thread):
    extra = {"--train-after-convergence": [flag, "1"], "--noise-store": [flag, "memory"]}.get(flag, [flag])
    out, argv = tiny(tmp_path, npz_data, *extra)
    L.main(argv)
    recs = read_log(out)
    assert all(math.isfinite(r.get("loss", 0.0)) for r in recs)
    ckpt = torch.load(os.path.join(out, "latest.pt"), weights_only=True)
    if flag == "--no-reassign":
        assert all(r["swaps"] == 0 for r in recs) and torch.equal(ckpt["state"]["tau"], torch.arange(128))
    if flag == "--fresh-noise":
        assert all("global_cost" not in r for r in recs) and torch.equal(
            ckpt["state"]["tau"], torch.arange(128)
        )
    if flag == "--train-after-convergence":  # one epoch (4 steps of 8 of 32 images) without training first
        assert [("loss" in r) for r in recs] == [False] * 4 + [True] * 4 and ckpt["kimg"] == 0.032


def test_resume_equals_uninterrupted_assignment_and_weights(tmp_path, npz_data, one_thread):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    out_a, argv = tiny(a, npz_data, "--dropout", "0.1", steps=6)
    L.main(argv)
    out_b, argv = tiny(b, npz_data, "--dropout", "0.1", steps=3)
    L.main(argv)
    _, argv = tiny(b, npz_data, "--dropout", "0.1", steps=6)
    L.main(argv + ["--resume", out_b])
    ca = torch.load(os.path.join(out_a, "latest.pt"), weights_only=True)
    cb = torch.load(os.path.join(out_b, "latest.pt"), weights_only=True)
    assert torch.equal(ca["state"]["tau"], cb["state"]["tau"]) and not torch.equal(
        ca["state"]["tau"], torch.arange(128)
    )
    for key in ("net", "ema"):
        for k in ca[key]:
            assert torch.equal(ca[key][k], cb[key][k]), (key, k)
    ra, rb = read_log(out_a)[3:], read_log(out_b)[3:]
    assert [(r["loss"], r["global_cost"]) for r in ra] == [(r["loss"], r["global_cost"]) for r in rb]


def test_torchrun_two_ranks_hold_the_same_assignment_as_one_process(tmp_path, npz_data):
    common = ["--dropout", "0", "--caches", "2"]
    one, argv = tiny(tmp_path / "one", npz_data, *common, steps=3)
    r = run_script([sys.executable, "loom_cfm.py", *argv])
    assert r.returncode == 0, r.stderr[-2000:]
    two, argv = tiny(tmp_path / "two", npz_data, *common, steps=3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = run_script([*cmd, "loom_cfm.py", *argv, "--batch-gpu", "2"])
    assert r.returncode == 0, r.stderr[-2000:]  # the every-step digest check passed on both ranks
    c1 = torch.load(os.path.join(one, "latest.pt"), weights_only=True)
    c2 = torch.load(os.path.join(two, "latest.pt"), weights_only=True)
    assert torch.equal(c1["state"]["tau"], c2["state"]["tau"])
    assert max((c1["net"][k] - c2["net"][k]).abs().max().item() for k in c1["net"]) < 1e-4
    for r1, r2 in zip(read_log(one), read_log(two), strict=True):
        assert r1["global_cost"] == pytest.approx(r2["global_cost"], rel=1e-12)


def test_bad_input_gives_one_line_errors(tmp_path, npz_data, one_thread):
    out, argv = tiny(tmp_path, npz_data, "--batch", "64")
    with pytest.raises(SystemExit, match="exceeds the 32 training images"):
        L.main(argv)
    out, argv = tiny(tmp_path, npz_data, steps=1)
    L.main(argv)
    _, argv = tiny(tmp_path, npz_data, "--xflip", steps=2)
    with pytest.raises(SystemExit, match="assignment of 32 images x 4 caches, but this run has 64 x 4"):
        L.main(argv + ["--resume", out])
    with pytest.raises(SystemExit):
        L.parse_args(["--data", npz_data, "--caches", "0"])
    with pytest.raises(SystemExit):
        L.parse_args(["--data", npz_data, "--no-reassign", "--fresh-noise"])


def test_a_loom_checkpoint_samples_through_evaluate(tmp_path, npz_data, one_thread):
    import evaluate

    out, argv = tiny(tmp_path, npz_data, steps=1)
    L.main(argv)
    module, net, _ = evaluate.load_model(out, None, "cpu")
    noise, labels, gens = evaluate.inputs_for_seeds(range(2), (3, 16, 16), 0)
    x, used, calls = evaluate.run_sampler(
        module, evaluate.CountingNet(net), noise, 4, None, gens, {"solver": "midpoint"}
    )
    assert used == calls == 4 and x.shape == (2, 3, 16, 16)
    assert torch.allclose(L.ode_velocity(net, noise, 0.3), net(noise, 0.3))


def test_defaults_are_the_official_cifar10_settings():
    args = L.parse_args(["--data", "cifar10", "--xflip"])
    assert (args.cost, args.caches, args.time_scale, args.xflip, args.cond) == ("l2", 4, 1.0, "random", False)
    assert (args.batch, args.lr, args.warmup, args.sigma_min, args.ema) == (128, 2e-4, 5000, 1e-7, 0.9999)
    assert (args.atol, args.rtol) == (1e-5, 1e-5)


def test_random_flips_visit_every_image_once_per_epoch_each_mirror_with_its_own_slots():
    n, batch, caches = 24, 6, 2
    seen_flipped = 0
    for epoch in range(3):
        originals = []
        for step in range(epoch * 4, epoch * 4 + 4):  # 24 images, batch 6: 4 steps per epoch
            idx, slots = L.minibatch_slots(2 * n, caches, batch, step, 0, random_flip=True)
            assert ((idx >= 0) & (idx < 2 * n)).all() and torch.equal(slots % (2 * n), idx)
            originals += (idx % n).tolist()
            seen_flipped += int((idx >= n).sum())
        assert sorted(originals) == list(range(n))  # each image once per epoch, mirrored or not
    assert 18 < seen_flipped < 54  # of 72 visits, about half mirrored
    a = L.minibatch_slots(2 * n, caches, batch, 5, 0, random_flip=True)
    assert all(
        torch.equal(u, v) for u, v in zip(a, L.minibatch_slots(2 * n, caches, batch, 5, 0, True), strict=True)
    )


def test_unconditional_by_default_and_cond_reassigns_only_within_a_class(tmp_path, npz_data, one_thread):
    out, argv = tiny(tmp_path / "u", npz_data, steps=1)
    L.main(argv)
    assert torch.load(os.path.join(out, "latest.pt"), weights_only=True)["net_kwargs"]["label_dim"] == 0
    out, argv = tiny(tmp_path / "c", npz_data, "--cond", "--caches", "1", steps=8)
    L.main(argv)
    ckpt = torch.load(os.path.join(out, "latest.pt"), weights_only=True)
    tau, labels = ckpt["state"]["tau"], torch.arange(32) % 3  # npz_data: image i has class i % 3
    assert ckpt["net_kwargs"]["label_dim"] == 3 and not torch.equal(tau, torch.arange(32))
    assert torch.equal(labels[tau], labels)  # noise id j started at image j: it never left its class
    assert sum(r["swaps"] for r in read_log(out)) > 0

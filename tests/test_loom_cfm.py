"""loom_cfm.py: the counter-based noise against a Python reference and N(0, 1), Theorem 1 (non-increasing
cost, stationarity, no improving swap in a tried minibatch, larger minibatch no worse), the noise marginal per
epoch, random flips, the paper's defaults, resume with the assignment (also after SIGTERM), a 2-rank torchrun
with the same tau, generation, bad input; issue 35: another run's folder, non-finite numbers, weights and
samples, existing and locked outputs, corrupt / foreign / misshapen checkpoints, OS errors, Ctrl-C."""

import inspect
import math
import os
import signal
import subprocess
import sys

import numpy as np
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


def test_noise_is_identical_in_another_process(tmp_path):
    out = tmp_path / "z.pt"
    code = f"import torch, loom_cfm as L; torch.save(L.noise_for_ids(torch.tensor([0, 41, 77]), 3, (1, 4, 4)), {str(out)!r})"
    r = run_script([sys.executable, "-c", code])
    assert r.returncode == 0, r.stderr
    assert torch.equal(torch.load(out), L.noise_for_ids(torch.tensor([0, 41, 77]), 3, (1, 4, 4)))


def test_the_functions_default_to_the_cost_of_the_command_line():
    cli = L.parse_args(["--data", "x.npz"]).cost
    for f in (L.pair_cost, L.path_cost, L.ot_permutation, L.loom_reassign):
        assert inspect.signature(f).parameters["cost"].default == cli == "l2", f.__name__
    g = torch.Generator().manual_seed(3)
    x0, x1 = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    assert torch.allclose(L.pair_cost(x0, x1), torch.cdist(x1.double(), x0.double()))
    assert torch.allclose(L.pair_cost(x0, x1, "sqeuclidean"), torch.cdist(x1.double(), x0.double()) ** 2)
    assert torch.allclose(L.path_cost(x0, x1), L.pair_cost(x0, x1).diagonal())


def run_loom(x, z, batch, steps, seed=0, cost="l2"):
    """Alg. 1 on fixed data x [n, d] and noise z [n, d] with one cache: total costs after every step."""
    n = len(x)
    tau, costs, tried = torch.arange(n), [], []
    total = lambda: L.path_cost(z[tau], x, cost).sum().item()  # noqa: E731
    costs.append(total())
    for step in range(steps):
        idx, slots = L.minibatch_slots(n, 1, batch, step, seed)
        L.loom_reassign(tau, slots, x[idx], z[tau[slots]], cost)
        assert sorted(tau.tolist()) == list(range(n))  # a permutation at all times
        costs.append(total())
        tried.append(idx)
    return tau, costs, tried


@pytest.mark.parametrize("cost", ["l2", "sqeuclidean"])
def test_theorem1_cost_never_increases_and_becomes_stationary_without_improving_swaps(cost):
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(32, 6, generator=g) * 2 + 1, torch.randn(32, 6, generator=g)
    tau, costs, tried = run_loom(x, z, 8, 1500, cost=cost)
    assert all(b <= a + 1e-9 for a, b in zip(costs, costs[1:], strict=False))
    assert costs[-1] < 0.9 * costs[0]
    assert costs[-500:] == [costs[-1]] * 500  # stationary
    for idx in tried[-60:]:  # no tried minibatch can still be improved
        perm = L.ot_permutation(z[tau[idx]], x[idx], cost)
        assert L.path_cost(z[tau[idx]][perm], x[idx], cost).sum().item() == pytest.approx(
            L.path_cost(z[tau[idx]], x[idx], cost).sum().item(), rel=1e-12
        )


def test_larger_minibatches_end_at_lower_cost_and_never_below_the_global_optimum():
    final = {4: 0.0, 8: 0.0, 16: 0.0}
    for s in range(6):  # mean over six problems: one problem can go either way between close batch sizes
        g = torch.Generator().manual_seed(100 + s)
        x, z = torch.randn(32, 6, generator=g) * 2 + 1, torch.randn(32, 6, generator=g)
        optimum = L.path_cost(z[L.ot_permutation(z, x, "sqeuclidean")], x, "sqeuclidean").sum().item()
        for batch, steps in ((4, 2000), (8, 800), (16, 400)):
            cost = run_loom(x, z, batch, steps, cost="sqeuclidean")[1][-1]
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
    return out, argv + ["--tiny", "--log-every", "1", "--lr-rampup", str(2 * batch / 1e6), *extra]


def test_training_swaps_to_cheaper_pairs_and_keeps_tau_a_permutation(tmp_path, npz_data, one_thread):
    out, argv = tiny(tmp_path, npz_data, "--caches", "2", steps=8)
    L.main(argv)
    recs = read_log(out)
    assert all(r["cost_after"] <= r["cost_before"] for r in recs) and sum(r["swaps"] for r in recs) > 0
    assert [r["lr"] for r in recs[:3]] == pytest.approx([0.0, 1e-4, 2e-4])  # Table 4's ramp from 0
    ckpt = torch.load(os.path.join(out, "latest.pt"), weights_only=True)
    tau = ckpt["state"]["tau"]
    assert sorted(tau.tolist()) == list(range(64)) and not torch.equal(tau, torch.arange(64))
    assert ckpt["net_kwargs"]["label_dim"] == 0  # unconditional, as the paper
    out, argv = tiny(tmp_path / "fixed", npz_data, "--no-reassign")  # App. D's fixed source
    L.main(argv)
    assert all(r["swaps"] == 0 for r in read_log(out))
    assert torch.equal(
        torch.load(os.path.join(out, "latest.pt"), weights_only=True)["state"]["tau"], torch.arange(128)
    )


def test_resume_equals_uninterrupted_assignment_and_weights(tmp_path, npz_data, one_thread):
    a, b = tmp_path / "a", tmp_path / "b"
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
    keys = ("loss", "cost_before", "cost_after", "swaps")
    assert [[r[k] for k in keys] for r in read_log(out_a)] == [[r[k] for k in keys] for r in read_log(out_b)]


def test_sigterm_saves_a_checkpoint_that_resumes_bit_exactly(tmp_path, npz_data, one_thread):
    out, argv = tiny(tmp_path, npz_data, "--snap-every", "100000", steps=400)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "loom_cfm.py", *argv], cwd=os.path.dirname(L.__file__), env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    for line in proc.stdout:  # wait until training is under way
        if line.startswith("step=3/"):
            proc.send_signal(signal.SIGTERM)
            break
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143 and "stopped at step" in rest, rest  # 128 + SIGTERM: requeue me
    stopped = torch.load(os.path.join(out, "latest.pt"), weights_only=True)["step"]
    _, argv = tiny(tmp_path, npz_data, steps=stopped + 2)
    L.main(argv + ["--resume", out])
    assert [r["step"] for r in read_log(out)] == list(range(1, stopped + 3))  # each step once
    ref, argv = tiny(tmp_path / "ref", npz_data, steps=stopped + 2)
    L.main(argv)
    c, r = (torch.load(os.path.join(d, "latest.pt"), weights_only=True) for d in (out, ref))
    assert torch.equal(c["state"]["tau"], r["state"]["tau"])
    assert all(torch.equal(c[p][k], r[p][k]) for p in ("net", "ema") for k in c[p])


def test_torchrun_two_ranks_hold_the_same_assignment_as_one_process(tmp_path, npz_data):
    common = ["--dropout", "0", "--caches", "2"]
    one, argv = tiny(tmp_path / "one", npz_data, *common, steps=3)
    r = run_script([sys.executable, "loom_cfm.py", *argv])
    assert r.returncode == 0, r.stderr[-2000:]
    two, argv = tiny(tmp_path / "two", npz_data, *common, steps=3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = run_script([*cmd, "loom_cfm.py", *argv, "--batch-gpu", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    c1 = torch.load(os.path.join(one, "latest.pt"), weights_only=True)
    c2 = torch.load(os.path.join(two, "latest.pt"), weights_only=True)
    assert torch.equal(c1["state"]["tau"], c2["state"]["tau"])
    assert max((c1["net"][k] - c2["net"][k]).abs().max().item() for k in c1["net"]) < 1e-4
    for r1, r2 in zip(read_log(one), read_log(two), strict=True):
        assert (r1["swaps"], r1["cost_after"]) == (r2["swaps"], pytest.approx(r2["cost_after"], rel=1e-12))


def test_bad_input_gives_one_line_errors(tmp_path, npz_data, one_thread):
    out, argv = tiny(tmp_path, npz_data, "--batch", "64")
    with pytest.raises(SystemExit, match="exceeds the 32 training images"):
        L.main(argv)
    out, argv = tiny(tmp_path, npz_data, steps=1)
    L.main(argv)
    _, argv = tiny(tmp_path, npz_data, "--xflip", "random", steps=2)
    with pytest.raises(SystemExit, match="assignment of 32 images x 4 caches, but this run has 64 x 4"):
        L.main(argv + ["--resume", out])
    with pytest.raises(SystemExit, match="holds a run at step 1"):
        L.main(argv)
    with open(os.path.join(out, "ckpt-0000001.pt"), "r+b") as f:  # flipped bytes inside the tensor data
        f.seek(os.path.getsize(f.name) // 2), f.write(b"\xff" * 64)
    with pytest.raises(SystemExit, match=r"latest.pt is corrupt: its member .* is damaged") as e:
        L.main(argv + ["--resume", out])
    assert "\n" not in str(e.value)
    for bad in (["--caches", "0"], ["--solver", "midpoint", "--nfe", "3"], ["--ema-decay", "2"], ["--xflip"]):
        with pytest.raises(SystemExit):
            L.parse_args(["--data", npz_data, *bad])


def test_a_loom_checkpoint_generates_and_samples_through_evaluate(tmp_path, npz_data, one_thread):
    import evaluate

    out, argv = tiny(tmp_path, npz_data, steps=1)
    L.main(argv)
    module, ckpt = evaluate.load_checkpoint(out)
    net = module.build_net(ckpt["net_kwargs"]).eval()
    net.load_state_dict(ckpt["ema"])
    noise, _, gens = evaluate.inputs_for_seeds(range(2), (3, 16, 16), 0)
    x, used, calls = evaluate.run_sampler(module, net, noise, 4, None, gens, {"solver": "midpoint"})
    assert used == calls == 4 and x.shape == (2, 3, 16, 16)
    assert torch.allclose(L.ode_velocity(net, noise, 0.3), net(noise, 0.3))
    assert torch.equal(L.ode_start(net, noise), noise)
    samples = str(tmp_path / "s.npz")
    L.main(
        ["--generate", "5", "--ckpt", out, "--out", samples, "--nfe", "4", "--gen-batch", "2", "--seed", "7"]
    )
    with np.load(samples) as f:
        images, seeds = f["images"], f["seeds"]
    assert (
        images.shape == (5, 16, 16, 3) and images.dtype == np.uint8 and seeds.tolist() == list(range(7, 12))
    )
    z = torch.stack([torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(s)) for s in (7, 8)])
    x, nfe = L.sample(net, z, 4, solver="midpoint")  # image i: the noise of seed i, the EMA net
    assert nfe == 4 and np.array_equal(
        images[:2], (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    )
    with pytest.raises(SystemExit, match="exists; pass --overwrite"):
        L.main(["--generate", "5", "--ckpt", out, "--out", samples])


def test_defaults_are_the_papers_cifar10_settings_with_its_network():
    args = L.parse_args(["--data", "cifar10", "--xflip", "random"])
    assert (args.cost, args.caches, args.xflip, args.arch) == ("l2", 4, "random", "adm-cfm")
    assert (args.batch, args.lr, args.sigma_min, args.ema_decay, args.grad_clip) == (
        128,
        2e-4,
        1e-7,
        0.9999,
        1.0,
    )
    assert args.lr_rampup * 1e6 / args.batch == 5000  # Table 4: 5k warm-up steps
    assert (args.model_channels, args.channel_mult, args.num_blocks, args.attn_res, args.dropout) == (
        128, [1, 2, 2, 2], 2, [16], 0.1)  # fmt: skip
    assert L.parse_args(["--data", "cifar10"]).arch == "adm-cfm"
    assert L.parse_args(["--data", "shapes"]).arch == "ddpmpp"
    assert L.parse_args(["--data", "cifar10", "--arch", "ddpmpp"]).arch == "ddpmpp"
    kw = dict(img_resolution=32, img_channels=3, time_scale=1.0, arch=args.arch, dropout=args.dropout,
              model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=2, attn_resolutions=[16])  # fmt: skip
    assert sum(p.numel() for p in L.build_net(kw).parameters()) == 35_746_307  # torchcfm's and LOOM's net


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


def test_get_batch_mirrors_indices_past_the_images():
    images = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    x = L.get_batch(images, torch.tensor([1, 4]), "cpu")
    assert torch.equal(x[0], torch.from_numpy(images[1]).permute(2, 0, 1).float() / 127.5 - 1)
    assert torch.equal(x[1], x[0].flip(2)) and math.isclose(x.abs().max().item(), 1.0, abs_tol=0.01)


class Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_pickle_never_runs_and_a_non_finite_loss_stops_before_a_checkpoint(tmp_path, npz_data, monkeypatch):
    torch.save({"net": Evil(str(tmp_path / "pwned"))}, tmp_path / "evil.pt")
    with pytest.raises(SystemExit, match="cannot load .*evil.pt") as e:
        L.load_checkpoint(str(tmp_path / "evil.pt"))
    assert "\n" not in str(e.value) and not os.path.exists(tmp_path / "pwned")
    out, argv = tiny(tmp_path, npz_data, steps=2)
    monkeypatch.setattr(L, "cfm_loss", lambda net, x0, *a: net(x0, 0.5).flatten(1).mean(1) * float("nan"))
    with pytest.raises(SystemExit, match="non-finite loss at step 1"):
        L.main(argv)
    assert not [n for n in os.listdir(out) if n.endswith(".pt")]


def test_a_run_is_resumed_only_into_its_own_folder_unless_overwritten(tmp_path, npz_data, one_thread):
    a, argv_a = tiny(tmp_path / "a", npz_data, steps=1)
    b, argv_b = tiny(tmp_path / "b", npz_data, steps=1)
    L.main(argv_a), L.main(argv_b)
    _, argv = tiny(tmp_path / "b", npz_data, steps=2)
    with pytest.raises(SystemExit, match="holds a run at step 1") as e:
        L.main(argv + ["--resume", a])  # b's checkpoints and log are not mixed with a's run
    assert "\n" not in str(e.value) and [r["step"] for r in read_log(b)] == [1]
    L.main(argv + ["--resume", os.path.join(a, "latest.pt"), "--overwrite"])  # replaces b's run
    assert sorted(n for n in os.listdir(b) if n.startswith("ckpt")) == ["ckpt-0000002.pt"]
    assert [r["step"] for r in read_log(b)] == [2]
    _, argv = tiny(tmp_path / "c", npz_data, steps=2)
    L.main(argv + ["--resume", a])  # into a new folder: fine
    c, b2 = (torch.load(os.path.join(d, "latest.pt"), weights_only=True) for d in (tmp_path / "c" / "run", b))
    assert c["step"] == b2["step"] == 2 and all(torch.equal(c["net"][k], b2["net"][k]) for k in c["net"])
    open(os.path.join(a, "notes.tmp2024"), "w").close()  # a user's file, not a temporary of this file's
    open(os.path.join(a, "ckpt-0000002.pt.tmp"), "w").close()  # what a kill during a save leaves
    _, argv = tiny(tmp_path / "a", npz_data, steps=2)
    L.main(argv + ["--resume", a])
    assert os.path.exists(os.path.join(a, "notes.tmp2024")) and not os.path.exists(a + "/ckpt-0000002.pt.tmp")


def test_non_finite_numbers_weights_and_samples_stop_with_one_line(tmp_path, npz_data, one_thread):
    for bad in (["--lr", "nan"], ["--sigma-min", "inf"], ["--duration", "inf"], ["--grad-clip", "nan"],
                ["--seed", "-1"], ["--batch", "0"], ["--dropout", "1.5"], ["--channel-mult", ""]):  # fmt: skip
        with pytest.raises(SystemExit):
            L.parse_args(["--data", npz_data, *bad])
    out, argv = tiny(tmp_path, npz_data, steps=1)
    L.main(argv)
    ckpt = torch.load(os.path.join(out, "latest.pt"), weights_only=True)
    next(iter(ckpt["ema"].values())).view(-1)[0] = float("nan")  # one EMA weight
    torch.save(ckpt, os.path.join(out, "ckpt-0000001.pt"))
    _, argv = tiny(tmp_path, npz_data, steps=2)
    with pytest.raises(SystemExit, match="non-finite weights at step 2: not saved") as e:
        L.main(argv + ["--resume", out])
    assert "\n" not in str(e.value) and not os.path.exists(os.path.join(out, "ckpt-0000002.pt"))
    samples = str(tmp_path / "s.npz")
    with pytest.raises(SystemExit, match="non-finite samples"):
        L.main(["--generate", "2", "--ckpt", out, "--out", samples, "--nfe", "2"])
    assert not os.path.exists(samples) and not os.path.exists(tmp_path / "s.png")


def test_generate_refuses_its_existing_outputs_and_a_second_job_on_them(tmp_path, npz_data, one_thread):
    import fcntl

    out, argv = tiny(tmp_path, npz_data, steps=1)
    L.main(argv)
    samples, png = str(tmp_path / "s.npz"), str(tmp_path / "s.png")
    open(png, "w").close()
    with pytest.raises(SystemExit, match=f"{png} exists; pass --overwrite"):
        L.main(["--generate", "2", "--ckpt", out, "--out", samples, "--nfe", "2"])
    assert os.path.getsize(png) == 0 and not os.path.exists(samples)
    other = str(tmp_path / "t.npz")
    with open(other + ".lock", "a") as held:  # another job's lock on t.npz
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SystemExit, match="locked by a running job"):
            L.main(["--generate", "2", "--ckpt", out, "--out", other, "--nfe", "2"])
    assert not os.path.exists(other)


def test_corrupt_foreign_and_misshapen_checkpoints_are_one_line(tmp_path, npz_data, one_thread):
    out, argv = tiny(tmp_path, npz_data, steps=1)
    L.main(argv)
    path = os.path.join(out, "ckpt-0000001.pt")
    with open(path, "rb") as f:
        data = bytearray(f.read())
    at = data.index(b"PK\x01\x02") + 38  # the first member's external attributes in the central directory
    data[at] ^= 0x10  # bit 4: "a directory"; the CRC check does not cover it
    bad = str(tmp_path / "dir-bit.pt")
    with open(bad, "wb") as f:
        f.write(data)
    with pytest.raises(SystemExit, match=r"dir-bit.pt is corrupt: its member .* is damaged"):
        L.load_checkpoint(bad)
    ckpt = torch.load(path, weights_only=True)
    tiny_adm = {**ckpt["net_kwargs"], "arch": "adm"}
    for name, obj, msg in (("tensor", torch.zeros(3), "not a loom_cfm.py checkpoint"),
                           ("nokw", {k: v for k, v in ckpt.items() if k != "net_kwargs"}, "lacks net_kwargs"),
                           ("future", {**ckpt, "version": 2}, "of version 1"),
                           ("arch", {**ckpt, "net_kwargs": {**ckpt["net_kwargs"], "arch": "vit"}}, "cannot build"),
                           ("shape", {**ckpt, "net_kwargs": tiny_adm}, "cannot build")):  # fmt: skip
        torch.save(obj, tmp_path / f"{name}.pt")
        for cmd in (["--generate", "1", "--ckpt", str(tmp_path / f"{name}.pt"), "--out", str(tmp_path / "s.npz")],
                    [*argv, "--resume", str(tmp_path / f"{name}.pt"), "--outdir", str(tmp_path / name)]):  # fmt: skip
            with pytest.raises(SystemExit, match=msg) as e:
                L.main(cmd)
            assert "\n" not in str(e.value), name


def test_os_errors_ctrl_c_and_bad_tolerances_are_one_line(tmp_path, npz_data, monkeypatch, one_thread):
    out, argv = tiny(tmp_path, npz_data, steps=1)
    L.main(argv)
    open(tmp_path / "file", "w").close()
    with pytest.raises(SystemExit, match="file: ") as e:  # --outdir is a file
        L.main([*argv, "--outdir", str(tmp_path / "file"), "--overwrite"])
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="file/s.npz") as e:  # --out in a folder that is a file
        L.main(["--generate", "1", "--ckpt", out, "--out", str(tmp_path / "file" / "s.npz"), "--nfe", "2"])
    assert "\n" not in str(e.value)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(L, "sample", interrupted)
    with pytest.raises(SystemExit) as e:
        L.main(["--generate", "1", "--ckpt", out, "--out", str(tmp_path / "s.npz"), "--nfe", "2"])
    assert e.value.code == 130 and not os.path.exists(tmp_path / "s.npz")
    monkeypatch.undo()
    x = torch.randn(2, 3)
    for atol, rtol in ((0, 0), (1e-300, 1e-300), ("abc", 1e-5)):  # torchdiffeq: AssertionError, TypeError
        with pytest.raises(ValueError, match="dopri5 with atol="):
            L.sample(lambda x, t: x, x, 0, solver="dopri5", atol=atol, rtol=rtol)

"""dansm.py: the inter-path distance against dense minimisation, greedy matching against a brute-force
reference and Hungarian, the random path length formula and its decrease with match-size, the public code's
recipe (defaults, time grid, EMA warm-up), pools larger than the batch and than the data, resume, torchrun, the
report, bad input and bad files (one line), outputs never overwritten, non-finite weights never saved."""

import fcntl
import itertools
import math
import os
import sys

import numpy as np
import pytest
import torch
from scipy.stats import norm

import dansm as D
from conftest import TINY_NET, read_log, run_script


def inter_path_distance(x1, z1, x2, z2):
    """Eq. 3-5 for each pair of paths (x1_i -> z1_i, x2_i -> z2_i), as path_rows measures a set of two."""
    pairs = zip(x1, z1, x2, z2, strict=True)
    rows = [D.path_rows(torch.stack([a, b]), torch.stack([c, d]), torch.tensor([0])) for a, c, b, d in pairs]
    return torch.cat([r["d_avg"] for r in rows]), torch.cat([r["t_avg"] for r in rows])


def test_inter_path_distance_equals_dense_minimisation_including_clipped_ends():
    g = torch.Generator().manual_seed(0)
    x1, z1, x2, z2 = (torch.randn(300, 5, generator=g) for _ in range(4))
    x2[:100] = x1[:100] + 0.1 * torch.randn(100, 5, generator=g)  # close at t = 0: t* clipped to 0
    z2[100:200] = z1[100:200] + 0.1 * torch.randn(100, 5, generator=g)  # close at t = 1: clipped to 1
    dist, t_star = inter_path_distance(x1, z1, x2, z2)
    ts = torch.linspace(0, 1, 20001, dtype=torch.float64)
    v, u = (x2 - x1).double(), (z2 - z1).double()
    dense = ((1 - ts)[None, :, None] * v[:, None] + ts[None, :, None] * u[:, None]).norm(dim=2)
    assert torch.allclose(dist, dense.min(1).values, rtol=1e-6, atol=1e-9)
    assert torch.allclose(t_star, ts[dense.argmin(1)], atol=1e-3)
    assert (t_star == 0).sum() >= 30 and (t_star == 1).sum() >= 30  # measured 57 and 49
    # direct construction: r1(t) = (1-t) x1 + t z1 and r2 pass through the same point at t = 0.3
    x1, z1, x2 = (torch.tensor([v], dtype=torch.float64) for v in ([0.0, 0.0], [1.0, 0.0], [0.3, 1.0]))
    z2 = (torch.tensor([[0.3, 0.0]], dtype=torch.float64) - 0.7 * x2) / 0.3
    d, t = inter_path_distance(x1, z1, x2, z2)
    assert d.item() == pytest.approx(0.0, abs=1e-7) and t.item() == pytest.approx(
        0.3
    )  # sqrt of a Gram rounding


def greedy_reference(x, z):
    """Alg. 1 written as the paper states it: for each sample in order, the nearest noise left."""
    left, perm = list(range(len(z))), []
    for i in range(len(x)):
        d = [((x[i] - z[j]) ** 2).sum().item() for j in left]
        perm.append(left.pop(min(range(len(left)), key=d.__getitem__)))
    return torch.tensor(perm)


@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_greedy_matches_the_brute_force_reference_and_uses_every_noise_once(chunk):
    g = torch.Generator().manual_seed(chunk)
    for n in (5, 17, 40):
        x, z = (
            torch.randn(n, 6, generator=g, dtype=torch.float64),
            torch.randn(n, 6, generator=g, dtype=torch.float64),
        )
        perm = D.greedy_match(x, z, chunk)
        assert torch.equal(perm, greedy_reference(x, z))
        assert sorted(perm.tolist()) == list(range(n))


def test_greedy_never_lengthens_random_pairs_and_hungarian_is_shorter_still():
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        x, z = torch.rand(64, 3, 4, 4, generator=g) * 2 - 1, torch.randn(64, 3, 4, 4, generator=g)
        random = D.path_length(x, z).sum()
        greedy = D.path_length(x, z[D.greedy_match(x, z)]).sum()
        hungarian = D.path_length(x, z[D.hungarian_match(x, z)]).sum()
        assert hungarian <= greedy + 1e-9 and greedy < random


def test_random_path_length_matches_the_formula_and_shrinks_with_match_size():
    d, mean, var = 3072, -0.053, 0.253  # CIFAR-10's pixel statistics in [-1, 1] (the paper's Sec. 5.7)
    g = torch.Generator().manual_seed(0)
    x = mean + var**0.5 * torch.randn(4000, d, generator=g)  # isotropic data with those statistics
    z = torch.randn(4000, d, generator=g)
    expected = math.sqrt(d * (1 + var + mean**2))  # E||z - x|| ~ sqrt(E||z - x||^2) in high dimension
    assert D.path_length(x[:1000], z[:1000]).mean().item() == pytest.approx(expected, rel=0.01)
    assert expected == pytest.approx(62.04, abs=0.2)  # Table 2's random-path length for CIFAR-10
    lengths = []
    for ms in (1, 10, 100, 1000):
        total = 0.0
        for p in range(0, 1000, ms):
            xs, zs = x[p : p + ms], z[p : p + ms]
            total += D.path_length(xs, zs[D.greedy_match(xs, zs)]).sum().item()
        lengths.append(total / 1000)
    assert lengths == sorted(lengths, reverse=True) and lengths[-1] < lengths[0]


def test_path_stats_agree_with_the_pairwise_definition():
    g = torch.Generator().manual_seed(3)
    x, z = (torch.randn(12, 2, 3, generator=g, dtype=torch.float64) for _ in range(2))
    stats = {k: v.mean().item() for k, v in D.path_rows(x, z, torch.arange(12), chunk=5).items()}
    i, j = torch.meshgrid(torch.arange(12), torch.arange(12), indexing="ij")
    off = i != j
    d, t = inter_path_distance(x[i[off]], z[i[off]], x[j[off]], z[j[off]])
    assert stats["d_avg"] == pytest.approx(d.mean().item(), rel=1e-9)
    assert stats["t_avg"] == pytest.approx(t.mean().item(), rel=1e-9)
    dm = torch.full((12, 12), math.inf, dtype=torch.float64)
    dm[off] = d
    assert stats["d_min"] == pytest.approx(dm.min(1).values.mean().item(), rel=1e-9)
    assert stats["length"] == pytest.approx((z - x).flatten(1).norm(dim=1).mean().item(), rel=1e-6)


def tiny(out, data, *extra, steps=4, batch=8):
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
    return argv + ["--tiny", "--log-every", "1", "--grid", "4", "--nfe", "2", "--lr-rampup", "1.6e-5", *extra]


def test_ddim_timesteps_are_the_public_codes():
    # framework_ddim/diffusion_sampling.py: skip = 1000 // steps; reversed(range(0, 1000, skip))
    assert D.ddim_timesteps(3) == [999, 666, 333, 0]
    assert D.ddim_timesteps(7) == [994, 852, 710, 568, 426, 284, 142, 0]
    assert D.ddim_timesteps(10) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]

    class Eps(torch.nn.Module):  # records the timesteps it is called at
        objective, seen = "dm", []

        def forward(self, x, t, labels=None):
            self.seen.append(int(t))
            return torch.zeros_like(x)

    net = Eps()
    _, nfe = D.sample(net, torch.randn(2, 1, 2, 2), 3)
    assert net.seen == [999, 666, 333, 0] and nfe == 4  # the true count of evaluations


def test_training_recipe_defaults_are_the_public_codes():
    a = D.parse_args(["--data", "cifar10"])
    assert (a.lr, a.lr_rampup, a.dropout, a.xflip, a.ema_warmup, a.grad_clip) == (
        1e-4,
        0,
        0.15,
        "copies",
        True,
        1,
    )
    assert (a.t_min, a.time_scale, a.duration, a.batch, a.match_size) == (1e-3, 999, 25, 250, 10000)
    assert (a.ema_decay, a.nfe) == (0.9999, 10)
    b = D.parse_args(["--data", "cifar10", "--no-ema-warmup", "--xflip", "off"])
    assert not b.ema_warmup and b.xflip == "off"


def test_the_default_net_is_score_sdes_ddpmpp_of_the_public_code():
    """cifar10_rf_gaussian_ddpmpp.py: score-sde's NCSNpp class with positional embedding, no FIR, no progressive
    input (its DDPM++), nf 128, ch_mult 1,2,2,2, 4 blocks, attention at 16: 61,804,419 parameters."""
    a = D.parse_args(["--data", "cifar10"])
    kw = dict(img_resolution=32, img_channels=3, arch=a.arch, model_channels=a.model_channels,
              channel_mult=a.channel_mult, num_blocks=a.num_blocks, attn_resolutions=a.attn_res, dropout=a.dropout)  # fmt: skip
    assert sum(p.numel() for p in D.build_net(kw).parameters()) == 61_804_419


def test_euler_uses_the_public_codes_time_grid_and_network_input():
    class Vel(torch.nn.Module):  # records the times it is called at
        objective, t_min, seen = "rfm", 1e-3, []

        def forward(self, x, t, labels=None):
            self.seen.append(float(t))
            return torch.zeros_like(x)

    net = Vel()
    _, nfe = D.sample(net, torch.randn(2, 1, 2, 2), 4)
    # rectified_flow_sampling.py: num_t = i / steps * (1 - eps) + eps on its clock s = 1 - t, step 1 / steps
    assert nfe == 4 and net.seen == pytest.approx(
        [1 - (i / 4 * (1 - 1e-3) + 1e-3) for i in range(4)], abs=1e-15
    )
    flow = D.build_net(dict(img_resolution=8, img_channels=3, time_scale=999.0, t_min=1e-3, **TINY_NET))
    seen = []
    flow.model.forward = lambda x, noise_labels, *a: seen.append(noise_labels) or x
    flow(torch.randn(2, 3, 8, 8), torch.tensor([0.5, 0.25]))
    assert torch.equal(
        seen[0], torch.tensor([499.5, 249.75])
    )  # 999 t, as the public code's model(x, t * 999)


def test_ema_has_score_sdes_warm_up(tmp_path, npz_data, one_thread):
    """After one step the EMA is min(mu, (1 + n) / (10 + n)) = 2/11 of the initial weights (n = 1)."""
    D.main(tiny(tmp_path / "run", npz_data, "--match-size", "8", "--dropout", "0", steps=1))
    ckpt = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)
    torch.manual_seed(0)
    init = D.build_net(ckpt["net_kwargs"]).state_dict()
    for k, w in ckpt["ema"].items():
        if w.is_floating_point():
            torch.testing.assert_close(w, ckpt["net"][k].lerp(init[k], 2 / 11), rtol=1e-5, atol=1e-7)
    assert any(not torch.equal(ckpt["net"][k], init[k]) for k in init)


def test_hungarian_minimises_the_public_mse_cost_not_the_lengths():
    g = torch.Generator().manual_seed(5)
    for _ in range(10):
        x, z = torch.randn(6, 2, generator=g) * torch.tensor([3.0, 0.1]), torch.randn(6, 2, generator=g)
        best = min((x - z[list(q)]).square().mean().item() for q in itertools.permutations(range(6)))
        assert (x - z[D.hungarian_match(x, z)]).square().mean().item() == pytest.approx(best, rel=1e-9)
    x, z = torch.tensor([[-2.0, 1.0], [-1.0, -1.0]]), torch.tensor([[0.0, -1.0], [3.0, -1.0]])
    assert D.hungarian_match(x, z).tolist() == [0, 1]  # the sum of lengths would pick [1, 0]


def test_dm_objective_and_hungarian_train(tmp_path, npz_data, one_thread):
    D.main(tiny(tmp_path / "dm", npz_data, "--objective", "dm", "--match-size", "16"))
    D.main(tiny(tmp_path / "hu", npz_data, "--matcher", "hungarian", "--match-size", "16"))
    D.main(tiny(tmp_path / "big", npz_data, "--match-size", "128"))  # 64 data indices: a pool of two epochs
    assert all(r["len_after"] < r["len_before"] for r in read_log(tmp_path / "big"))
    for d in ("dm", "hu", "big"):
        assert all(math.isfinite(r["loss"]) for r in read_log(tmp_path / d))


def test_resume_equals_uninterrupted(tmp_path, npz_data, one_thread):
    flags = ["--match-size", "24", "--dropout", "0.1"]  # pools span 3 steps: stop inside one
    D.main(tiny(tmp_path / "a", npz_data, *flags, steps=5))
    D.main(tiny(tmp_path / "b", npz_data, *flags, steps=2))
    D.main(tiny(tmp_path / "b", npz_data, *flags, steps=5) + ["--resume", str(tmp_path / "b")])
    a = torch.load(tmp_path / "a" / "latest.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "latest.pt", weights_only=True)
    for key in ("net", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)


def test_torchrun_two_ranks_match_like_one_process(tmp_path, npz_data):
    flags = ["--match-size", "16", "--dropout", "0"]
    r = run_script([sys.executable, "dansm.py", *tiny(tmp_path / "one", npz_data, *flags, steps=3)])
    assert r.returncode == 0, r.stderr[-2000:]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "dansm.py"]
    r = run_script([*cmd, *tiny(tmp_path / "two", npz_data, *flags, steps=3), "--batch-gpu", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    for r1, r2 in zip(read_log(tmp_path / "one"), read_log(tmp_path / "two"), strict=True):
        assert r1["len_after"] == pytest.approx(r2["len_after"], rel=1e-12)
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-4)


def test_report_prints_table2_and_preferable_paths(tmp_path, npz_data, capsys, one_thread):
    D.main(tiny(tmp_path / "run", npz_data, "--match-size", "8", steps=1))
    rows = D.main(["--report", "--data", npz_data, "--match-sizes", "4,128", "--paths", "16",
                   "--ckpt", str(tmp_path / "run"), "--invert-steps", "4"])  # fmt: skip
    assert [r["paths"] for r in rows] == ["random", "ms 4", "ms 128", "preferable"]
    assert [(r["pools"], r["pool_size"]) for r in rows[:3]] == [(1, 64), (16, 4), (1, 128)]  # x-flips: 64
    assert rows[2]["length"] < rows[0]["length"]
    assert all(r["d_min"] > 0 for r in rows)  # a pool of twice the data still gives each image one path
    printed = capsys.readouterr().out
    assert "preferable" in printed and "set of 64 paths" in printed and "over 16 of them" in printed


def test_report_agrees_with_closed_form_and_brute_force_pools_in_1d(tmp_path, capsys):
    """1-D data (1x1x1 images): a path pair crosses (distance 0) when V = x2 - x1 and U = z2 - z1 differ in
    sign, else its distance is min(|V|, |U|). Random pairs: closed forms; greedy pools of 2 and a pool of
    twice the data (two epochs in one pool): brute force over independently simulated pools."""
    n, rng = 200, np.random.default_rng(0)
    vals = rng.integers(0, 256, n).astype(np.uint8)
    np.savez(tmp_path / "d.npz", images=vals.reshape(n, 1, 1, 1))
    a = vals.astype(np.float64) / 127.5 - 1
    rows = D.main(["--report", "--data", str(tmp_path / "d.npz"), "--xflip", "off", "--match-sizes", f"2,{2 * n}",
                   "--paths", str(n), "--seed", "1"])  # fmt: skip
    assert "set of 200 paths" in capsys.readouterr().out

    def metrics(x, z):  # one set of paths, brute force over all pairs (d_min is 0 in 1-D: crossings)
        v, u = x[None] - x[:, None], z[None] - z[:, None]
        d = np.where(v * u > 0, np.minimum(abs(v), abs(u)), 0.0)
        np.fill_diagonal(d, np.nan)
        dm = d.copy()
        np.fill_diagonal(dm, np.inf)
        return np.array([abs(z - x).mean(), np.nanmean(d), dm.min(1).mean()])

    def greedy(x, z):  # Alg. 1 literally: each image in order takes the nearest noise left
        left, out = z.copy(), np.empty(len(x))
        for i in range(len(x)):
            j = np.argmin(abs(x[i] - left))
            out[i], left[j] = left[j], np.inf
        return out

    sim = np.random.default_rng(1)
    truth = {}
    for ms in (2, 2 * n):
        runs = []
        for _ in range(8):
            if ms == 2:
                order = sim.permutation(n)
                xs, zs = a[order], sim.standard_normal(n)
                zs = np.concatenate([greedy(xs[i : i + 2], zs[i : i + 2]) for i in range(0, n, 2)])
                x, z = xs, zs
            else:  # two epochs in one pool; each image keeps one of its two paths, at random
                order = np.concatenate([sim.permutation(n), sim.permutation(n)])
                zs = greedy(a[order], sim.standard_normal(2 * n))
                pick = np.where(sim.random(n) < 0.5, 0, 1)
                pos = np.argsort(order, kind="stable").reshape(n, 2)[np.arange(n), pick]
                x, z = a[order[pos]], zs[pos]
            runs.append(metrics(x, z))
        runs = np.array(runs)
        truth[f"ms {ms}"] = (runs.mean(0), runs.std(0) / math.sqrt(len(runs)))
    # random pairs in closed form: E|z - a| and E min(|V|, U) 1{U > 0} with U ~ N(0, 2)
    s = math.sqrt(2)
    length = np.mean(2 * norm.pdf(a) + a * (2 * norm.cdf(a) - 1))
    v = abs(a[None] - a[:, None])[~np.eye(n, dtype=bool)]
    d_avg = np.mean(s / math.sqrt(2 * math.pi) * (1 - np.exp(-(v**2) / (2 * s * s))) + v * norm.sf(v / s))
    truth["random"] = (np.array([length, d_avg, np.nan]), np.zeros(3))
    for r in rows:
        for k, key in enumerate(("length", "d_avg", "d_min")):
            want, err = truth[r["paths"]][0][k], truth[r["paths"]][1][k]
            if np.isnan(want):
                continue
            assert abs(r[key] - want) <= 3 * math.hypot(r[key + "_se"], err), (r["paths"], key)


def test_bad_input_gives_one_line_errors(tmp_path, npz_data, capsys):
    with pytest.raises(SystemExit, match="exceeds the 32 data indices"):
        D.main(["--report", "--data", npz_data, "--xflip", "off", "--ref-paths", "64"])
    with pytest.raises(SystemExit, match="is not divisible by 2"):  # 16 px: at most 5 levels
        D.main(["--data", npz_data, "--outdir", str(tmp_path / "run"), "--channel-mult", "1,1,1,1,1,1"])
    bad = (["--match-size", "0"], ["--matcher", "sinkhorn"], ["--t-min", "1"], ["--xflip", "random"])
    for argv in (["--data", npz_data, *f] for f in bad):
        with pytest.raises(SystemExit):
            D.parse_args(argv)


# --- reliability (issue 35): one line, nothing lost, nothing silently wrong ---


def one_line(argv, match):
    with pytest.raises(SystemExit, match=match) as e:
        D.main(argv)
    assert "\n" not in str(e.value.code)


def test_resume_into_another_runs_folder_is_refused_unless_overwrite(tmp_path, npz_data, one_thread):
    D.main(tiny(tmp_path / "a", npz_data, "--match-size", "8", steps=2))
    D.main(tiny(tmp_path / "b", npz_data, "--match-size", "8", steps=1))
    again = tiny(tmp_path / "b", npz_data, "--match-size", "8", steps=3) + ["--resume", str(tmp_path / "a")]
    one_line(again, r"holds another run \(step 1\); resume .*a into its own folder or pass --overwrite")
    assert sorted(f for f in os.listdir(tmp_path / "b") if f.startswith("ckpt")) == ["ckpt-0000001.pt"]
    D.main([*again, "--overwrite"])  # b's run goes, a's continues there
    assert [r["step"] for r in read_log(tmp_path / "b")] == [3]
    assert sorted(f for f in os.listdir(tmp_path / "b") if f.startswith("ckpt")) == ["ckpt-0000003.pt"]
    D.main(tiny(tmp_path / "c", npz_data, "--match-size", "8", steps=3) + ["--resume", str(tmp_path / "a")])


def test_non_finite_weights_are_never_saved_nor_sampled(tmp_path, npz_data, one_thread):
    D.main(tiny(tmp_path / "run", npz_data, "--match-size", "8", steps=1))
    path = os.path.realpath(tmp_path / "run" / "latest.pt")
    ckpt = torch.load(path, weights_only=True)
    next(v for v in ckpt["ema"].values() if v.is_floating_point()).view(-1)[0] = math.nan
    torch.save(ckpt, path)
    one_line(tiny(tmp_path / "run", npz_data, "--match-size", "8", steps=2) + ["--resume", str(tmp_path / "run")],
             "non-finite weights at step 2: not saved")  # fmt: skip
    assert not os.path.exists(tmp_path / "run" / "ckpt-0000002.pt")
    one_line(["--generate", "2", "--ckpt", path, "--out", str(tmp_path / "s.npz")], "non-finite samples")
    assert not os.path.exists(tmp_path / "s.npz") and not os.path.exists(tmp_path / "s.png")


def test_number_flags_refuse_nan_inf_and_out_of_range_values(npz_data):
    bad = [("--dropout", "1"), ("--ema-decay", "nan"), ("--lr", "0"), ("--seed", "-1"), ("--duration", "inf"),
           ("--channel-mult", ""), ("--batch", str(2**21)), ("--t-min", "nan"), ("--grid", "-1")]  # fmt: skip
    for flag, v in bad:
        with pytest.raises(SystemExit):
            D.parse_args(["--data", npz_data, flag, v])
    assert D.parse_args(["--data", npz_data, "--dropout", "0", "--seed", str(2**63 - 1)]).seed == 2**63 - 1


def test_generate_never_replaces_an_existing_png_and_locks_its_out(tmp_path, npz_data, one_thread):
    D.main(tiny(tmp_path / "run", npz_data, "--match-size", "8", steps=1))
    out, gen = tmp_path / "s.npz", ["--generate", "2", "--ckpt", str(tmp_path / "run"), "--nfe", "1"]
    (tmp_path / "s.png").write_bytes(b"mine")
    one_line([*gen, "--out", str(out)], r"s.png exist; pass --overwrite")
    assert (tmp_path / "s.png").read_bytes() == b"mine" and not out.exists()
    with open(f"{out}.lock", "a+") as f:  # a second job on the same --out
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        one_line([*gen, "--out", str(out), "--overwrite"], "being written by another job")
    D.main([*gen, "--out", str(out), "--overwrite"])
    assert np.load(out)["images"].shape == (2, 16, 16, 3) and (tmp_path / "s.png").read_bytes() != b"mine"


def test_a_new_run_removes_only_its_own_temporary_files(tmp_path, npz_data, one_thread):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("notes.tmp2024", "ckpt-0000001.pt.tmp99", "latest.tmp", "log.jsonl.tmp"):
        (run / name).write_text("x")
    D.main(tiny(run, npz_data, "--match-size", "8", steps=1))
    assert (run / "notes.tmp2024").read_text() == "x"
    assert not any((run / n).exists() for n in ("ckpt-0000001.pt.tmp99", "latest.tmp", "log.jsonl.tmp"))


def test_a_flipped_directory_bit_in_the_zip_is_refused(tmp_path, npz_data, one_thread):
    D.main(tiny(tmp_path / "run", npz_data, "--match-size", "8", steps=1))
    data = bytearray((tmp_path / "run" / "ckpt-0000001.pt").read_bytes())
    i = data.index(b"PK\x01\x02", data.index(b"PK\x01\x02") + 4)  # the second member's central record
    data[i + 38] |= 0x10  # its external attributes: "directory"
    (tmp_path / "bad.pt").write_bytes(data)
    one_line(["--generate", "2", "--ckpt", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "s.npz")],
             r"bad.pt is corrupt: its member .* is damaged")  # fmt: skip


def test_resume_with_another_world_size_prints_a_note(tmp_path, npz_data, one_thread, capsys):
    D.main(tiny(tmp_path / "run", npz_data, "--match-size", "8", steps=1))
    path = os.path.realpath(tmp_path / "run" / "latest.pt")
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["state"]["world"] == 1
    ckpt["state"]["world"] = 2
    torch.save(ckpt, path)
    D.main(
        tiny(tmp_path / "run", npz_data, "--match-size", "8", steps=2) + ["--resume", str(tmp_path / "run")]
    )
    assert (
        "note: saved with 2 process(es), resumed with 1: the per-rank dropout masks change"
        in capsys.readouterr().out
    )


def test_os_errors_are_one_line(tmp_path, npz_data, teacher_ckpt):
    (tmp_path / "file").write_text("x")
    one_line(tiny(tmp_path / "file", npz_data, steps=1), "file: File exists")  # --outdir is a file
    one_line(["--generate", "1", "--ckpt", teacher_ckpt, "--out", str(tmp_path / "file" / "s.npz")],
             "Not a directory")  # fmt: skip


def test_truncated_data_files_are_one_line(tmp_path, npz_data):
    with open(npz_data, "rb") as f:
        data = f.read()
    (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
    one_line(["--data", str(tmp_path / "cut.npz"), "--outdir", str(tmp_path / "r")], "cannot read .*cut.npz")
    np.save(tmp_path / "x.npy", np.zeros((8, 4, 4, 3), np.uint8))
    raw = bytearray((tmp_path / "x.npy").read_bytes())
    raw[: raw.index(b"\n") + 1] = raw[: raw.index(b"\n") + 1].replace(
        b"(8,", b"(9,"
    )  # the header overstates N
    (tmp_path / "x.npy").write_bytes(raw)
    one_line(["--data", str(tmp_path / "x.npy"), "--outdir", str(tmp_path / "r")], "cannot read .*x.npy")


def test_wrong_checkpoint_content_is_one_line(tmp_path, npz_data, one_thread):
    D.main(tiny(tmp_path / "run", npz_data, "--match-size", "8", steps=1))
    good = torch.load(tmp_path / "run" / "latest.pt", weights_only=True)
    cases = {"a tensor": (torch.zeros(3), "is not a dansm.py checkpoint"),
             "another method": (dict(good, method="lmm"), "is not a dansm.py checkpoint"),
             "no net_kwargs": ({k: v for k, v in good.items() if k != "net_kwargs"}, "lacks net_kwargs"),
             "a future version": (dict(good, version=99), "version 99"),
             "an unknown arch": (dict(good, net_kwargs=dict(good["net_kwargs"], arch="unet3d")), "does not build"),
             "wrong shapes": (dict(good, ema={k: v[..., :1] for k, v in good["ema"].items()}), "does not build or load")}  # fmt: skip
    for obj, match in cases.values():
        torch.save(obj, tmp_path / "x.pt")
        one_line(
            ["--generate", "1", "--ckpt", str(tmp_path / "x.pt"), "--out", str(tmp_path / "s.npz")], match
        )

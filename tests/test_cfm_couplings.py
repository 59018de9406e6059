"""cfm_couplings.py: OT against brute force, Sinkhorn's limit and failures, class-wise coupling, the Gaussian
closed form of LOOM Eq. 4, samplers on ODEs with known solutions, block consumption, resume, torchrun, bad
input."""

import fcntl
import itertools
import math
import os
import sys

import numpy as np
import pytest
import torch
from torch import nn

import cfm_couplings as C
from conftest import read_log, run_script


def brute_force_cost(x0, x1, cost):
    c = C.pair_cost(x0, x1, cost)
    n = len(x1)
    return min(sum(c[j, p[j]].item() for j in range(n)) for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("n", [2, 3, 5, 7])
@pytest.mark.parametrize("cost", ["sqeuclidean", "l2"])
def test_ot_permutation_is_a_permutation_with_the_brute_force_optimal_cost(n, cost):
    g = torch.Generator().manual_seed(n)
    for _ in range(3):
        x0, x1 = torch.randn(n, 3, 2, 2, generator=g), torch.randn(n, 3, 2, 2, generator=g)
        perm = C.ot_permutation(x0, x1, cost)
        assert sorted(perm.tolist()) == list(range(n))
        got = C.path_cost(x0[perm], x1, cost).sum().item()
        assert got == pytest.approx(brute_force_cost(x0, x1, cost), rel=1e-9)
        assert got <= C.path_cost(x0, x1, cost).sum().item() + 1e-9  # never worse than the identity


def test_ot_moves_the_noise_and_keeps_the_images_in_place():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(6, 4, generator=g) * 10  # well separated images
    shuffle = torch.tensor([3, 0, 5, 1, 4, 2])
    x0 = x1[shuffle] + 0.01 * torch.randn(6, 4, generator=g)  # noise j sits next to image shuffle[j]
    perm = C.ot_permutation(x0, x1)
    assert torch.allclose(x0[perm], x1, atol=0.05)  # x0[perm[j]] is the noise of image j
    assert torch.equal(shuffle[perm], torch.arange(6))


def test_sinkhorn_approaches_the_hungarian_permutation_as_reg_shrinks():
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(8, 2, generator=g) * 5
    x0 = x1[torch.randperm(8, generator=g)] + 0.3 * torch.randn(8, 2, generator=g)
    perm = C.ot_permutation(x0, x1)
    c = C.pair_cost(x0, x1)
    mass = []
    for reg in (1.0, 0.01, 0.001, 0.0001):
        p = C.sinkhorn_log_plan(c, reg, tol=1e-6).exp()
        assert torch.allclose(p.sum(0), torch.full((8,), 1 / 8, dtype=p.dtype), atol=1e-6)
        assert torch.allclose(p.sum(1), torch.full((8,), 1 / 8, dtype=p.dtype), atol=1e-6)
        mass.append(p[torch.arange(8), perm].sum().item())  # mass on the Hungarian permutation
    assert mass == sorted(mass) and mass[0] < 0.9 and mass[-1] > 0.999
    i0, i1 = C.sinkhorn_pairs(C.sinkhorn_log_plan(c, 0.0001), generator=torch.Generator().manual_seed(0))
    assert torch.equal(i1, torch.arange(8)) and torch.equal(i0, perm)


def test_sinkhorn_raises_instead_of_falling_back_to_independent_pairs():
    g = torch.Generator().manual_seed(2)
    x0, x1 = torch.randn(16, 3, 8, 8, generator=g), torch.rand(16, 3, 8, 8, generator=g) * 2 - 1
    c = C.pair_cost(x0, x1)
    with pytest.raises(C.SinkhornError, match="reg"):
        C.sinkhorn_log_plan(c, 0.0)
    with pytest.raises(C.SinkhornError, match="underflow"):
        C.sinkhorn_log_plan(c, 1e-320)  # eps is denormal: C / eps overflows to inf
    with pytest.raises(C.SinkhornError, match="did not converge"):
        C.sinkhorn_log_plan(c, 1e-4, max_iter=3, tol=1e-12)
    # torchcfm's failure case: costs of ~3.7e3 (CIFAR-10 scale) with an absolute reg of 0.05 underflow the
    # plain-domain kernel exp(-C / 0.05) to exactly zero; the log-domain plan is fine.
    big = C.pair_cost(torch.randn(32, 3072, generator=g), torch.rand(32, 3072, generator=g) * 2 - 1)
    assert torch.exp(-big / 0.05).max() == 0
    p = C.sinkhorn_log_plan(big, 0.05 / big.mean().item()).exp()
    assert torch.isfinite(p).all() and p.sum().item() == pytest.approx(1.0, abs=1e-6)


def test_sinkhorn_pairs_without_replacement_use_every_sample_once_and_with_replacement_do_not():
    c = C.pair_cost(torch.randn(128, 4), torch.randn(128, 4))
    log_p = C.sinkhorn_log_plan(c, 0.02)
    i0, i1 = C.sinkhorn_pairs(log_p, generator=torch.Generator().manual_seed(0))
    assert sorted(i0.tolist()) == list(range(128)) and torch.equal(i1, torch.arange(128))
    i0, i1 = C.sinkhorn_pairs(log_p, replace=True, generator=torch.Generator().manual_seed(0))
    assert len(set(zip(i0.tolist(), i1.tolist(), strict=True))) < 110  # torchcfm: ~81 unique of 128


@pytest.mark.parametrize("coupling", ["ot", "sinkhorn"])
def test_classwise_coupling_never_pairs_across_classes_and_keeps_each_class_noise(coupling):
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 4, (40,), generator=g)
    x0, x1 = torch.randn(40, 5, generator=g), torch.randn(40, 5, generator=g)
    i0, i1 = C.couple(x0, x1, labels, coupling, generator=g)
    assert torch.equal(labels[i0], labels[i1])
    for k in range(4):
        own = torch.nonzero(labels == k).flatten()
        assert sorted(i0[labels[i1] == k].tolist()) == own.tolist()
    assert (i0 != i1).any()
    unconditional, _ = C.couple(x0, x1, None, coupling, generator=g)
    assert (labels[unconditional] != labels).any()  # without labels the solve does cross classes


class MLP(nn.Module):
    """A small velocity field for 2-D data, net(x, t, class_labels=None), with Fourier features of t (a plain
    MLP on raw t underfits the sign change of Eq. 4's slope around t = 1/2 by ~15%)."""

    def __init__(self, width=128):
        super().__init__()
        self.f = nn.Sequential(
            nn.Linear(11, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2)
        )

    def forward(self, x, t, class_labels=None):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(len(x), 1)
        k = torch.arange(1, 5, dtype=x.dtype) * math.pi
        return self.f(torch.cat([x, t, torch.sin(k * t), torch.cos(k * t)], 1))


def train_gauss2d(coupling, steps=750, batch=256):
    torch.manual_seed(0)
    net = MLP()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x0, x1 = torch.randn(batch, 2, generator=g), torch.randn(batch, 2, generator=g)
        i0, i1 = C.couple(x0, x1, None, coupling)
        loss = C.cfm_loss(net, x0[i0], x1[i1], torch.rand(batch, generator=g)).mean()  # LOOM Eq. 3
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return net


def test_gaussian_to_gaussian_field_matches_loom_eq4_and_ot_gives_almost_zero(one_thread):
    y = torch.randn(2000, 2, generator=torch.Generator().manual_seed(5))
    ts = [0.1, 0.25, 0.4, 0.6, 0.75, 0.9]
    v_ind, v_ot = train_gauss2d("independent"), train_gauss2d("ot")
    with torch.no_grad():
        err, ref, ot = 0.0, 0.0, 0.0
        for t in ts:
            exact = y * (2 * t - 1) / (t**2 + (1 - t) ** 2)  # LOOM Eq. 4 with sigma = 0
            err += (v_ind(y, t) - exact).square().sum().item()
            ref += exact.square().sum().item()
            ot += v_ot(y, t).square().sum().item()
    assert math.sqrt(err / ref) < 0.1  # measured 0.059 (0.054 with 1500 steps)
    assert math.sqrt(ot / ref) < 0.1  # OT: a near-identity map, measured ~0.02 of Eq. 4's norm


def test_samplers_solve_odes_with_known_solutions_and_count_nfe():
    calls = []

    def linear(x, t, class_labels=None):  # dx/dt = -x + 2t: the time argument matters
        calls.append(float(t))
        return -x + 2 * t

    x0 = torch.tensor([[1.0, -2.0]])
    exact = x0 * math.exp(-1) + 2 * (1 - 1) + 2 * math.exp(-1)  # x(t) = (x0 + 2) e^-t + 2t - 2
    for solver, nfe, steps in (("euler", 4, 4), ("midpoint", 8, 4)):
        calls.clear()
        x, used = C.sample(linear, x0, nfe, solver=solver)
        h, ref = 1 / steps, x0.clone()
        for i in range(steps):  # the same method written out by hand
            t = i * h
            ref = (
                ref + h * (-ref + 2 * t)
                if solver == "euler"
                else ref + h * (-(ref + h / 2 * (-ref + 2 * t)) + 2 * (t + h / 2))
            )
        assert used == nfe == len(calls) and torch.allclose(x, ref, atol=1e-6)
    for v in (1, 2, 5, 8):  # finer Euler is closer
        assert (C.sample(linear, x0, v)[0] - exact).abs().max() >= (
            C.sample(linear, x0, 2 * v)[0] - exact
        ).abs().max()
    with pytest.raises(ValueError, match="even"):
        C.sample(linear, x0, 3, solver="midpoint")


def test_dopri5_is_torchdiffeqs_matches_the_exact_solution_and_reports_both_nfe_figures(monkeypatch):
    import torchdiffeq

    used_odeint = []
    real = torchdiffeq.odeint
    monkeypatch.setattr(
        torchdiffeq, "odeint", lambda *a, **k: used_odeint.append(k["method"]) or real(*a, **k)
    )
    calls = []

    def linear(x, t, class_labels=None):  # dx/dt = -x + 2t, x(t) = (x0 + 2) e^-t + 2t - 2
        calls.append(float(t))
        return -x + 2 * t

    x0 = torch.tensor([[1.0, -2.0], [0.5, 3.0]], dtype=torch.float64)
    exact = (x0 + 2) * math.exp(-1)
    stats = {}
    x, used = C.sample(linear, x0, 0, solver="dopri5", atol=1e-10, rtol=1e-10, stats=stats)
    assert used_odeint == ["dopri5"] and (x - exact).abs().max() < 1e-8
    # network calls counted = torchdiffeq's function evaluations = 2 (initial step selection) + 6 per
    # attempted step (Dormand-Prince has 7 stages, the first reused from the previous step: FSAL)
    assert used == len(calls) == stats["nfe_torchdiffeq"] == 2 + 6 * stats["solver_steps"] > 6 * 5
    assert calls[0] == 0.0 and max(calls) >= 1.0  # torchdiffeq steps past t = 1 and interpolates back
    coarse = {}
    C.sample(linear, x0, 0, solver="dopri5", stats=coarse)  # the papers' atol = rtol = 1e-5: fewer steps
    assert coarse["solver_steps"] < stats["solver_steps"]


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
        "--nfe",
        "1",
        "--lr-rampup",
        str(2 * batch / 1e6),
        *extra,
    ]


def test_each_step_couples_its_own_noise_and_images_with_the_optimal_permutation(tmp_path, npz_data):
    _, argv = tiny(tmp_path, npz_data, "--coupling", "ot", batch=16)
    args = C.parse_args(argv)
    images, _ = C.load_data(npz_data)
    x0, x1, _, _ = C.coupled_batch(args, 0, images, None, None, 32, (3, 16, 16), torch.device("cpu"))
    noise = torch.randn([16, 3, 16, 16], generator=C.generator_for(args.seed, 0, 1))
    assert torch.equal(x1, C.get_batch(images, None, C.batch_indices(32, 16, 0, args.seed), "cpu")[0])
    perm = C.ot_permutation(noise, x1)
    assert torch.equal(x0, noise[perm])  # every noise of the step once, in the optimal assignment
    step1 = C.coupled_batch(args, 1, images, None, None, 32, (3, 16, 16), torch.device("cpu"))[0]
    assert not torch.equal(step1[:8], x0[:8])  # step 1 has fresh noise


def test_resume_equals_uninterrupted(tmp_path, npz_data, one_thread, capsys):
    a = tmp_path / "a"
    a.mkdir()
    out_a, argv = tiny(a, npz_data, "--coupling", "ot", "--dropout", "0.1", steps=4)
    C.main(argv)
    b = tmp_path / "b"
    b.mkdir()
    out_b, argv = tiny(b, npz_data, "--coupling", "ot", "--dropout", "0.1", steps=2)
    C.main(argv)
    ckpt = torch.load(os.path.join(out_b, "latest.pt"), weights_only=True)
    assert ckpt["state"]["world"] == 1
    torch.save(
        dict(ckpt, state=dict(ckpt["state"], world=2)), os.path.realpath(os.path.join(out_b, "latest.pt"))
    )
    _, argv = tiny(b, npz_data, "--coupling", "ot", "--dropout", "0.1", steps=4)
    C.main(argv + ["--resume", out_b])  # as if saved by 2 processes: a note, the same numbers (one rank here)
    assert "note: saved with 2 process(es), resumed with 1: the per-rank dropout" in capsys.readouterr().out
    ca = torch.load(os.path.join(out_a, "latest.pt"), weights_only=True)
    cb = torch.load(os.path.join(out_b, "latest.pt"), weights_only=True)
    for key in ("net", "ema"):
        for k in ca[key]:
            assert torch.equal(ca[key][k], cb[key][k]), (key, k)
    for ra, rb in zip(read_log(out_a)[2:], read_log(out_b)[2:], strict=True):  # steps 3 and 4
        assert (ra["step"], ra["loss"], ra["cost_after"]) == (rb["step"], rb["loss"], rb["cost_after"])


def test_reflow_trains_on_the_files_pairs_and_inits_from_a_flow(tmp_path, npz_data, one_thread):
    g = np.random.default_rng(0)
    pairs = tmp_path / "pairs.npz"
    noise, data = g.standard_normal((20, 3, 16, 16)).astype(np.float32), g.uniform(-1, 1, (20, 3, 16, 16))
    np.savez(pairs, noise=noise, data=data.astype(np.float16), label=np.arange(20) % 3)
    out1, argv = tiny(tmp_path, npz_data, "--coupling", "independent", steps=2)
    C.main(argv)
    out2 = str(tmp_path / "reflow")
    argv = ["--coupling", "pairs", "--pairs", str(pairs), "--init", out1, "--outdir", out2, "--batch", "4"]
    C.main(argv + ["--duration", "8e-6", "--tiny", "--log-every", "1", "--grid", "0"])
    recs = read_log(out2)
    assert all(r["changed"] == 0 and r["cost_after"] == r["cost_before"] for r in recs)
    args = C.parse_args([*argv, "--cond"])
    x0, x1, y, _ = C.coupled_batch(args, 1, None, None, C.load_pairs(str(pairs)), 20, (3, 16, 16), "cpu")
    idx = C.batch_indices(20, 4, 1, 0).numpy()
    assert torch.equal(x0, torch.from_numpy(noise[idx])) and torch.equal(y, torch.from_numpy(idx % 3))
    assert torch.equal(x1, torch.from_numpy(data.astype(np.float16)[idx].astype(np.float32)))


def test_torchrun_two_ranks_couple_like_one_process(tmp_path, npz_data):
    common = ["--coupling", "ot", "--dropout", "0", "--cond"]
    one, argv = tiny(tmp_path / "one", npz_data, *common, steps=3)
    r = run_script([sys.executable, "cfm_couplings.py", *argv])
    assert r.returncode == 0, r.stderr[-2000:]
    two, argv = tiny(tmp_path / "two", npz_data, *common, steps=3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    r = run_script([*cmd, "cfm_couplings.py", *argv, "--batch-gpu", "2"])
    assert r.returncode == 0, r.stderr[-2000:]
    for r1, r2 in zip(read_log(one), read_log(two), strict=True):
        for k in ("cost_before", "cost_after", "changed"):
            assert r1[k] == pytest.approx(r2[k], rel=1e-12)  # the same global pairs for any world size
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-4)
    w1 = torch.load(os.path.join(one, "latest.pt"), weights_only=True)["net"]
    w2 = torch.load(os.path.join(two, "latest.pt"), weights_only=True)["net"]
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--coupling", "ot", "--batch-gpu", "3"], "multiple of --batch-gpu"),
        (["--coupling", "ot", "--batch", "64"], "exceeds the 32 samples"),
        (["--coupling", "pairs", "--pairs", "PAIRS"], "'noise' and 'data' must both be"),
        (["--coupling", "pairs", "--pairs", "missing.npz"], "cannot read missing.npz"),
        (["--coupling", "ot", "--resume", "CKPT"], "not 'cfm_couplings'"),
    ],
)
def test_bad_input_gives_one_line_errors(tmp_path, npz_data, teacher_ckpt, extra, match):
    bad = tmp_path / "bad.npz"
    np.savez(bad, noise=np.zeros((4, 3, 16, 16), np.float32), data=np.zeros((4, 3, 8, 8), np.float32))
    extra = [{"PAIRS": str(bad), "CKPT": teacher_ckpt}.get(v, v) for v in extra]
    _, argv = tiny(tmp_path, npz_data, *extra)
    if "pairs" in extra:
        argv = argv[2:]  # no --data with pairs
    with pytest.raises(SystemExit, match=match):
        C.main(argv)


def test_command_line_refuses_unknown_coupling_and_missing_inputs(capsys):
    for argv, msg in (
        (["--coupling", "hungarian", "--data", "shapes"], "invalid choice"),
        (["--coupling", "pairs"], "needs --pairs"),
        (["--coupling", "ot"], "needs --data"),
        (["--coupling", "ot", "--data", "shapes", "--pairs", "p.npz"], "only read by --coupling pairs"),
    ):
        with pytest.raises(SystemExit):
            C.parse_args(argv)
        assert msg in capsys.readouterr().err


def flow_ckpt(tmp_path):
    """A tiny unconditional flow checkpoint with random (non-trivial) weights."""
    torch.manual_seed(0)
    kw = dict(img_resolution=16, img_channels=3, label_dim=0, time_scale=1000.0, dropout=0.0,
              model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])  # fmt: skip
    net = C.build_net(kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = net.state_dict()
    ckpt = dict(method="cfm_couplings", version=1, args={}, net_kwargs=kw, net=sd, ema=sd, opt=None, step=0,
                kimg=0.0, state={})  # fmt: skip
    path = tmp_path / "flow.pt"
    torch.save(ckpt, path)
    return str(path), net.eval()


def test_gen_pairs_and_evaluate_pass_sampler_keywords_to_a_flow(tmp_path, one_thread):
    import evaluate
    import gen_pairs

    path, net = flow_ckpt(tmp_path)
    out = str(tmp_path / "pairs.npz")
    gen_pairs.main(["--ckpt", path, "--num-pairs", "3", "--nfe", "4", "--sampler-kw", "solver=midpoint",
                    "--out", out, "--batch", "2"])  # fmt: skip
    pairs = C.load_pairs(out)
    assert pairs["meta"]["sampler_kw"] == {"solver": "midpoint"} and pairs["meta"]["nfe_used"] == 4
    x0 = torch.from_numpy(np.array(pairs["noise"]))
    expect, _ = C.sample(net, x0, 4, solver="midpoint")
    assert torch.allclose(torch.from_numpy(np.array(pairs["data"])), expect, atol=1e-5)
    noise, labels, gens = evaluate.inputs_for_seeds(range(2), (3, 16, 16), 0)
    module, loaded, _, _ = gen_pairs.load_model(path, "cpu")
    _, used, calls = evaluate.run_sampler(module, loaded, noise, 0, None, gens, {"solver": "dopri5"})
    assert used == calls > 6  # dopri5's network calls, counted, equal the function evaluations it reports
    with pytest.raises(SystemExit):
        gen_pairs.parse_args(["--ckpt", path, "--out", out, "--sampler-kw", "solver"])


def test_unconditional_is_the_default_and_cond_opts_in(tmp_path, npz_data, one_thread):
    assert C.parse_args(["--data", npz_data]).cond is False  # the data has labels; they are not used
    with pytest.raises(SystemExit):
        C.parse_args(["--data", npz_data, "--cond", "auto"])  # the old tri-state is gone
    for extra, label_dim in (([], 0), (["--cond"], 3)):
        out, argv = tiny(tmp_path / str(label_dim), npz_data, *extra, steps=1)
        C.main(argv)
        assert (
            torch.load(os.path.join(out, "latest.pt"), weights_only=True)["net_kwargs"]["label_dim"]
            == label_dim
        )


def test_ot_replace_draws_pairs_with_replacement_from_the_exact_plan(tmp_path, npz_data):
    g = torch.Generator().manual_seed(4)
    x0, x1 = torch.randn(64, 12, generator=g), torch.randn(64, 12, generator=g)
    perm = C.ot_permutation(x0, x1)
    i0, i1 = C.couple(x0, x1, None, "ot", replace=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(i0, perm[i1])  # every drawn pair is one of the plan's pairs
    assert len(set(i0.tolist())) < 50 and len(set(i1.tolist())) < 50  # columns repeat: ~63% distinct
    i0, i1 = C.couple(x0, x1, None, "ot")  # our default: the permutation itself
    assert torch.equal(i0, perm) and torch.equal(i1, torch.arange(64))
    _, argv = tiny(tmp_path, npz_data, "--coupling", "ot", "--ot-replace", batch=16)
    args = C.parse_args(argv)
    images, _ = C.load_data(npz_data)
    x0s = C.coupled_batch(args, 0, images, None, None, 32, (3, 16, 16), torch.device("cpu"))[0].flatten(1)
    assert len(torch.unique(x0s, dim=0)) < 16  # the same noise rows appear more than once in the step


def test_random_xflip_mirrors_about_half_of_the_visits_deterministically(tmp_path, npz_data):
    _, argv = tiny(tmp_path, npz_data, "--coupling", "independent", "--xflip", "random")
    args = C.parse_args(argv)
    images, _ = C.load_data(npz_data)
    block = lambda b: C.coupled_batch(args, b, images, None, None, 32, (3, 16, 16), torch.device("cpu"))  # noqa: E731
    plain = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    flipped = 0
    for step in range(8):  # 8 steps of 8 = 2 epochs of the 32 images
        x1 = block(step)[1]
        idx = C.batch_indices(32, 8, step, args.seed)
        for row, i in zip(x1, idx.tolist(), strict=True):
            assert torch.equal(row, plain[i]) or torch.equal(row, plain[i].flip(2))
            flipped += not torch.equal(row, plain[i])
    assert 20 < flipped < 44  # of 64 visits, about half mirrored
    assert torch.equal(block(5)[1], block(5)[1])
    assert C.parse_args(argv[:-1] + ["copies"]).xflip == "copies"
    with pytest.raises(SystemExit):
        C.parse_args(["--coupling", "pairs", "--pairs", "p.npz", "--xflip", "random"])


def test_lr_rampup_ramps_from_zero_as_torchcfm_and_the_loom_code(tmp_path, npz_data, one_thread):
    out, argv = tiny(tmp_path, npz_data, "--coupling", "independent", "--lr", "1e-3", "--lr-rampup", "16e-6")
    C.main(argv)
    assert [r["lr"] for r in read_log(out)] == pytest.approx([0.0, 5e-4, 1e-3, 1e-3])


def test_loom_reflow_preset_equals_the_official_reflow_config_and_flags_override():
    args = C.parse_args(["--preset", "loom-reflow", "--pairs", "p.npz", "--init", "runs/loom"])
    assert (args.coupling, args.lr, args.batch, args.sigma_min) == ("pairs", 2e-5, 1024, 1e-7)
    assert round(args.lr_rampup * 1e6) == 5000 * 1024  # the official 5k warm-up steps at batch 1024
    assert (args.duration, args.ema_decay, args.grad_clip, args.xflip) == (200.0, 0.9999, 1.0, "off")
    assert C.parse_args(["--preset", "loom-reflow", "--pairs", "p.npz", "--lr", "1e-5"]).lr == 1e-5


def test_default_sinkhorn_reg_puts_most_plan_mass_on_the_optimal_permutation_at_cifar10_scale(one_thread):
    g = torch.Generator().manual_seed(0)
    x1 = (torch.randn(128, 3 * 32 * 32, generator=g) * 0.5 - 0.05).clamp(-1, 1)  # CIFAR-10's pixel statistics
    x0 = torch.randn(128, 3 * 32 * 32, generator=g)
    c = C.pair_cost(x0, x1)
    assert c.mean().item() == pytest.approx(3.8e3, rel=0.05)
    on_perm = lambda reg: C.sinkhorn_log_plan(c, reg).exp()[torch.arange(128), C.ot_permutation(x0, x1)].sum()  # noqa: E731
    assert on_perm(C.SINKHORN_REG) > 0.6  # measured 0.70; the former default 0.05 left 0.015 (uniform: 0.008)
    assert on_perm(0.05) < 0.05


def test_a_sinkhorn_failure_in_training_stops_with_one_line_and_keeps_the_last_checkpoint(
    tmp_path, npz_data, one_thread
):
    out, argv = tiny(tmp_path, npz_data, "--coupling", "sinkhorn", steps=1)
    C.main(argv)
    _, argv = tiny(tmp_path, npz_data, "--coupling", "sinkhorn", "--sinkhorn-iters", "1", "--sinkhorn-reg",
                   "1e-6")  # fmt: skip
    with pytest.raises(SystemExit, match="did not converge.*--resume") as e:
        C.main([*argv, "--resume", out])
    assert "\n" not in str(e.value)
    assert torch.load(os.path.join(out, "latest.pt"), weights_only=True)["step"] == 1


def test_cifar10_defaults_to_torchcfms_35_7m_parameter_unet():
    args = C.parse_args(["--data", "cifar10"])
    assert args.arch == "adm-cfm" and C.parse_args(["--data", "shapes"]).arch == "ddpmpp"
    kw = dict(img_resolution=32, img_channels=3, arch=args.arch, model_channels=args.model_channels,
              channel_mult=args.channel_mult, num_blocks=args.num_blocks, attn_resolutions=args.attn_res)  # fmt: skip
    assert sum(p.numel() for p in C.build_net(kw).parameters()) == 35_746_307  # torchcfm's and LOOM's


def test_float32_ot_cost_picks_the_float64_permutation_at_cifar10_scale():
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(7)
    for _ in range(2):
        x0, x1 = torch.randn(128, 3072, generator=g), (torch.rand(128, 3072, generator=g) * 2 - 1)
        exact = linear_sum_assignment(C.pair_cost(x0, x1).numpy())[1]  # float64 costs
        assert torch.equal(C.ot_permutation(x0, x1), torch.as_tensor(exact))


# --- reliability (issue 35): nothing lost, nothing silently wrong, one line for every bad input ---


def one_line(match, call, *args):
    """call(*args) stops with one line (no traceback) that matches `match`."""
    with pytest.raises(SystemExit, match=match) as e:
        call(*args)
    assert "\n" not in str(e.value)


def test_resuming_a_run_into_another_runs_folder_needs_overwrite(tmp_path, npz_data, one_thread):
    a, argv_a = tiny(tmp_path / "a", npz_data, "--coupling", "independent", "--grid", "0", steps=2)
    b, argv_b = tiny(tmp_path / "b", npz_data, "--coupling", "independent", "--grid", "0", steps=1)
    C.main(argv_a), C.main(argv_b)
    resume_a_into_b = [*argv_a[:3], b, *argv_a[4:], "--resume", a]
    resume_a_into_b[resume_a_into_b.index("--duration") + 1] = str(3 * 8 / 1e6)
    one_line(r"b/run holds another run \(step 1\); resume .* own folder", C.main, resume_a_into_b)
    assert sorted(os.listdir(b)) == [".lock", "ckpt-0000001.pt", "latest.pt", "log.jsonl"]  # untouched
    C.main(resume_a_into_b + ["--overwrite"])  # b's run goes first, as for a new run
    assert sorted(os.listdir(b)) == [".lock", "ckpt-0000003.pt", "latest.pt", "log.jsonl"]
    assert [r["step"] for r in read_log(b)] == [3]
    C.main([*resume_a_into_b[:3], str(tmp_path / "c"), *resume_a_into_b[4:]])  # an empty folder is fine


def nan_ckpt(tmp_path, npz_data):
    """A run of 1 step whose checkpoint then gets one NaN EMA weight (a written, CRC-valid file)."""
    out, argv = tiny(tmp_path, npz_data, "--coupling", "independent", "--grid", "0", steps=1)
    C.main(argv)
    path = os.path.join(out, "ckpt-0000001.pt")
    ckpt = torch.load(path, weights_only=True)
    next(iter(ckpt["ema"].values())).view(-1)[0] = float("nan")
    torch.save(ckpt, path)
    return out, argv


def test_non_finite_weights_are_never_saved_nor_sampled(tmp_path, npz_data, one_thread):
    out, argv = nan_ckpt(tmp_path, npz_data)
    argv[argv.index("--duration") + 1] = str(2 * 8 / 1e6)
    one_line("non-finite weights at step 2: not saved", C.main, [*argv, "--resume", out])
    assert not os.path.exists(os.path.join(out, "ckpt-0000002.pt"))
    s = str(tmp_path / "s.npz")
    one_line("non-finite samples", C.main, ["--generate", "2", "--ckpt", out, "--out", s, "--nfe", "1"])
    assert not [f for f in os.listdir(tmp_path) if f.startswith("s.") and not f.endswith(".lock")]


def test_numbers_are_finite_and_in_range_at_the_command_line(capsys):
    for flag, value in (("--ema-decay", "nan"), ("--lr", "inf"), ("--sigma-min", "nan"), ("--dropout", "1"),
                        ("--seed", "-1"), ("--batch", str(2**21)), ("--channel-mult", "0,2")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            C.parse_args(["--data", "shapes", flag, value])
        assert e.value.code == 2 and f"argument {flag}: " in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the midpoint sampler takes 2 network evaluations per step
        C.parse_args(["--generate", "2", "--ckpt", "c", "--solver", "midpoint", "--nfe", "3"])
    assert "an even --nfe" in capsys.readouterr().err


def test_generate_never_overwrites_its_grid_and_locks_its_output(tmp_path, one_thread):
    path, _ = flow_ckpt(tmp_path)
    (tmp_path / "s.png").write_bytes(b"an earlier grid")
    gen = ["--generate", "2", "--ckpt", path, "--out", str(tmp_path / "s.npz"), "--nfe", "1"]
    one_line("s.png exists; pass --overwrite", C.main, gen)
    assert (tmp_path / "s.png").read_bytes() == b"an earlier grid" and not (tmp_path / "s.npz").exists()
    fd = os.open(str(tmp_path / "s.npz.lock"), os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a second job on the same --out
    one_line("being written by a running job", C.main, [*gen, "--overwrite"])
    os.close(fd)
    C.main([*gen, "--overwrite"])
    assert np.load(tmp_path / "s.npz")["images"].shape == (2, 16, 16, 3)


def test_a_new_run_removes_only_the_temporary_files_this_file_writes(tmp_path, npz_data, one_thread):
    out, argv = tiny(tmp_path, npz_data, "--coupling", "independent", "--grid", "0", steps=1)
    os.makedirs(out)
    for name in ("notes.tmp2024", "ckpt-0000009.pt.tmp", "log.jsonl.tmp", "p.npz.tmp_backup"):
        open(os.path.join(out, name), "w").close()
    C.main(argv)
    assert sorted(os.listdir(out)) == [".lock", "ckpt-0000001.pt", "latest.pt", "log.jsonl", "notes.tmp2024",
                                       "p.npz.tmp_backup"]  # fmt: skip


def test_a_checkpoint_member_marked_as_a_directory_is_refused(tmp_path, one_thread):
    path, _ = flow_ckpt(tmp_path)
    with open(path, "r+b") as f:
        raw = f.read()
        at = raw.index(b"PK\x01\x02", raw.index(b"PK\x01\x02") + 1)  # the second member's central record
        f.seek(at + 38)  # its external attributes: set MS-DOS's "directory" bit
        f.write(bytes([raw[at + 38] | 0x10]))
    one_line(r"flow.pt is corrupt: its member .* is damaged", C.load_checkpoint, path)


def test_outputs_in_unusable_places_are_one_line(tmp_path, npz_data):
    (tmp_path / "file").write_text("not a folder")
    _, argv = tiny(tmp_path, npz_data, "--coupling", "independent")
    argv[argv.index("--outdir") + 1] = str(tmp_path / "file")
    one_line("file: File exists", C.main, argv)
    path, _ = flow_ckpt(tmp_path)
    one_line("s.npz.lock: Not a directory", C.main, ["--generate", "1", "--ckpt", path, "--out",
             str(tmp_path / "file" / "s.npz")])  # fmt: skip


def test_data_labels_must_be_small_nonnegative_integers(tmp_path):
    images = np.zeros((4, 8, 8, 3), np.uint8)
    for labels in (np.arange(4) + 0.5, np.arange(4) == 1, np.arange(4) << 40, np.arange(4) - 1):
        np.savez(tmp_path / "d.npz", images=images, labels=labels)
        one_line("labels must be integers in", C.load_data, str(tmp_path / "d.npz"))


def test_checkpoints_with_the_wrong_content_are_one_line(tmp_path, npz_data, one_thread):
    path, net = flow_ckpt(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    kw = ckpt["net_kwargs"]
    bad = {"tensor": torch.zeros(3), "no_kwargs": {k: v for k, v in ckpt.items() if k != "net_kwargs"},
           "future": dict(ckpt, version=99), "arch": dict(ckpt, net_kwargs=dict(kw, arch="unet3d")),
           "shape": dict(ckpt, net_kwargs=dict(kw, model_channels=32))}  # fmt: skip
    why = {"tensor": "a 'Tensor' checkpoint", "no_kwargs": "has no net_kwargs", "future": "version 99",
           "arch": "cannot build the network", "shape": "cannot build the network"}  # fmt: skip
    for name, obj in bad.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        one_line(why[name], C.main, ["--generate", "1", "--ckpt", str(tmp_path / f"{name}.pt"), "--out",
                                     str(tmp_path / f"{name}.npz")])  # fmt: skip

"""evaluate.py: Frechet distance and KID against closed forms, LOOM's torcheval arithmetic, identical noise for
every checkpoint, exact NFE counts, straightness and curvature of known flows on the flow clock, checks before
any sampling, forks, 1 vs 2 processes, bad input."""

import json
import math
import os
import re
import sys
import types

import numpy as np
import pytest
import torch

import edm_teacher as E
import evaluate as V
import lmm as L
from conftest import TINY_NET, run_script


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    a, b = rng.uniform(0.5, 2, 6), rng.uniform(0.5, 2, 6)
    expect = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert V.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expect, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))  # a common rotation changes nothing
    assert V.frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T) == pytest.approx(
        expect, rel=1e-8
    )
    feats = rng.normal(size=(500, 6))
    mu, cov = feats.mean(0), np.cov(feats, rowvar=False)
    assert abs(V.frechet_distance(mu, cov, mu, cov)) < 1e-8


def test_kid_is_unbiased_near_zero_for_one_distribution_and_positive_otherwise():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(600, 8)), rng.normal(size=(600, 8))
    same = V.kernel_distance(x, y, num_subsets=50, max_subset_size=300)
    shifted = V.kernel_distance(x, y + 0.5, num_subsets=50, max_subset_size=300)
    assert abs(same) < 0.01 and shifted > 20 * abs(same) and shifted > 0.1
    assert V.kernel_distance(x, y, num_subsets=5) == V.kernel_distance(x, y, num_subsets=5)  # seeded subsets


def flow_module(velocity):
    return types.SimpleNamespace(ode_velocity=lambda net, x, t, labels=None: velocity(x, t))


def test_straight_flow_has_zero_straightness_and_curvature():
    d = torch.randn(3, 1, 2, 2)
    m, x1, _ = V.ode_metrics(flow_module(lambda x, t: d.expand_as(x)), None, torch.zeros(3, 1, 2, 2))
    torch.testing.assert_close(x1, d)
    assert m["straightness"].abs().max() < 1e-5 and m["curvature"].abs().max() < 1e-6


def test_circular_flow_has_the_analytic_curvature():
    omega, n = math.pi / 2, 50  # a quarter turn in t in [0, 1], uniform steps h = 1/n

    def rotate(x, t):  # d/dt (a, b) = omega (-b, a) on pixel pairs
        a, b = x[:, :, 0], x[:, :, 1]
        return torch.stack([-omega * b, omega * a], dim=2)

    x0 = torch.randn(4, 1, 2, 3, dtype=torch.float64)
    m, x1, times = V.ode_metrics(flow_module(rotate), None, x0, steps=n, grid="uniform")
    # LOOM Fig. 6: the velocity A x_k at consecutive solver states; Heun's step M = I + hA + (hA)^2/2 is a
    # scaled rotation by atan2(wh, 1 - (wh)^2/2), so each pair of velocities is that angle apart
    wh = omega / n
    expect = 1 - math.cos(math.atan2(wh, 1 - wh**2 / 2))
    torch.testing.assert_close(
        m["curvature_t"], torch.full((4, n - 1), expect, dtype=torch.float64), rtol=1e-4, atol=0
    )
    torch.testing.assert_close(times, torch.arange(1, n, dtype=torch.float64) / n)
    assert abs(expect / (1 - math.cos(wh)) - 1) < 0.01  # the continuous flow's 1 - cos(omega h)
    # straightness of a quarter circle of radius r: integral ||v - (x1 - x0)|| with |v| = omega r
    r = x0.flatten(1).norm(dim=1)
    ts = torch.linspace(0, 1, 20001, dtype=torch.float64)[:-1] + 0.5 / 20000
    v = torch.stack([-torch.sin(omega * ts), torch.cos(omega * ts)], 1) * omega  # unit-radius, from (1, 0)
    integral = (v - torch.tensor([0.0 - 1.0, 1.0 - 0.0], dtype=torch.float64)).norm(dim=1).mean()
    torch.testing.assert_close(m["straightness"].double(), r * integral, rtol=3e-3, atol=0)


def test_flow_clock_straightness_is_the_same_for_an_edm_and_a_flow_parametrisation_of_one_gaussian_flow():
    m, a = 0.3, 0.5  # data N(m, a^2 I); x = y + sigma n (EDM) and x_t = t y + (1 - t) n (flow) are one flow

    def denoiser(x, sigma, class_labels=None):  # E[y | x] for EDM's x = y + sigma n
        s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        return m + a**2 / (a**2 + s**2) * (x - m)

    def velocity(x, t):  # E[y - n | t y + (1 - t) n = x]
        var = t**2 * a**2 + (1 - t) ** 2
        return m + (t * a**2 - (1 - t)) * (x - t * m) / var

    z = torch.randn(32, 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    edm, x_edm, _ = V.ode_metrics(E, denoiser, z, steps=100)  # EDM's rho grid, mapped to the flow clock
    flow, x_flow, _ = V.ode_metrics(flow_module(velocity), None, z, steps=100)  # uniform grid
    rel_edm, rel_flow = edm["straightness_rel"].mean().item(), flow["straightness_rel"].mean().item()
    assert 0.6 < rel_flow < 0.8 and rel_edm == pytest.approx(rel_flow, rel=0.03)  # EDM starts at s = 1/81
    torch.testing.assert_close(x_edm, x_flow, rtol=0, atol=0.05)  # the same data sample


@pytest.fixture
def two_ckpts(tmp_path, teacher_ckpt):
    """The same tiny conditional EDM under two names, and a tiny LMM checkpoint."""
    ck = torch.load(teacher_ckpt, weights_only=True)
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    torch.save(ck, a)
    torch.save(ck, b)
    torch.manual_seed(0)
    kw = dict(img_resolution=16, img_channels=3, label_dim=3, dropout=0.0, **TINY_NET)
    net = L.build_net(kw)
    lmm_ck = dict(ck, method="lmm", net_kwargs=kw, net=net.state_dict(), ema=net.state_dict())
    c = tmp_path / "lmm.pt"
    torch.save(lmm_ck, c)
    return str(a), str(b), str(c)


def model(spec):
    module, ckpt = V.load_checkpoint(spec)
    net = module.build_net(ckpt["net_kwargs"])
    net.load_state_dict(ckpt["ema"])
    return module, net.eval()


def test_nfe_counts_are_exact_for_heun_and_lmm(two_ckpts):
    for spec, nfe, expect in [(two_ckpts[0], 35, 35), (two_ckpts[0], 4, 3), (two_ckpts[2], 3, 3)]:
        module, net = model(spec)
        noise, labels, gens = V.inputs_for_seeds(range(2), (3, 16, 16), 3)
        _, used, calls = V.run_sampler(module, net, noise, nfe, labels, gens)
        assert calls == used == expect, (spec, nfe)


def run_eval(tmp_path, npz_data, ckpts, extra=(), name="res.json"):
    out = str(tmp_path / name)
    args = [
        "--ckpt", *ckpts, "--nfe", "1,3", "--num-images", "12", "--batch", "5", "--ref-data", npz_data,
        "--test-features", "random-cnn", "--out", out, *extra,
    ]  # fmt: skip
    V.main(args)
    with open(out) as f:
        return json.load(f), args


def test_every_checkpoint_gets_the_same_noise(tmp_path, npz_data, two_ckpts, one_thread):
    res, _ = run_eval(tmp_path, npz_data, two_ckpts[:2])
    rows = res["results"]
    assert [(r["ckpt"], r["nfe_requested"], r["nfe"]) for r in rows] == [
        (two_ckpts[0], 1, 1),
        (two_ckpts[0], 3, 3),
        (two_ckpts[1], 1, 1),
        (two_ckpts[1], 3, 3),
    ]
    assert rows[0]["fid"] == rows[2]["fid"] and rows[1]["kid"] == rows[3]["kid"]  # identical images
    assert rows[0]["fid"] != rows[1]["fid"]
    # the noise and label of image i are edm_teacher --generate's for seed i
    noise, labels, _ = V.inputs_for_seeds(range(5), (3, 16, 16), 3)
    e_noise, e_labels = E.noise_for_seeds(range(5), (3, 16, 16), 3)
    assert torch.equal(noise, e_noise) and torch.equal(labels, e_labels)
    assert "NOT FID" in res["protocol"]["features"] and res["torch"] == torch.__version__
    assert all(r["label"] is None for r in rows)  # random test features are never set beside a paper's FID


def test_full_metric_set_and_the_statistic_over_seed_ranges(tmp_path, npz_data, two_ckpts):
    extra = [
        "--metrics",
        "fid,kid,straightness,curvature",
        "--ode-num",
        "4",
        "--ode-steps",
        "8",
        "--fid-seeds",
        "2",
    ]
    res, _ = run_eval(tmp_path, npz_data, [two_ckpts[2]], extra)
    rows = res["results"]
    assert [r.get("nfe_requested") for r in rows] == [1, 3, None]
    assert len(rows[0]["fid_all"]) == 2 and rows[0]["fid"] == min(rows[0]["fid_all"])  # EDM: the minimum
    assert rows[2]["straightness"] > 0 and 0 <= rows[2]["curvature"] <= 2 and rows[2]["nfe"] == 15
    res, _ = run_eval(tmp_path, npz_data, [two_ckpts[2]], [*extra, "--fid-stat", "mean"], name="mean.json")
    row = res["results"][0]  # LMM: the mean +- std over its runs
    assert row["fid"] == pytest.approx(np.mean(row["fid_all"])) and row["fid_std"] == pytest.approx(
        np.std(row["fid_all"])
    )
    assert row["fid_all"] == rows[0]["fid_all"]


def test_two_processes_give_the_same_metrics(tmp_path, npz_data, two_ckpts):
    res1, args = run_eval(
        tmp_path, npz_data, [two_ckpts[2]], ["--metrics", "fid,kid,curvature", "--ode-num", "4"]
    )
    out2 = str(tmp_path / "res2.json")
    args[args.index("--out") + 1] = out2
    r = run_script([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                    "evaluate.py", *args])  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    with open(out2) as f:
        res2 = json.load(f)
    assert res2["world_size"] == 2
    for a, b in zip(res1["results"], res2["results"], strict=True):
        for key in ("fid", "kid", "curvature", "nfe"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-9), key


def test_bad_input_gives_one_line_errors(tmp_path, npz_data, two_ckpts):
    ck = torch.load(two_ckpts[0], weights_only=True)
    torch.save(dict(ck, method="no_such_method"), tmp_path / "unknown.pt")
    torch.save(dict(ck, version=99), tmp_path / "newer.pt")
    cases = [
        ([str(tmp_path / "unknown.pt")], [], "unknown method"),
        ([str(tmp_path / "newer.pt")], [], "version 99"),
        ([two_ckpts[2]], ["--nfe", "40"], "1..18"),
        ([str(tmp_path / "edm-cifar10-32x32-cond-vp.pkl")], [], "first with python tools/convert_edm.py"),
        (["https://x.org/edm-cifar10-32x32-cond-vp.pkl"], [], "convert_edm.py https://x.org/edm-cifar10"),
    ]
    for ckpts, extra, match in cases:
        with pytest.raises(SystemExit, match=match) as e:
            run_eval(tmp_path, npz_data, ckpts, extra)
        assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="no published statistics"):
        V.main(["--ckpt", two_ckpts[0], "--num-images", "4", "--batch", "2", "--test-features", "random-cnn"])
    with pytest.raises(SystemExit) as e:
        V.parse_args(["--ckpt", "x.pt", "--num", "10"])  # no abbreviations: torchrun takes --num
    assert e.value.code == 2


def test_checks_come_before_any_sampling_and_rows_done_are_kept(tmp_path, npz_data, two_ckpts, monkeypatch):
    calls, real = [], V.run_sampler
    monkeypatch.setattr(V, "run_sampler", lambda *a, **k: calls.append(1) or real(*a, **k))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))  # Inception's width, not 64
    big = tmp_path / "big.npz"
    np.savez(big, images=np.zeros((8, 32, 32, 3), np.uint8))
    flow, _ = flow_ckpt(tmp_path)
    cases = [
        (
            [two_ckpts[0], str(tmp_path / "none.pt")],
            [],
            "not found",
        ),  # the second checkpoint, before the first runs
        ([two_ckpts[0]], ["--ref-stats", str(tmp_path / "stats.npz")], "not statistics of 64 features"),
        ([two_ckpts[0]], ["--ref-data", str(big)], "makes 16 px images; the reference"),
        ([two_ckpts[0]], ["--metrics", "kid", "--ref-stats", str(tmp_path / "s64.npz")], "has no 'feats'"),
        ([flow], ["--sampler-kw", "solver=midpoint"], "must be even"),  # --nfe 1,3
        ([two_ckpts[0]], ["--sampler-kw", "solver=midpoint"], "must be even"),
        ([flow], ["--sampler-kw", "atol=1e-5,nope=1"], "takes no ['nope']"),
    ]
    np.savez(tmp_path / "s64.npz", mu=np.zeros(64), sigma=np.eye(64))
    for ckpts, extra, match in cases:
        with pytest.raises(SystemExit, match=re.escape(match)):
            run_eval(tmp_path, npz_data, ckpts, extra, name="x.json")
    assert calls == []
    with pytest.raises(SystemExit, match="makes 16 px images; the reference cifar10 is 32 px"):
        V.main(
            ["--protocol", "lmm", "--ckpt", two_ckpts[0], "--out", str(tmp_path / "p.json")]
        )  # not CIFAR-10
    (tmp_path / "file").write_text("")  # an --out whose folder is a file: nobody can write there
    with pytest.raises(SystemExit, match="o.json.lock: Not a directory"):  # an OSError, one line
        V.main(
            ["--ckpt", two_ckpts[0], "--metrics", "straightness", "--out", str(tmp_path / "file" / "o.json")]
        )
    with pytest.raises(SystemExit, match="torcheval's FID is computed from the reference images"):
        V.main(
            ["--ckpt", two_ckpts[0], "--test-features", "random-inception", "--out", str(tmp_path / "t.json")]
        )
    with pytest.raises(SystemExit, match="trained on shapes, the reference is cifar10"):
        ck = torch.load(two_ckpts[0], weights_only=True)
        torch.save(dict(ck, args=dict(data="shapes")), tmp_path / "shapes.pt")
        V.main(
            ["--ckpt", str(tmp_path / "shapes.pt"), "--dataset-res", "16", "--out", str(tmp_path / "q.json")]
        )
    assert calls == []
    ck = torch.load(
        two_ckpts[0], weights_only=True
    )  # a checkpoint that fails while sampling, after a good one
    torch.save(dict(ck, ema={k: v * float("nan") for k, v in ck["ema"].items()}), tmp_path / "nan.pt")
    with pytest.raises(SystemExit, match="non-finite"):
        run_eval(tmp_path, npz_data, [two_ckpts[0], str(tmp_path / "nan.pt")], name="kept.json")
    with open(tmp_path / "kept.json") as f:
        assert [r["nfe_requested"] for r in json.load(f)["results"]] == [1, 3]  # the first one's rows


def test_a_forked_method_file_runs_only_when_named(tmp_path, npz_data, two_ckpts):
    fork = tmp_path / "my_edm.py"
    fork.write_text("import edm_teacher\nfrom edm_teacher import *  # noqa: F403\n\nMETHOD = 'my_edm'\n\n\n"
                    "def sample(net, noise, nfe, labels=None, **kw):\n"
                    "    return edm_teacher.sample(net, -noise, nfe, labels, **kw)\n")  # fmt: skip
    ck = torch.load(two_ckpts[0], weights_only=True)
    torch.save(dict(ck, method="my_edm"), tmp_path / "fork.pt")
    with pytest.raises(SystemExit, match="unknown method 'my_edm'.*--method"):
        run_eval(tmp_path, npz_data, [str(tmp_path / "fork.pt")])
    forked, _ = run_eval(
        tmp_path, npz_data, [str(tmp_path / "fork.pt")], ["--method", str(fork)], name="f.json"
    )
    plain, _ = run_eval(tmp_path, npz_data, [two_ckpts[0]], name="p.json")
    assert (
        forked["results"][0]["method"] == "my_edm"
        and forked["results"][0]["fid"] != plain["results"][0]["fid"]
    )


def test_offline_inception_errors_name_the_file_and_where_it_goes(monkeypatch):
    import torchvision
    from cleanfid import features

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(features, "build_feature_extractor", offline)
    with pytest.raises(SystemExit, match="inception-2015-12-05.pt") as e:
        V.build_extractor("clean-fid", "cpu")
    assert "/tmp" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(torchvision.models, "inception_v3", offline)
    with pytest.raises(SystemExit, match="inception_v3_google-0cc3c7bd.pth") as e:
        V.build_extractor("torcheval", "cpu")
    assert os.path.join(torch.hub.get_dir(), "checkpoints") in str(e.value) and "\n" not in str(e.value)


def test_loom_fid_is_torchevals_arithmetic_on_torchvisions_inception(monkeypatch):
    import torchvision
    from torcheval.metrics import FrechetInceptionDistance
    from torcheval.metrics.image import fid as torcheval_fid

    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)  # as ToTensor gives them: u / 255
    fake = torch.from_numpy(rng.uniform(-1.2, 1.2, (6, 3, 16, 16)).astype(np.float32))  # clamped to [0, 1]
    extract = V.build_extractor("random-inception", "cpu")
    ours = V.torcheval_fid(extract(real)[0], extract(fake)[0])
    # torcheval's own network with the same random weights: its constructor, its resize, its sums
    ours_net, real_v3 = V.torchvision_inception(random=True)[1], torchvision.models.inception_v3

    def quick(weights):  # torchvision's slow default init skipped: the weights are loaded below
        return real_v3(weights=weights, aux_logits=True, init_weights=False)

    monkeypatch.setattr(torcheval_fid.models, "inception_v3", quick)
    theirs = torcheval_fid.FIDInceptionV3(weights=None)
    theirs.model.load_state_dict(ours_net.state_dict())
    theirs.model.transform_input = True  # as torchvision sets it for its ImageNet weights
    metric = FrechetInceptionDistance(model=theirs)
    metric.update(torch.from_numpy(real).permute(0, 3, 1, 2).float() / 255, is_real=True)
    metric.update(((fake + 1) / 2).clamp(0, 1), is_real=False)
    assert ours == pytest.approx(float(metric.compute()), rel=1e-6) and ours > 0


def test_kid_reference_features_are_computed_from_the_dataset_without_a_clean_fid_file(tmp_path, monkeypatch):
    import torchvision
    from cleanfid import fid

    train = np.random.default_rng(3).integers(0, 256, (20, 16, 16, 3), dtype=np.uint8)
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", lambda root, **kw: types.SimpleNamespace(data=train))
    monkeypatch.setattr(fid, "get_reference_statistics", lambda *a, **k: (np.ones(64), np.eye(64)))
    args = V.parse_args(
        ["--ckpt", "x.pt", "--dataset-res", "16", "--batch", "8", "--data-dir", str(tmp_path)]
    )
    assert args.metrics == ["fid", "kid"] and not os.path.exists(V.clean_fid_file(args, kid=True))
    extract = V.build_extractor("random-cnn", "cpu")
    mu, sigma, feats, what = V.reference(args, None, extract, 0, 1)
    assert np.array_equal(mu, np.ones(64)) and np.array_equal(feats, extract(train)[0])  # FID: clean-fid's
    assert "KID features computed here from its 20 images" in what


def test_paper_figures_follow_the_conditioning_and_never_meet_random_features(
    two_ckpts, tmp_path, monkeypatch
):
    ck = torch.load(two_ckpts[0], weights_only=True)
    assert V.paper_label(ck) == "EDM cond" and V.PAPER_FID["EDM cond"] == [("heun", 35, 1.79)]
    assert V.paper_label(dict(ck, net_kwargs=dict(ck["net_kwargs"], label_dim=0))) == "EDM"
    assert V.paper_label(dict(ck, method="lmm")) == "LMM cond" and ("lmm", 1, 1.57) in V.PAPER_FID["LMM cond"]
    import matplotlib.figure

    seen = []
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", lambda fig, *a, **k: seen.append(fig.axes[0]))
    rows = [dict(ckpt="a", method="edm_teacher", label="EDM cond", nfe=35, fid=2.0)]
    V.write_figures(rows, str(tmp_path / "r.png"))
    V.write_figures(rows, str(tmp_path / "r.png"), random_features=True)
    assert (
        seen[0].get_ylabel() == "FID" and len(seen[0].lines) == 3
    )  # our line, the paper's cross, the legend key
    assert "NOT FID" in seen[1].get_ylabel() and len(seen[1].lines) == 1


def test_one_channel_images_are_scored():
    extract = V.build_extractor("random-cnn", "cpu")
    gray = np.random.default_rng(0).integers(0, 256, (3, 16, 16, 1), dtype=np.uint8)
    assert np.array_equal(extract(gray)[0], extract(np.repeat(gray, 3, axis=3))[0])


def test_ode_velocity_of_edm_and_lmm_agree_on_the_common_clock():
    net = lambda x, sigma, class_labels=None: 0.5 * x  # noqa: E731
    x = torch.randn(2, 1, 4, 4)
    for t in (0.0, 0.5):
        torch.testing.assert_close(E.ode_velocity(net, x, t), L.ode_velocity(net, x, t))
    torch.testing.assert_close(E.ode_start(None, x), 80 * x)


def test_inception_score_equals_a_hand_computation_from_fixed_logits():
    logits = np.array([[2.0, 0.0, -1.0], [0.0, 1.0, 0.5], [3.0, 3.0, 0.0], [-2.0, 0.0, 4.0]])
    p = [[math.exp(v) / sum(math.exp(u) for u in row) for v in row] for row in logits]
    scores = []
    for part in (p[:2], p[2:]):  # 2 splits of 2 images
        marginal = [sum(q[c] for q in part) / len(part) for c in range(3)]
        kl = [sum(q[c] * math.log(q[c] / marginal[c]) for c in range(3)) for q in part]
        scores.append(math.exp(sum(kl) / len(kl)))
    mean, std = V.inception_score(logits, splits=2)
    assert mean == pytest.approx(sum(scores) / 2, rel=1e-12)
    assert std == pytest.approx(abs(scores[0] - scores[1]) / 2, rel=1e-12)
    sharp = np.tile(np.eye(10) * 60.0, (5, 1))  # confident and spread evenly over 10 classes: IS -> 10
    assert V.inception_score(sharp, splits=1)[0] == pytest.approx(10.0, rel=1e-6)
    one_hot = np.where(np.eye(10)[np.arange(20) % 10] > 0, 0.0, -np.inf)  # exact zeros: 0 log 0 = 0
    assert V.inception_score(one_hot, splits=1)[0] == pytest.approx(10.0)


def test_protocols_set_their_papers_defaults_and_flags_override():
    edm = V.parse_args(["--protocol", "edm", "--ckpt", "x.pt"])
    assert (edm.features, edm.dataset, edm.dataset_split, edm.num_images, edm.fid_seeds, edm.fid_stat,
            edm.metrics) == ("clean-fid", "cifar10", "train", 50000, 3, "min", ["fid"])  # fmt: skip
    lmm = V.parse_args(["--protocol", "lmm", "--ckpt", "x.pt"])
    assert lmm.metrics == ["fid", "is"] and lmm.fid_stat == "mean" and lmm.fid_seeds == 3
    loom = V.parse_args(["--protocol", "loom", "--ckpt", "x.pt", "--fid-seeds", "2"])
    assert (loom.features, loom.ref_data, loom.ref_split, loom.ref_num, loom.num_images) == (
        "torcheval", "cifar10", "test", 10000, 50000,
    )  # fmt: skip
    assert loom.fid_seeds == 2 and loom.ode_grid == "uniform"  # a flag given wins over the protocol
    with pytest.raises(SystemExit):
        V.parse_args(["--protocol", "loom", "--ckpt", "x.pt", "--help"])


def flow_ckpt(tmp_path):
    import cfm_couplings as C

    torch.manual_seed(0)
    kw = dict(img_resolution=16, img_channels=3, label_dim=0, time_scale=1.0, dropout=0.0, **TINY_NET)
    net = C.build_net(kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = net.state_dict()
    args = dict(coupling="ot", preset=None)
    ckpt = dict(method="cfm_couplings", version=1, args=args, net_kwargs=kw, net=sd, ema=sd, opt=None, step=0,
                kimg=0.0, state={})  # fmt: skip
    torch.save(ckpt, tmp_path / "otcfm.pt")
    return str(tmp_path / "otcfm.pt"), net.eval()


def test_loom_protocol_reads_the_cifar10_test_split_drawn_as_the_official_evaluator(tmp_path, monkeypatch):
    import torchvision

    import cfm_couplings as C

    splits = []

    class FakeCIFAR10:  # stands in for torchvision's download: 50 "train" and 30 "test" images
        def __init__(self, root, train=True, download=False, **kw):
            splits.append(train)
            rng = np.random.default_rng(1 if train else 2)
            self.data = rng.integers(0, 256, (50 if train else 30, 16, 16, 3), dtype=np.uint8)
            self.targets = [0] * len(self.data)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    path, net = flow_ckpt(tmp_path)
    out = str(tmp_path / "loom.json")
    V.main(["--protocol", "loom", "--ckpt", path, "--nfe", "2,4", "--num-images", "12", "--batch", "6", "--ref-num",
            "40", "--test-features", "random-cnn", "--sampler-kw", "solver=midpoint", "--metrics", "fid,curvature",
            "--ode-num", "4", "--ode-steps", "6", "--out", out])  # fmt: skip
    assert (
        splits == [False] and V.paper_label(torch.load(path, weights_only=True)) == "OT-CFM"
    )  # test split only
    with open(out) as f:
        res = json.load(f)
    assert (
        "test (30 images), 40 drawn with replacement by RandomSampler(seed 42)"
        in res["protocol"]["reference"]
    )
    g = torch.Generator().manual_seed(42)  # the official evaluator's draw
    idx = torch.tensor(list(torch.utils.data.RandomSampler(range(30), True, 40, generator=g)))
    assert len(set(idx.tolist())) < 40 and idx.max() < 30  # with replacement: repeats
    test_images = FakeCIFAR10(None, train=False).data
    extract = V.build_extractor("random-cnn", "cpu")
    ref = extract(test_images[idx.numpy()])[0]
    noise, _, _ = V.inputs_for_seeds(range(12), (3, 16, 16), 0)
    fake = extract(C.sample(net, noise, 2, solver="midpoint")[0])[0]
    expect = V.frechet_distance(
        fake.mean(0), np.cov(fake, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False)
    )
    rows = res["results"]
    assert rows[0]["fid"] == pytest.approx(expect, rel=1e-6) and rows[0]["label"] is None  # random features
    assert (rows[0]["nfe"], rows[0]["nfe_reported"], rows[0]["solver_steps"]) == (2, 2, 1)
    curv = rows[2]["curvature_t"]  # LOOM Fig. 6: curvature at every t of the uniform grid
    assert [round(t, 6) for t, _ in curv] == [round(k / 6, 6) for k in range(1, 6)] and rows[2][
        "ode_num"
    ] == 4
    assert rows[2]["curvature"] == pytest.approx(np.mean([c for _, c in curv]), rel=1e-6)
    from PIL import Image

    assert res["figures"] == [str(tmp_path / "loom-fid_vs_nfe.png")]
    assert all(Image.open(p).size[0] > 300 for p in res["figures"])


@pytest.mark.parametrize("method", ["cfm_couplings", "loom_cfm"])  # dansm samples by Euler / DDIM only
def test_every_flow_files_dopri5_is_torchdiffeqs_and_reports_both_nfe_figures(method, monkeypatch):
    import importlib

    import torchdiffeq

    module = importlib.import_module(method)
    used = []
    real = torchdiffeq.odeint
    for owner in (
        (torchdiffeq, module) if hasattr(module, "odeint") else (torchdiffeq,)
    ):  # imported early or late
        monkeypatch.setattr(owner, "odeint", lambda *a, **k: used.append(k["method"]) or real(*a, **k))

    def field(x, t, class_labels=None):  # dx/dt = x on the common clock: x(1) = e x(0)
        return x

    class Field(torch.nn.Module):
        def forward(self, x, t, class_labels=None):
            return field(x, t)

    x0 = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    stats = {}
    x, reported, calls = V.run_sampler(module, Field(), x0, 1, None, None, {"solver": "dopri5", "atol": 1e-9,
                                       "rtol": 1e-9}, stats)  # fmt: skip
    assert used == ["dopri5"] and torch.allclose(x, x0 * math.e, rtol=1e-7)
    assert calls == reported == stats["nfe_torchdiffeq"] == 2 + 6 * stats["solver_steps"]


def test_outputs_are_never_overwritten_and_a_second_job_stops_at_once(tmp_path, npz_data, two_ckpts):
    import fcntl

    (tmp_path / "r-fid_vs_nfe.png").write_bytes(b"an earlier figure")  # the figure, not only the JSON
    with pytest.raises(SystemExit, match="r-fid_vs_nfe.png exists; pass --overwrite"):
        run_eval(tmp_path, npz_data, [two_ckpts[0]], name="r.json")
    assert (tmp_path / "r-fid_vs_nfe.png").read_bytes() == b"an earlier figure"
    fd = os.open(tmp_path / "q.json.lock", os.O_RDWR | os.O_CREAT)  # a running job on q.json
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"pid 4242 on node7")
    with pytest.raises(SystemExit, match=r"q.json is locked by a running job \(pid 4242 on node7\)"):
        run_eval(tmp_path, npz_data, [two_ckpts[0]], name="q.json")
    os.close(fd)
    (tmp_path / "q.json.tmp_backup").write_text("a user's file")
    res, _ = run_eval(tmp_path, npz_data, [two_ckpts[0]], ["--nfe", "1"], name="q.json")  # the holder ended
    assert (
        res["figures"] == [str(tmp_path / "q-fid_vs_nfe.png")] and (tmp_path / "q.json.tmp_backup").exists()
    )


def test_wrong_checkpoints_sampler_values_and_os_errors_are_one_line(
    tmp_path, npz_data, two_ckpts, monkeypatch
):
    from test_gen_pairs import wrong_checkpoints

    for path, words in wrong_checkpoints(two_ckpts[0], tmp_path).items():
        with pytest.raises(SystemExit, match=re.escape(words)) as e:
            run_eval(tmp_path, npz_data, [path], name="w.json")
        assert "\n" not in str(e.value) and path in str(e.value)
    flow, _ = flow_ckpt(tmp_path)
    for kw in (
        "solver=dopri5,atol=0",
        "solver=rk99",
        "solver=dopri5,atol=abc",
        "solver=dopri5,atol=1e-300,rtol=1e-300",
    ):
        with pytest.raises(SystemExit, match="cannot sample with NFE 1 and --sampler-kw") as e:
            run_eval(tmp_path, npz_data, [flow], ["--sampler-kw", kw], name="s.json")
        assert "\n" not in str(e.value)
    for flag, value in (("--seed", "-1"), ("--batch", str(2**20 + 1)), ("--nfe", "1,0"), ("--nfe", "nan"),
                        ("--ref-num", "-1"), ("--ode-steps", "inf")):  # fmt: skip
        with pytest.raises(SystemExit) as e:
            V.parse_args(["--ckpt", "x.pt", flag, value])
        assert e.value.code == 2, (flag, value)
    with pytest.raises(SystemExit, match="the name is too long"):  # its figure's name: before any work
        run_eval(tmp_path, npz_data, [two_ckpts[0]], name="r" * 245 + ".json")
    monkeypatch.setattr(
        json, "dump", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left on device"))
    )
    with pytest.raises(SystemExit, match=r"full.json: No space left on device$"):  # a full disk
        run_eval(tmp_path, npz_data, [two_ckpts[0]], name="full.json")
    monkeypatch.setattr(V, "check_before_work", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(SystemExit) as e:  # Ctrl-C: exit 130, no traceback
        run_eval(tmp_path, npz_data, [two_ckpts[0]], name="c.json")
    assert e.value.code == 130

"""evaluate.py: Frechet distance and KID against closed forms, identical noise for every checkpoint, exact NFE
counts, straightness and curvature of known flows, 1 vs 2 processes, bad input."""

import json
import math
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


def test_edm_family_without_ode_start_is_refused():
    module = types.SimpleNamespace(METHOD="lmm", ode_velocity=lambda net, x, t, labels=None: x)
    with pytest.raises(ValueError, match="ode_start"):
        V.ode_metrics(module, None, torch.zeros(1, 1, 2, 2))


def test_straight_flow_has_zero_straightness_and_curvature():
    d = torch.randn(3, 1, 2, 2)
    m, x1 = V.ode_metrics(flow_module(lambda x, t: d.expand_as(x)), None, torch.zeros(3, 1, 2, 2))
    torch.testing.assert_close(x1, d)
    assert m["straightness"].abs().max() < 1e-5 and m["curvature"].abs().max() < 1e-6


def test_circular_flow_has_the_analytic_curvature():
    omega, n = math.pi / 2, 50  # a quarter turn in t in [0, 1], uniform steps h = 1/n

    def rotate(x, t):  # d/dt (a, b) = omega (-b, a) on pixel pairs
        a, b = x[:, :, 0], x[:, :, 1]
        return torch.stack([-omega * b, omega * a], dim=2)

    x0 = torch.randn(4, 1, 2, 3, dtype=torch.float64)
    grid = V.ode_grid(n, "uniform")
    m, x1 = V.ode_metrics(flow_module(rotate), None, x0, grid=grid)
    # Heun's step is M = I + hA + (hA)^2/2, a scaled rotation by atan2(wh, 1 - (wh)^2/2): chord k is
    # M^k (M - I) x0, so consecutive chords turn by that angle; the last (Euler) chord is hA M^(n-1) x0, which
    # turns by that angle minus atan(wh/2), the extra turn of M - I = hA (I + hA/2) over hA.
    wh = omega / n
    heun = math.atan2(wh, 1 - wh**2 / 2)
    expect = ((n - 2) * (1 - math.cos(heun)) + (1 - math.cos(heun - math.atan(wh / 2)))) / (n - 1)
    torch.testing.assert_close(
        m["curvature"].double(), torch.full((4,), expect, dtype=torch.float64), rtol=1e-3, atol=0
    )
    assert abs(expect / (1 - math.cos(wh)) - 1) < 0.03  # the continuous flow's 1 - cos(omega h), but one step
    # straightness of a quarter circle of radius r: integral ||v - (x1 - x0)|| with |v| = omega r
    r = x0.flatten(1).norm(dim=1)
    ts = torch.linspace(0, 1, 20001, dtype=torch.float64)[:-1] + 0.5 / 20000
    v = torch.stack([-torch.sin(omega * ts), torch.cos(omega * ts)], 1) * omega  # unit-radius, from (1, 0)
    integral = (v - torch.tensor([0.0 - 1.0, 1.0 - 0.0], dtype=torch.float64)).norm(dim=1).mean()
    torch.testing.assert_close(m["straightness"].double(), r * integral, rtol=3e-3, atol=0)


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


def test_nfe_counts_are_exact_for_heun_and_lmm(two_ckpts):
    for spec, nfe, expect in [(two_ckpts[0], 35, 35), (two_ckpts[0], 4, 3), (two_ckpts[2], 3, 3)]:
        module, net, _ = V.load_model(spec, None, "cpu")
        noise, labels, gens = V.inputs_for_seeds(range(2), (3, 16, 16), 3)
        _, used, calls = V.run_sampler(module, V.CountingNet(net), noise, nfe, labels, gens)
        assert calls == used == expect, (spec, nfe)


def run_eval(tmp_path, npz_data, ckpts, extra=(), name="res.json"):
    out = str(tmp_path / name)
    args = [
        "--ckpt", *ckpts, "--nfe", "1,3", "--num-images", "12", "--batch", "5", "--ref-data", npz_data,
        "--feature-extractor", "random-cnn", "--out", out, *extra,
    ]  # fmt: skip
    V.main(args)
    with open(out) as f:
        return json.load(f), args


def test_every_checkpoint_gets_the_same_noise(tmp_path, npz_data, two_ckpts, one_thread):
    res, _ = run_eval(tmp_path, npz_data, two_ckpts[:2], ["--grid", str(tmp_path / "g.png")])
    rows = res["results"]
    assert [(r["ckpt"], r["nfe_requested"], r["nfe"]) for r in rows] == [
        (two_ckpts[0], 1, 1),
        (two_ckpts[0], 3, 3),
        (two_ckpts[1], 1, 1),
        (two_ckpts[1], 3, 3),
    ]
    assert rows[0]["fid"] == rows[2]["fid"] and rows[1]["kid"] == rows[3]["kid"]  # identical images
    assert rows[0]["fid"] != rows[1]["fid"]
    from PIL import Image

    ga, gb = (np.asarray(Image.open(tmp_path / f"g-{n}-nfe3.png")) for n in ("a", "b"))
    assert np.array_equal(ga, gb) and ga.std() > 0
    # the noise is generated per seed, as edm_teacher --generate does: image 0 equals its image 0
    E.main(["--generate", "1", "--ckpt", two_ckpts[0], "--out", str(tmp_path / "s.npz"), "--nfe", "3"])
    first = np.load(tmp_path / "s.npz")["images"][0].astype(int)
    assert np.abs(first - ga[:16, :16]).max() <= 1  # uint8 rounding of ulp-level batch differences
    assert "NOT FID" in res["protocol"]["features"] and res["versions"]["torch"] == torch.__version__


def test_full_metric_set_grids_and_trajectories(tmp_path, npz_data, two_ckpts):
    extra = ["--metrics", "fid,kid,straightness,curvature", "--ode-num", "4", "--ode-steps", "8"]
    extra += ["--trajectory", str(tmp_path / "t.png"), "--fid-seeds", "2"]
    res, _ = run_eval(tmp_path, npz_data, [two_ckpts[2]], extra)
    rows = res["results"]
    assert [r.get("nfe_requested") for r in rows] == [1, 3, None]
    assert len(rows[0]["fid_all"]) == 2 and rows[0]["fid"] == min(rows[0]["fid_all"])
    assert rows[2]["straightness"] > 0 and 0 <= rows[2]["curvature"] <= 2 and rows[2]["nfe"] == 15
    from PIL import Image

    strip = np.asarray(Image.open(tmp_path / "t-lmm-nfe3.png"))
    assert strip.shape == (8 * 16, 4 * 16, 3)  # 8 images x (3 calls + the sample)


def test_pairs_file_is_scored_as_a_sample_set(tmp_path, npz_data, teacher_ckpt):
    import gen_pairs

    gen_pairs.main(
        [
            "--teacher",
            teacher_ckpt,
            "--num-pairs",
            "12",
            "--out",
            str(tmp_path / "p.npz"),
            "--cond",
            "--nfe",
            "3",
        ]
    )
    out = str(tmp_path / "r.json")
    V.main(["--pairs", str(tmp_path / "p.npz"), "--num", "12", "--batch", "6", "--ref-data", npz_data,
            "--feature-extractor", "random-cnn", "--out", out])  # fmt: skip
    with open(out) as f:
        row = json.load(f)["results"][0]
    assert row["method"] == "pairs" and row["nfe"] == 3 and row["num"] == 12 and row["fid"] > 0


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
    with pytest.raises(SystemExit):
        V.parse_args(["--ckpt", "x.pt", "--num", "10", "--batch", "20"])
    with pytest.raises(SystemExit, match="random-cnn"):
        V.main(["--ckpt", two_ckpts[0], "--num", "4", "--batch", "2", "--feature-extractor", "random-cnn"])


def test_offline_inception_error_names_the_file(monkeypatch):
    from cleanfid import features

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(features, "build_feature_extractor", offline)
    with pytest.raises(SystemExit, match="inception-2015-12-05.pt") as e:
        V.build_extractor("inception", "legacy_tensorflow", "cpu")
    assert "/tmp" in str(e.value) and "\n" not in str(e.value)


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
    assert (edm.fid_mode, edm.dataset_split, edm.num, edm.fid_seeds, edm.metrics) == (
        "legacy_tensorflow", "train", 50000, 3, ["fid"],
    )  # fmt: skip
    assert V.parse_args(["--protocol", "lmm", "--ckpt", "x.pt"]).metrics == ["fid", "is"]
    loom = V.parse_args(["--protocol", "loom", "--ckpt", "x.pt", "--fid-seeds", "2"])
    assert (loom.ref_data, loom.ref_split, loom.ref_num, loom.ref_seed, loom.num) == (
        "cifar10",
        "test",
        10000,
        42,
        50000,
    )
    assert loom.fid_seeds == 2 and loom.ode_grid == "uniform"  # a flag given wins over the protocol


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
    V.main(["--protocol", "loom", "--ckpt", path, "--nfe", "2,4", "--num", "12", "--batch", "6", "--ref-num", "40",
            "--feature-extractor", "random-cnn", "--sampler-kw", "solver=midpoint", "--metrics", "fid,curvature",
            "--ode-num", "4", "--ode-steps", "6", "--out", out])  # fmt: skip
    assert splits == [False]  # the test split, nothing else
    with open(out) as f:
        res = json.load(f)
    assert (
        "test (30 images, 40 drawn with replacement by RandomSampler(seed 42)" in res["protocol"]["reference"]
    )
    idx = V.loom_reference_indices(30, 40, 42)
    assert len(set(idx.tolist())) < 40 and idx.max() < 30  # with replacement: repeats
    test_images = FakeCIFAR10(None, train=False).data
    extract = V.build_extractor("random-cnn", "legacy_tensorflow", "cpu")
    ref = extract(test_images[idx.numpy()])[0]
    noise, _, _ = V.inputs_for_seeds(range(12), (3, 16, 16), 0)
    fake = extract(V.quantize(C.sample(net, noise, 2, solver="midpoint")[0]))[0]
    expect = V.frechet_distance(
        fake.mean(0), np.cov(fake, rowvar=False), ref.mean(0), np.cov(ref, rowvar=False)
    )
    rows = res["results"]
    assert rows[0]["fid"] == pytest.approx(expect, rel=1e-6) and rows[0]["label"] == "OT-CFM"
    assert (rows[0]["nfe"], rows[0]["nfe_reported"], rows[0]["solver_steps"]) == (2, 2, 1)
    curv = rows[2]["curvature_t"]  # LOOM Fig. 6: curvature at every t of the uniform grid
    assert [round(t, 6) for t, _ in curv] == [round(k / 6, 6) for k in range(1, 6)] and rows[2][
        "ode_num"
    ] == 4
    assert rows[2]["curvature"] == pytest.approx(np.mean([c for _, c in curv]), rel=1e-6)
    from PIL import Image

    assert res["figures"] == [str(tmp_path / "loom-fid_vs_nfe.png"), str(tmp_path / "loom-curvature.png")]
    assert all(Image.open(p).size[0] > 300 for p in res["figures"])


@pytest.mark.parametrize("method", ["cfm_couplings", "loom_cfm", "dansm"])
def test_every_flow_files_dopri5_is_torchdiffeqs_and_reports_both_nfe_figures(method, monkeypatch):
    import importlib

    import torchdiffeq

    module = importlib.import_module(method)
    used = []
    real = torchdiffeq.odeint
    monkeypatch.setattr(torchdiffeq, "odeint", lambda *a, **k: used.append(k["method"]) or real(*a, **k))
    sign = -1.0 if method == "dansm" else 1.0  # dansm integrates its own clock from t = 1 down to 0

    def field(x, t, class_labels=None):  # dx/dt = x on the common clock: x(1) = e x(0)
        return sign * x

    counter = V.CountingNet(field)
    x0 = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    stats = {}
    x, reported, calls = V.run_sampler(module, counter, x0, 1, None, None, {"solver": "dopri5", "atol": 1e-9,
                                       "rtol": 1e-9}, stats)  # fmt: skip
    assert used == ["dopri5"] and torch.allclose(x, x0 * math.e, rtol=1e-7)
    assert calls == reported == stats["nfe_torchdiffeq"] == 2 + 6 * stats["solver_steps"]

"""lmm.py: Eq. 3 on exact line denoisers, the sampler of App. A.4, SOT, the adaptive weight, DiffAugment, the
discriminators, Table 7's training configurations, resume, torchrun and bad input."""

import json
import os
import sys
import urllib.error

import numpy as np
import pytest
import torch

import edm_teacher as E
import lmm as L
from conftest import TINY_FLAGS, run_script

SIGMAS = L.lmm_schedule(18)


class LineDenoiser(torch.nn.Module):
    """The exact LMM for pairs x1 = a * x0 (a > 0 per pixel): the line through x = (a + sigma) x0 ends at
    a x0 = a / (a + sigma) * x. Counts its calls and records the sigmas it is asked at."""

    def __init__(self, a):
        super().__init__()
        self.a, self.calls = a, []

    def forward(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
        self.calls.append(float(sigma.flatten()[0]))
        return self.a / (self.a + sigma) * x


def line_pairs(n=6, shape=(3, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g) + 0.5
    x0 = torch.randn(n, *shape, generator=g)
    return a, x0, a * x0


def test_exact_line_denoiser_has_zero_loss_and_others_do_not():
    a, x0, x1 = line_pairs()
    sigma = L.draw_sigma(len(x0))
    d, x1_hat = L.lmm_loss(LineDenoiser(a), x0, x1, sigma)
    assert d.shape == (len(x0),) and d.max() < 1e-10
    torch.testing.assert_close(x1_hat, x1)
    d_id, _ = L.lmm_loss(lambda x, s, class_labels=None: x, x0, x1, sigma)  # identity: off by sigma * x0
    torch.testing.assert_close(d_id, (sigma.reshape(-1, 1, 1, 1) * x0).square().flatten(1).mean(1))


def test_one_step_from_the_line_start_reproduces_x1_exactly():
    a, x0, x1 = line_pairs()
    net = LineDenoiser(a)
    noise = x0 + x1 / 80.0  # sigma_max * noise = x1 + sigma_max * x0: the line's point at sigma_max
    x, nfe = L.sample(net, noise, 1)
    assert nfe == 1 and net.calls == [80.0]
    torch.testing.assert_close(x, x1, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("nfe,steps", [(1, (0,)), (2, (0, 1)), (3, (0, 3, 5)), (4, (0, 1, 3, 5)), (6, None)])
def test_nfe_selects_table7_step_indices(nfe, steps):
    target = torch.full((3, 1, 4, 4), 0.25)
    net = LineDenoiser(torch.ones(1, 4, 4))
    net.forward = lambda x, sigma, class_labels=None: (net.calls.append(float(sigma[0])), target)[1]
    x, used = L.sample(net, torch.randn(3, 1, 4, 4), nfe)
    expect = steps or tuple(int(round(v)) for v in np.linspace(0, 17, nfe))
    assert used == nfe == len(net.calls)
    assert net.calls == pytest.approx([float(SIGMAS[t]) for t in expect], rel=1e-6)
    assert torch.equal(x, target)  # a delta target: every step count returns it exactly


def test_sampler_renoises_to_the_next_chosen_level():
    seen = []

    def net(x, sigma, class_labels=None):
        seen.append(x.clone())
        return torch.zeros_like(x)

    noise = torch.randn(2, 1, 4, 4)
    L.sample(net, noise, 3, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(5)
    eta1, eta2 = torch.randn(2, 1, 4, 4, generator=g), torch.randn(2, 1, 4, 4, generator=g)
    torch.testing.assert_close(seen[0], noise * float(SIGMAS[0]))  # x^0 = sigma_max * noise
    torch.testing.assert_close(seen[1], float(SIGMAS[3]) * eta1)  # x_hat + sigma_{t'} eta, t' = 3
    torch.testing.assert_close(seen[2], float(SIGMAS[5]) * eta2)
    seen.clear()
    L.sample(net, noise, 2, cm_noise=True, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(seen[1], (float(SIGMAS[1]) ** 2 - 0.002**2) ** 0.5 * eta1)


def test_schedule_is_edms_and_bad_steps_are_refused():
    torch.testing.assert_close(L.lmm_schedule(18), E.karras_sigmas(18)[:-1], rtol=0, atol=0)
    torch.testing.assert_close(L.lmm_schedule(40)[[0, -1]], torch.tensor([80.0, 0.002], dtype=torch.float64))
    net = LineDenoiser(torch.ones(1))
    with pytest.raises(ValueError, match="0..17"):
        L.sample(net, torch.randn(1, 1, 2, 2), 2, steps=(0, 18))
    with pytest.raises(ValueError, match="1..18"):
        L.sample(net, torch.randn(1, 1, 2, 2), 19)
    _, used = L.sample(net, torch.randn(1, 1, 2, 2), 1, steps=(0, 30), sched_steps=40)
    assert used == 2


def test_ode_velocity_is_tangent_to_the_lines():
    a, x0, x1 = line_pairs()
    for t in (0.0, 0.3, 0.9):
        x = x1 + 80 * (1 - t) * x0  # sigma(t) = sigma_max (1 - t)
        torch.testing.assert_close(L.ode_velocity(LineDenoiser(a), x, t), -80 * x0, atol=1e-4, rtol=1e-4)


def test_sot_draws_only_the_listed_levels_and_the_default_law_covers_the_range():
    torch.manual_seed(0)
    s = L.draw_sigma(4000, sot=[0, 1])
    levels = SIGMAS[[0, 1]].float()
    assert set(s.unique().tolist()) == set(levels.tolist())
    assert abs((s == levels[0]).float().mean() - 0.5) < 0.05
    s = L.draw_sigma(
        20000
    ).double()  # rho law: u = (sigma^(1/7) - 80^(1/7)) / (0.002^(1/7) - 80^(1/7)) ~ U[0,1]
    u = (s ** (1 / 7) - 80 ** (1 / 7)) / (0.002 ** (1 / 7) - 80 ** (1 / 7))
    assert u.min() >= 0 and u.max() <= 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 12**-0.5) < 0.01
    s = L.draw_sigma(20000, dist="lognormal")
    assert abs(s.log().mean() + 1.2) < 0.03 and abs(s.log().std() - 1.2) < 0.03


def test_adaptive_weight_is_the_detached_clamped_gradient_norm_ratio():
    torch.manual_seed(0)
    body, last = torch.nn.Linear(4, 5), torch.nn.Linear(5, 3)
    x = torch.randn(8, 4)
    out = last(torch.tanh(body(x)))
    l_rec, l_g = out.square().mean(), -(out.sum(1) * 0.1).mean()
    g_rec = torch.autograd.grad(l_rec, last.weight, retain_graph=True)[0]
    g_adv = torch.autograd.grad(l_g, last.weight, retain_graph=True)[0]
    lam = L.adaptive_weight(l_rec, l_g, last.weight)
    assert not lam.requires_grad
    torch.testing.assert_close(lam, g_rec.norm() / (g_adv.norm() + 1e-4))
    assert 0.01 < lam < 1e4  # not at a clamp here
    assert L.adaptive_weight(l_rec * 100, l_g * 1e-9, last.weight) == 1e4  # eps-bounded ratio, clamped
    assert L.adaptive_weight(l_rec, l_g * 1e-9, last.weight, clamp=(0.01, 10.0)) == 10.0
    assert L.adaptive_weight(l_rec * 1e-9, l_g, last.weight, clamp=(0.01, 10.0)) == 0.01


def test_diff_augment_translation_moves_pixels_within_the_ratio():
    torch.manual_seed(0)
    x = torch.zeros(400, 1, 16, 16)
    x[:, :, 8, 8] = 1.0
    y = L.diff_augment(x, policy=("translation",), translation=0.125)  # up to 2 pixels
    assert y.shape == x.shape and torch.equal(y.sum((1, 2, 3)), torch.ones(400))
    pos = y[:, 0].flatten(1).argmax(1)
    dy, dx = pos // 16 - 8, pos % 16 - 8
    assert set(dy.tolist()) == set(range(-2, 3)) == set(dx.tolist())
    full = torch.ones(50, 1, 16, 16)
    moved = L.diff_augment(full, policy=("translation",))
    for img in moved[:, 0]:  # zero fill: the zeros are whole border rows / columns
        rows, cols = img.sum(1), img.sum(0)
        assert set(rows.tolist()) <= {0.0, float(cols.gt(0).sum())}


def test_diff_augment_cutout_zeroes_one_square():
    torch.manual_seed(0)
    x = torch.ones(300, 3, 20, 20)
    y = L.diff_augment(x, policy=("cutout",), cutout=0.2)  # a 4 x 4 hole, possibly cut by the border
    holes = y[:, 0] == 0
    assert torch.equal(holes.unsqueeze(1).expand_as(y), y == 0)  # the same hole in every channel
    counts = holes.flatten(1).sum(1)
    assert counts.max() == 16 and counts.min() >= 4
    for h in holes:
        r, c = h.any(1).nonzero().flatten(), h.any(0).nonzero().flatten()
        assert h.sum() == len(r) * len(c) and r.max() - r.min() + 1 == len(r)  # one solid rectangle


def test_diff_augment_color_is_differentiable_and_random_per_image():
    torch.manual_seed(0)
    x = torch.rand(4, 3, 8, 8, requires_grad=True)
    y = L.diff_augment(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    assert x.grad.abs().sum() > 0
    same = L.diff_augment(x.detach()[:1].expand(4, -1, -1, -1), policy=("color",))
    assert not torch.allclose(same[0], same[1])


def test_discriminators_shapes_conditioning_and_frozen_features():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16), torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    d = L.PatchDisc(3, label_dim=3)
    out = d(x, y)
    assert out.shape == (4, 4)  # 2 x 2 patches at 16 x 16
    assert not torch.allclose(out, d(x, y.roll(1, 1)))  # the projection term uses the label
    p = L.build_disc("projected", 3, 3, res=64, backbones=["efficientnet_b0"], pretrained=False)
    out = p(x, y)
    assert out.ndim == 2 and out.shape[0] == 4
    out.mean().backward()
    trainable = {id(t) for t in L.disc_params(p)}
    for name, t in p.named_parameters():
        frozen = name.startswith(("features.", "ccm.", "csm."))
        assert (id(t) in trainable) != frozen and t.requires_grad != frozen, name
        assert (t.grad is None) == frozen, name
    p.train()
    assert not p.features[0].training  # frozen BatchNorm statistics


def test_lpips_offline_error_names_the_vgg_file(monkeypatch):
    import lpips

    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(lpips, "LPIPS", offline)
    with pytest.raises(SystemExit, match="vgg16-397923af.pth") as e:
        L.make_lpips("cpu")
    assert "hub/checkpoints" in str(e.value) and "\n" not in str(e.value)


def test_lpips_is_frozen_and_resizes_both_images():
    torch.manual_seed(0)
    m = L.make_lpips("cpu", random_trunk=True)
    assert not m.training and not any(p.requires_grad for p in m.parameters())
    a = torch.rand(2, 3, 16, 16) * 2 - 1
    b = a.flip(0)
    d = L.lpips_distance(m, a, b, 32)
    up = torch.nn.functional.interpolate
    ref = m(up(a, size=(32, 32), mode="bilinear"), up(b, size=(32, 32), mode="bilinear")).flatten()
    torch.testing.assert_close(d, ref)
    assert d.shape == (2,) and (d > 0).all() and L.lpips_distance(m, a, a, 32).abs().max() < 1e-6


# --- training runs ---


def write_pairs(path, n=32, res=16, labels=True, seed=0):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((n, 3, res, res)).astype(np.float32)
    arrays = dict(noise=x0, data=np.tanh(0.5 * x0[:, :, ::-1]).astype(np.float16))
    if labels:
        arrays["label"] = (np.arange(n) % 3).astype(np.int64)
    np.savez(path, **arrays)
    return str(path)


def lmm_flags(tmp_path, name, steps, extra=(), pairs=None, data=None):
    return [
        "--pairs",
        pairs or write_pairs(tmp_path / "pairs.npz"),
        "--outdir",
        str(tmp_path / name),
        *TINY_FLAGS,
        "--batch",
        "8",
        "--duration",
        str(8 * steps / 1e6),
        "--log-every",
        "1",
        "--grid",
        "4",
        "--lpips-random-trunk",
        "--lpips-res",
        "32",
        "--lpips-res-pre",
        "16",
        "--disc",
        "patch",
        *(["--data", data] if data else []),
        *extra,
    ]


def read_log(outdir):
    with open(os.path.join(outdir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


TABLE7 = {
    "l2": ["--loss", "l2", "--adv-start", "off"],
    "vgg": ["--adv-start", "off"],
    "vgg+adl": ["--adv-start", "0.016"],
    "vgg+adl+sot": ["--adv-start", "0.016", "--sot", "0,1"],
}


@pytest.mark.parametrize("column", sorted(TABLE7))
def test_table7_configurations_train(tmp_path, npz_data, column):
    L.main(lmm_flags(tmp_path, column, 4, TABLE7[column], data=npz_data))
    log = read_log(tmp_path / column)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    adv = "adl" in column
    for r in log:
        assert np.isfinite(r["L_lines"])
        assert ("L_D" in r) == (adv and r["step"] > 2)  # the adversarial phase starts at 16 images = step 3
    if adv:
        r = log[-1]
        assert r["lambda_adapt"] > 0 and {"L_G", "D_real", "D_fake"} <= set(r)
    ckpt = E.load_checkpoint(str(tmp_path / column))
    assert ckpt["method"] == "lmm" and ckpt["step"] == 4 and (ckpt["state"]["disc"] is not None) == adv
    assert ckpt["net_kwargs"]["label_dim"] == 3 and ckpt["net_kwargs"]["schedule"]["steps"] == 18
    net = L.build_net(ckpt["net_kwargs"])
    net.load_state_dict(ckpt["ema"])
    x, nfe = L.sample(net, torch.randn(3, 3, 16, 16), 2, labels=torch.tensor([0, 1, 2]))
    assert nfe == 2 and x.shape == (3, 3, 16, 16) and torch.isfinite(x).all()
    assert os.path.isfile(tmp_path / column / "grid-nfe1-0000004.png")
    assert os.path.isfile(tmp_path / column / "grid-nfe2-0000004.png")


def test_sot_training_sees_only_the_sampling_levels(tmp_path, monkeypatch):
    seen = []
    original = L.lmm_loss

    def spy(net, x0, x1, sigma, *a, **k):
        seen.append(sigma.clone())
        return original(net, x0, x1, sigma, *a, **k)

    monkeypatch.setattr(L, "lmm_loss", spy)
    L.main(lmm_flags(tmp_path, "sot", 3, ["--loss", "l2", "--adv-start", "off", "--sot", "0,3"]))
    assert set(torch.cat(seen).tolist()) == {float(SIGMAS[0].float()), float(SIGMAS[3].float())}


def test_training_reduces_the_lines_loss(tmp_path):
    # every line ends at one image (a horizontal ramp): N_theta must learn to predict it from any point
    rng = np.random.default_rng(0)
    ramp = np.linspace(-0.5, 0.5, 16, dtype=np.float32)[None, None, :, None] * np.ones(
        (32, 3, 16, 16), np.float32
    )
    np.savez(tmp_path / "ramp.npz", noise=rng.standard_normal((32, 3, 16, 16)).astype(np.float32), data=ramp)
    pairs = str(tmp_path / "ramp.npz")
    flags = lmm_flags(tmp_path, "learn", 60, ["--loss", "l2", "--adv-start", "off", "--lr", "2e-3"], pairs)
    L.main(flags + ["--log-every", "10", "--grid", "0"])
    losses = [r["L_lines"] for r in read_log(tmp_path / "learn")]
    assert losses[-1] < 0.5 * losses[0], losses


def test_resume_equals_uninterrupted(tmp_path, npz_data, one_thread):
    extra = ["--adv-start", "0.008", "--snap-every", "2", "--grid", "0"]
    pairs = write_pairs(tmp_path / "pairs.npz")
    L.main(lmm_flags(tmp_path, "full", 4, extra, pairs, npz_data))
    L.main(lmm_flags(tmp_path, "cut", 2, extra, pairs, npz_data))
    L.main(lmm_flags(tmp_path, "cut", 4, extra + ["--resume", str(tmp_path / "cut")], pairs, npz_data))
    a = E.load_checkpoint(str(tmp_path / "full"))
    b = E.load_checkpoint(str(tmp_path / "cut"))
    assert a["step"] == b["step"] == 4
    for key in ("net", "ema"):
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    for k in a["state"]["disc"]:
        assert torch.equal(a["state"]["disc"][k], b["state"]["disc"][k]), k
    assert read_log(tmp_path / "full")[-1] == pytest.approx(
        {**read_log(tmp_path / "cut")[-1], "sec_per_step": read_log(tmp_path / "full")[-1]["sec_per_step"]}
    )


def test_torchrun_two_ranks(tmp_path, npz_data):
    # per-rank batch 4 in forward chunks of 2: DDP no_sync accumulation for N_theta and D, global lambda_adapt
    flags = lmm_flags(
        tmp_path, "ddp", 3, ["--adv-start", "0.008", "--grid", "0", "--batch-gpu", "2"], data=npz_data
    )
    r = run_script(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "lmm.py",
            *flags,
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    log = read_log(tmp_path / "ddp")
    assert [x["step"] for x in log] == [1, 2, 3] and "L_D" in log[-1] and np.isfinite(log[-1]["lambda_adapt"])
    assert "2 process(es)" in r.stdout
    ckpt = E.load_checkpoint(str(tmp_path / "ddp"))
    assert ckpt["step"] == 3 and all(torch.isfinite(t).all() for t in ckpt["net"].values())


@pytest.mark.parametrize(
    "case,match",
    [
        ("keys", r"no \['data'\] array"),
        ("shape", "must both be"),
        ("resolution", "use the same size"),
        ("cond", "has no 'label'"),
        ("sot", "--sot"),
        ("no-data", "needs real images"),
        ("missing", "pairs file not found"),
    ],
)
def test_bad_input_gives_one_line_errors(tmp_path, npz_data, case, match):
    pairs = write_pairs(tmp_path / "pairs.npz")
    extra, data = ["--adv-start", "off", "--loss", "l2"], None
    if case == "keys":
        np.savez(tmp_path / "bad.npz", noise=np.zeros((4, 3, 16, 16), np.float32))
        pairs = str(tmp_path / "bad.npz")
    elif case == "shape":
        np.savez(tmp_path / "bad.npz", noise=np.zeros((4, 3, 16, 16)), data=np.zeros((4, 3, 8, 8)))
        pairs = str(tmp_path / "bad.npz")
    elif case == "resolution":
        pairs, extra, data = write_pairs(tmp_path / "p8.npz", res=8), ["--adv-start", "0"], npz_data
    elif case == "cond":
        pairs, extra = write_pairs(tmp_path / "u.npz", labels=False), extra + ["--cond", "on"]
    elif case == "sot":
        extra = extra + ["--sot", "0,18"]
    elif case == "no-data":
        extra = ["--adv-start", "0"]
    elif case == "missing":
        pairs = str(tmp_path / "nope.npz")
    with pytest.raises(SystemExit, match=match) as e:
        L.main(lmm_flags(tmp_path, "bad", 2, extra, pairs, data))
    assert "\n" not in str(e.value)


def test_conditional_pairs_need_labelled_real_images(tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "nolabels.npz", images=rng.integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    with pytest.raises(SystemExit, match="no labels for the discriminator"):
        L.main(lmm_flags(tmp_path, "bad", 2, ["--adv-start", "0"], data=str(tmp_path / "nolabels.npz")))
    L.main(
        lmm_flags(
            tmp_path, "ok", 1, ["--adv-start", "0", "--cond", "off"], data=str(tmp_path / "nolabels.npz")
        )
    )
    assert E.load_checkpoint(str(tmp_path / "ok"))["net_kwargs"]["label_dim"] == 0


def test_generate_is_per_image_seeded_and_matches_the_pairs_noise(tmp_path, one_thread):
    import gen_pairs

    L.main(lmm_flags(tmp_path, "run", 1, ["--loss", "l2", "--adv-start", "off", "--grid", "0"]))
    ckpt = str(tmp_path / "run")
    outs = []
    for batch in ("4", "6"):
        out = str(tmp_path / f"s{batch}.npz")
        L.main(
            [
                "--generate",
                "6",
                "--ckpt",
                ckpt,
                "--out",
                out,
                "--nfe",
                "2",
                "--gen-batch",
                batch,
                "--seed",
                "3",
            ]
        )
        outs.append(np.load(out))
    assert np.array_equal(outs[0]["images"], outs[1]["images"])  # eta per image, not per batch
    assert outs[0]["images"].shape == (6, 16, 16, 3) and list(outs[0]["seeds"]) == [3, 4, 5, 6, 7, 8]
    noise, labels, _ = L.inputs_for_seeds([3, 4], (3, 16, 16), 3)
    ref_noise, ref_labels, _ = gen_pairs.pair_inputs([0, 1], 3, (3, 16, 16), 3)  # pairs 0, 1 of seed 3
    assert torch.equal(noise, ref_noise) and torch.equal(labels, ref_labels)
    assert list(outs[0]["labels"][:2]) == labels.tolist()
    with pytest.raises(SystemExit, match="0..17") as e:
        L.main(["--generate", "2", "--ckpt", ckpt, "--out", str(tmp_path / "x.npz"), "--steps", "0,18"])
    assert "\n" not in str(e.value)
    os.makedirs(tmp_path / "edm")
    with pytest.raises(SystemExit, match="'edm_teacher' checkpoint"):
        E.save_checkpoint({**E.load_checkpoint(ckpt), "method": "edm_teacher"}, str(tmp_path / "edm"), 1)
        L.main(["--generate", "2", "--ckpt", str(tmp_path / "edm"), "--out", str(tmp_path / "x.npz")])

"""lmm.py: Eq. 3 on exact line denoisers, the sampler of App. A.4, SOT, the adaptive weight, DiffAugment, the
discriminators, Table 7's training configurations, resume, torchrun and bad input."""

import fcntl
import json
import os
import sys
import urllib.error
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import edm_teacher as E
import lmm as L
from conftest import TINY_FLAGS, TINY_NET, run_script

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


def test_schedule_is_edms_and_bad_steps_are_refused():
    torch.testing.assert_close(L.lmm_schedule(18), E.karras_sigmas(18)[:-1], rtol=0, atol=0)
    torch.testing.assert_close(L.lmm_schedule(40)[[0, -1]], torch.tensor([80.0, 0.002], dtype=torch.float64))
    net = LineDenoiser(torch.ones(1))
    with pytest.raises(ValueError, match="0..17"):
        L.sample(net, torch.randn(1, 1, 2, 2), 2, step_indices=(0, 18))
    with pytest.raises(ValueError, match="1..18"):
        L.sample(net, torch.randn(1, 1, 2, 2), 19)
    _, used = L.sample(net, torch.randn(1, 1, 2, 2), 1, step_indices=(0, 30), sched_steps=40)
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


def test_adaptive_weight_is_ctms_detached_clipped_gradient_norm_ratio():
    # W_L = w (6 weights); L_lines = a <w, u> and L_G = b <w, v> have gradients a u and b v, so by hand
    # lambda = |a| ||u|| / (|b| ||v|| + 1e-4), then clipped to CTM's [0.01, 10]
    w = torch.linspace(-1, 1, 6, requires_grad=True)
    u, v = torch.tensor([3.0, 0, 4, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0, 0, 0])  # ||u|| = 5, ||v|| = 1
    for a, b, expect in [(0.2, 1.0, 1.0 / (1 + 1e-4)), (5.0, 0.5, 10.0), (0.001, 2.0, 0.01)]:
        lines, adv = a * (w * u).sum(), b * (w * v).sum()
        lam = L.adaptive_weight(lines, adv, w)
        assert not lam.requires_grad and lam.item() == pytest.approx(expect, rel=1e-6), (a, b)
    assert 5.0 * 5 / (0.5 + 1e-4) > 10 and 0.001 * 5 / (2 + 1e-4) < 0.01  # both clip ends were reached
    lines, adv = 5.0 * (w * u).sum(), 0.5 * (w * v).sum()
    assert L.adaptive_weight(lines, adv, w, clamp=(0.0, 1e4)).item() == pytest.approx(25 / 0.5001, rel=1e-6)
    assert L.parse_args(["--pairs", "p.npz"]).adapt_clamp == [0.01, 10.0]
    assert L.parse_args(["--pairs", "p.npz", "--adapt-clamp", "0,1e4"]).adapt_clamp == [0.0, 1e4]
    with pytest.raises(SystemExit):
        L.parse_args(["--pairs", "p.npz", "--adapt-clamp", "10,1"])


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


def test_patch_discriminator_gives_patch_logits_and_uses_the_label():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 16, 16), torch.nn.functional.one_hot(torch.tensor([0, 1, 2, 0]), 3).float()
    d = L.build_disc("patch", 3, 3)
    out = d(x, y)
    assert out.shape == (4, 4)  # 2 x 2 patches at 16 x 16
    assert not torch.allclose(out, d(x, y.roll(1, 1)))  # the projection term uses the label
    assert len(L.disc_params(d)) == len(list(d.parameters()))  # nothing frozen


@pytest.fixture(scope="module")
def ctm_disc():
    """CTM's discriminator with its real feature networks (DeiT-B, EfficientNet-lite0; random weights), at
    64 px input instead of 224 to stay cheap on a CPU."""
    torch.manual_seed(0)
    return L.build_disc("ctm", 3, 3, res=64, pretrained=False)


def test_ctm_discriminator_features_are_deit_base_and_lite0_with_ctms_channel_plan(ctm_disc):
    deit, lite = ctm_disc.features
    assert type(deit.backbone).__name__ == "VisionTransformerDistilled" and deit.backbone.embed_dim == 768
    assert sum(p.numel() for p in deit.backbone.parameters()) > 85e6  # DeiT-B (distilled), 86M
    x = torch.zeros(1, 3, 64, 64)
    assert [m.shape[1] for m in deit.backbone_maps(x)] == [96, 192, 384, 768]  # DPT reassembly of DeiT-B
    assert [m.shape[1] for m in lite.backbone_maps(x)] == [24, 40, 112, 320]  # lite0 after blocks 2, 3, 5, 7
    for f in (deit, lite):  # after cross-channel (64..512) and cross-scale mixing (x2 up, half the channels)
        assert [tuple(m.shape[1:]) for m in f(x)] == [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4)]
    assert deit.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])  # each network's own stats
    assert lite.mean.flatten().tolist() == pytest.approx([0.5, 0.5, 0.5])


def test_ctm_heads_give_4x4_logits_per_scale_at_224_px():
    torch.manual_seed(0)
    d = L.build_disc("ctm", 3, 0, res=224, backbones=["tf_efficientnet_lite0"], pretrained=False)
    assert d.features[0].sizes == [112, 56, 28, 14]
    convs = [[m.out_channels for m in h.main if isinstance(m, torch.nn.Conv2d)] for h in d.heads[0]]
    assert convs == [[64, 128, 256, 512], [128, 256, 512], [256, 512], [512]]  # MultiScaleD's plan, to 8 px
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 4 * 16)  # four heads of 4 x 4 patch logits


def test_ctm_discriminator_gradients_reach_heads_and_image_only(ctm_disc, monkeypatch):
    d = ctm_disc.train()
    assert not any(f.training for f in d.features) and d.heads[0][0].training  # frozen BatchNorm statistics
    torch.manual_seed(1)
    x = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_()
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 2]), 3).float()
    draws = []
    original = L.diff_augment
    monkeypatch.setattr(L, "diff_augment", lambda x, *a, **k: (draws.append(1), original(x, *a, **k))[1])
    out = d(x, onehot, augment=("color", "translation", "cutout"))
    assert len(draws) == 2  # one DiffAugment draw per feature network, as CTM
    assert out.shape == (2, 2 * (25 + 25 + 25 + 1))  # at 64 px: 5 x 5 patches on three maps, 1 on the 4 x 4
    d.zero_grad(set_to_none=True)
    out.mean().backward()
    assert x.grad.abs().sum() > 0  # the generator gets D's gradient through the frozen networks
    trainable = {id(t) for t in L.disc_params(d)}
    for name, t in d.named_parameters():
        frozen = name.startswith("features.")
        assert (id(t) in trainable) != frozen and t.requires_grad != frozen, name
        assert (t.grad is None) == frozen, name
    d.eval()
    with torch.no_grad():
        assert not torch.allclose(d(x, onehot), d(x, onehot.roll(1, 1)))  # the class projection is used
    state = L.disc_state(d)  # checkpoints keep the heads and random projections, not the ImageNet weights
    assert not any(".backbone." in k for k in state) and any(".ccm." in k for k in state)
    L.load_disc_state(d, state)


def test_timm_offline_error_names_the_weight_file_and_the_cache(monkeypatch):
    import timm
    from huggingface_hub import constants
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(*a, **k):
        raise LocalEntryNotFoundError("no network")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(SystemExit, match="model.safetensors") as e:
        L.build_disc("ctm", 3, 0, backbones=["tf_efficientnet_lite0"])
    msg = str(e.value)
    assert "timm/tf_efficientnet_lite0.in1k" in msg and constants.HF_HUB_CACHE in msg and "\n" not in msg
    with pytest.raises(SystemExit, match="not a timm model"):
        L.build_disc("ctm", 3, 0, backbones=["no_such_net"])


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


def write_pairs(path, n=32, res=16, labels=True, seed=0, classes=3, meta=None):
    rng = np.random.default_rng(seed)
    x0 = rng.standard_normal((n, 3, res, res)).astype(np.float32)
    arrays = dict(noise=x0, data=np.tanh(0.5 * x0[:, :, ::-1]).astype(np.float16))
    if labels:
        arrays["label"] = (np.arange(n) % classes).astype(np.int64)
    if meta is not None:
        arrays["meta"] = np.array(json.dumps(meta))
    np.savez(path, **arrays)
    return str(path)


def edm_format_teacher(path, label_dim=10, augment_dim=9, res=16):
    """A tiny teacher as `tools/convert_edm.py` writes an official EDM snapshot: EDM's net_kwargs with
    augment_dim 9 and label_dim 10 (CIFAR-10 cond.), EMA weights, args.imported_from."""
    torch.manual_seed(0)
    kw = dict(
        img_resolution=res, img_channels=3, label_dim=label_dim, sigma_data=0.5, augment_dim=augment_dim
    )
    kw.update(TINY_NET, dropout=0.13)
    net = E.build_net(kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = net.state_dict()
    ckpt = dict(method="edm_teacher", version=1, args=dict(imported_from="/x/edm-cifar10-32x32-cond-vp.pkl"))
    ckpt.update(net_kwargs=kw, net=sd, ema=sd, opt=None, step=0, kimg=0.0, state=dict(source="EDM snapshot"))
    L.atomic_save(ckpt, str(path))
    return str(path)


def lmm_flags(tmp_path, name, steps, extra=(), pairs=None, data=None, cond=True):
    """A tiny run of `steps` steps of 8 pairs (class-conditional unless cond=False), LPIPS on a random VGG."""
    pairs = pairs or write_pairs(tmp_path / "pairs.npz")
    flags = ["--pairs", pairs, "--outdir", str(tmp_path / name), *TINY_FLAGS, "--batch", "8", "--duration"]
    flags += [str(8 * steps / 1e6), "--log-every", "1", "--grid", "4", "--lpips-random-trunk", "--lpips-res"]
    flags += ["32", "--lpips-res-pre", "16", "--disc", "patch", *(["--cond"] if cond else [])]
    return flags + (["--data", data] if data else []) + list(extra)


def read_log(outdir):
    with open(os.path.join(outdir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


TABLE7 = {
    "l2": ["--loss", "l2", "--adv-start", "off"],
    "vgg": ["--adv-start", "off"],
    "vgg+adl": ["--adv-start", "0.016"],
    "vgg+adl+sot": ["--adv-start", "0.016", "--sot", "0,1", "--sot-start", "0.016"],
}


@pytest.mark.parametrize("column", sorted(TABLE7))
def test_table7_configurations_train(tmp_path, npz_data, column):
    L.main(lmm_flags(tmp_path, column, 4, TABLE7[column], data=npz_data))
    log = read_log(tmp_path / column)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    adv = "adl" in column
    for (
        r
    ) in log:  # the adversarial phase starts at 16 images = step 3: N_theta's step, then D's (--g-period 2)
        assert ("L_lines" in r) == (not adv or r["step"] != 4) and np.isfinite(r.get("L_lines", 0))
        assert ("L_G" in r) == (adv and r["step"] == 3) and ("L_D" in r) == (adv and r["step"] == 4)
    if adv:
        assert 0.01 <= log[2]["lambda_adapt"] <= 10 and {"D_real", "D_fake"} <= set(log[3])
    ckpt = L.load_checkpoint(str(tmp_path / column))
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


def test_sot_start_turns_sot_on_as_fine_tuning(tmp_path, monkeypatch):
    seen = []
    original = L.lmm_loss

    def spy(net, x0, x1, sigma, *a, **k):
        seen.append(sigma.clone())
        return original(net, x0, x1, sigma, *a, **k)

    monkeypatch.setattr(L, "lmm_loss", spy)
    extra = ["--loss", "l2", "--adv-start", "off", "--sot", "0", "--sot-start", "0.016", "--grid", "0"]
    L.main(lmm_flags(tmp_path, "sot", 4, extra))
    level0 = float(SIGMAS[0].float())
    assert [bool((s == level0).all()) for s in seen] == [False, False, True, True]  # from image 16 = step 3


def test_g_period_alternates_generator_and_discriminator_steps(tmp_path, npz_data):
    extra = [
        "--loss",
        "l2",
        "--adv-start",
        "0.008",
        "--grid",
        "0",
        "--snap-every",
        "1",
    ]  # adversarial from step 2
    for k, pattern in [(2, "G G D G D"), (3, "G G D D")]:  # --g-period 1 ("GD" steps): the --disc ctm test
        L.main(
            lmm_flags(tmp_path, f"k{k}", len(pattern.split()), extra + ["--g-period", str(k)], data=npz_data)
        )
        log = read_log(tmp_path / f"k{k}")
        kinds = " ".join("G" * ("L_lines" in r) + "D" * ("L_D" in r) for r in log)
        assert kinds == pattern, k
        for r, kind in zip(log, kinds.split(), strict=True):
            assert ("L_G" in r) == ("G" in kind and r["step"] > 1), (k, r)
    run = tmp_path / "k2"
    before, after = (L.load_checkpoint(str(run / f"ckpt-000000{s}.pt")) for s in (2, 3))  # step 3: D only
    for key in ("net", "ema"):
        assert all(torch.equal(before[key][n], after[key][n]) for n in before[key]), key
    assert any(
        not torch.equal(before["state"]["disc"][n], after["state"]["disc"][n]) for n in after["state"]["disc"]
    )
    assert after["state"]["adv_step0"] == 1


def test_training_reduces_the_lines_loss(tmp_path):
    # every line ends at one image (a horizontal ramp): N_theta must learn to predict it from any point
    rng = np.random.default_rng(0)
    ramp = np.linspace(-0.5, 0.5, 16, dtype=np.float32)[None, None, :, None] * np.ones(
        (32, 3, 16, 16), np.float32
    )
    np.savez(tmp_path / "ramp.npz", noise=rng.standard_normal((32, 3, 16, 16)).astype(np.float32), data=ramp)
    pairs = str(tmp_path / "ramp.npz")
    flags = lmm_flags(
        tmp_path, "learn", 60, ["--loss", "l2", "--adv-start", "off", "--lr", "2e-3"], pairs, cond=False
    )
    L.main(flags + ["--log-every", "10", "--grid", "0"])
    losses = [r["L_lines"] for r in read_log(tmp_path / "learn")]
    assert losses[-1] < 0.5 * losses[0], losses


def test_resume_equals_uninterrupted(tmp_path, npz_data, one_thread):
    extra = ["--adv-start", "0.008", "--snap-every", "2", "--grid", "0"]
    pairs = write_pairs(tmp_path / "pairs.npz")
    L.main(lmm_flags(tmp_path, "full", 4, extra, pairs, npz_data))
    L.main(lmm_flags(tmp_path, "cut", 2, extra, pairs, npz_data))
    L.main(lmm_flags(tmp_path, "cut", 4, extra + ["--resume", str(tmp_path / "cut")], pairs, npz_data))
    a = L.load_checkpoint(str(tmp_path / "full"))
    b = L.load_checkpoint(str(tmp_path / "cut"))
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
    # per-rank batch 4 in forward chunks of 2: DDP no_sync accumulation for N_theta and D, global lambda_adapt;
    # N_theta starts from an EDM-format teacher with augment_dim 9 (its map_augment stays frozen under DDP)
    teacher = edm_format_teacher(tmp_path / "edm.pt", label_dim=3)
    extra = ["--adv-start", "0.008", "--grid", "0", "--batch-gpu", "2", "--init", teacher]
    flags = lmm_flags(tmp_path, "ddp", 3, extra, data=npz_data)
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
    assert [x["step"] for x in log] == [1, 2, 3] and "L_D" in log[2] and np.isfinite(log[1]["lambda_adapt"])
    assert "2 process(es)" in r.stdout and "from --init" in r.stdout
    ckpt = L.load_checkpoint(str(tmp_path / "ddp"))
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
        pairs = write_pairs(tmp_path / "u.npz", labels=False)
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
        lmm_flags(tmp_path, "ok", 1, ["--adv-start", "0"], data=str(tmp_path / "nolabels.npz"), cond=False)
    )
    assert L.load_checkpoint(str(tmp_path / "ok"))["net_kwargs"]["label_dim"] == 0


def test_generate_is_per_image_seeded_and_matches_the_pairs_noise(tmp_path, one_thread, monkeypatch):
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
    seen = []  # what --generate feeds the sampler for seeds 3, 4: pairs 0, 1 of gen_pairs.py --seed 3
    monkeypatch.setattr(
        L, "sample", lambda net, x, nfe, lab, *a, **k: (seen.append((x, lab)), (x[:, :1] * 0, 1))[1]
    )
    L.main(["--generate", "2", "--ckpt", ckpt, "--out", str(tmp_path / "spy.npz"), "--seed", "3"])
    monkeypatch.undo()
    identity = SimpleNamespace(sample=lambda net, x0, nfe, labels=None: (x0, 1))
    ref_noise, _, ref_labels, _ = gen_pairs.make_pairs(identity, None, 0, 2, 3, (3, 16, 16), 3, 1, 2, "cpu")
    assert torch.equal(seen[0][0], ref_noise) and torch.equal(seen[0][1], ref_labels)
    assert list(outs[0]["labels"][:2]) == ref_labels.tolist()
    with pytest.raises(SystemExit, match="0..17") as e:
        L.main(
            ["--generate", "2", "--ckpt", ckpt, "--out", str(tmp_path / "x.npz"), "--step-indices", "0,18"]
        )
    assert "\n" not in str(e.value)
    sampled = []
    monkeypatch.setattr(L, "sample", lambda *a, **k: sampled.append(1))
    with pytest.raises(SystemExit, match="No such file or directory") as e:
        L.main(["--generate", "2", "--ckpt", ckpt, "--out", str(tmp_path / "no" / "such" / "x.npz")])
    assert "\n" not in str(e.value) and not sampled  # before any sampling
    monkeypatch.undo()
    L.atomic_save({**L.load_checkpoint(ckpt), "method": "edm_teacher"}, str(tmp_path / "edm.pt"))
    with pytest.raises(SystemExit, match="'edm_teacher' checkpoint"):
        L.main(["--generate", "2", "--ckpt", str(tmp_path / "edm.pt"), "--out", str(tmp_path / "x.npz")])


def test_ctm_discriminator_trains_on_the_cpu(tmp_path, npz_data):
    # the default --disc ctm, random-weight networks; TESTS ONLY: DeiT-tiny for DeiT-B and 64 px for 224
    extra = ["--loss", "l2", "--adv-start", "0", "--disc", "ctm", "--disc-random-weights", "--disc-res", "64"]
    extra += ["--disc-backbones", "deit_tiny_distilled_patch16_224,tf_efficientnet_lite0", "--g-period", "1"]
    L.main(lmm_flags(tmp_path, "ctm", 2, extra + ["--grid", "0"], data=npz_data))
    log = read_log(tmp_path / "ctm")
    assert [r["step"] for r in log] == [1, 2]
    for r in log:  # two adversarial steps, each with N_theta's and D's update
        assert all(np.isfinite(r[k]) for k in ("L_lines", "L_G", "lambda_adapt", "L_D", "D_real", "D_fake"))
    disc = L.load_checkpoint(str(tmp_path / "ctm"))["state"]["disc"]
    assert disc and not any(".backbone." in k for k in disc)


def test_init_from_a_converted_official_edm_checkpoint_loads_every_key(tmp_path):
    teacher = edm_format_teacher(tmp_path / "edm.pt")  # augment_dim 9, label_dim 10
    pairs = write_pairs(tmp_path / "p10.npz", classes=10)
    flags = ["--loss", "l2", "--adv-start", "off", "--grid", "0", "--lr", "1e-30", "--init", teacher]
    L.main(lmm_flags(tmp_path, "init", 1, flags, pairs))
    ck, t = L.load_checkpoint(str(tmp_path / "init")), torch.load(teacher, weights_only=True)
    assert ck["net_kwargs"]["augment_dim"] == 9 and ck["net_kwargs"]["label_dim"] == 10
    assert ck["net_kwargs"]["schedule"]["steps"] == 18
    assert set(ck["net"]) == set(t["ema"])  # every key, and the teacher's EMA values (one step of lr 1e-30)
    for k, v in t["ema"].items():
        torch.testing.assert_close(ck["net"][k], v, rtol=1e-6, atol=1e-12)
    net = L.build_net(ck["net_kwargs"])
    net.load_state_dict(ck["ema"])
    x, _ = L.sample(net, torch.randn(2, 3, 16, 16), 1, labels=torch.tensor([3, 9]))
    assert torch.isfinite(x).all()
    cases = [
        (
            write_pairs(tmp_path / "u.npz", labels=False),
            r"\(3, 16, 16, 10\) but the pairs are \(3, 16, 16, 0\)",
        ),
        (
            write_pairs(tmp_path / "r8.npz", res=8, classes=10),
            r"but the pairs are \(3, 8, 8, 10\): make the pairs",
        ),
        (
            write_pairs(tmp_path / "c3.npz"),
            r"but the pairs are \(3, 16, 16, 3\): make the pairs with that teacher",
        ),
    ]
    for bad, match in cases:
        with pytest.raises(SystemExit, match=match) as e:
            L.main(lmm_flags(tmp_path, "bad", 1, flags, bad, cond="u.npz" not in bad))
        assert "\n" not in str(e.value)
    for snapshot in ("edm-cifar10-32x32-cond-vp.pkl", "https://x.org/edm-cifar10-32x32-cond-vp.pkl"):
        convert = f"python tools/convert_edm.py {snapshot} edm-cifar10-32x32-cond-vp.pt"
        with pytest.raises(SystemExit, match=convert) as e:
            L.main(lmm_flags(tmp_path, "bad", 1, flags[:-1] + [snapshot], pairs))
        assert "\n" not in str(e.value)


def test_pairs_from_a_teacher_trained_on_an_npz_need_no_data_flag(tmp_path, npz_data, capsys):
    import gen_pairs

    teacher = tmp_path / "teacher"
    E.main(["--data", npz_data, "--outdir", str(teacher), "--batch", "8", "--duration", "8e-6", "--cond", "--augment", "0"]
           + ["--grid", "0", "--log-every", "1", *TINY_FLAGS])  # fmt: skip
    out = tmp_path / "pairs.npz"
    gen_pairs.main(["--ckpt", str(teacher), "--num-pairs", "16", "--out", str(out), "--batch", "8"]
                   + ["--nfe", "3", "--cond"])  # fmt: skip
    assert L.load_pairs(str(out))[0]["meta"]["dataset"] == os.path.abspath(npz_data)
    capsys.readouterr()
    L.main(lmm_flags(tmp_path, "lmm", 2, ["--loss", "l2", "--adv-start", "0", "--grid", "0"], str(out)))
    printed = capsys.readouterr().out
    assert f"real images for the discriminator: {os.path.abspath(npz_data)} (32 images)" in printed
    assert "L_D" in read_log(tmp_path / "lmm")[-1]


def test_pairs_meta_names_the_official_teachers_dataset(tmp_path):
    import gen_pairs

    def named(name):
        return gen_pairs.teacher_dataset(dict(args=dict(imported_from=f"/cache/edm/{name}")))

    assert named("edm-cifar10-32x32-cond-vp.pkl") == named("edm-cifar10-32x32-uncond-vp.pkl") == "cifar10"
    assert named("edm-afhqv2-64x64-uncond-vp.pkl") == "afhqv2-64x64"
    assert gen_pairs.teacher_dataset(dict(args=dict(data="cifar10"))) == "cifar10"
    pairs = write_pairs(tmp_path / "afhq.npz", meta=dict(dataset="afhqv2-64x64"))
    with pytest.raises(SystemExit, match="cannot load by name: pass --data") as e:
        L.main(lmm_flags(tmp_path, "bad", 1, ["--loss", "l2", "--adv-start", "0"], pairs))
    assert "afhqv2-64x64" in str(e.value) and "\n" not in str(e.value)


def test_evaluate_scores_table7_step_lists_through_sampler_kw(tmp_path, npz_data, monkeypatch):
    import evaluate as V

    L.main(lmm_flags(tmp_path, "run", 1, ["--loss", "l2", "--adv-start", "off", "--grid", "0"]))
    seen, original = [], L.lmm_sampler

    def spy(net, noise, sigmas, steps, *a, **k):
        seen.append(tuple(steps))
        return original(net, noise, sigmas, steps, *a, **k)

    monkeypatch.setattr(L, "lmm_sampler", spy)
    for kw, nfe, expect in [
        ("step_indices=0:1:2", "3", (0, 1, 2)),
        ("step_indices=0", "1", (0,)),
        ("", "3", (0, 3, 5)),
    ]:
        seen.clear()
        out = tmp_path / "res.json"
        V.main(["--ckpt", str(tmp_path / "run"), "--nfe", nfe, "--num-images", "6", "--batch", "6"]
               + ["--ref-data", npz_data, "--test-features", "random-cnn", "--out", str(out)]
               + (["--sampler-kw", kw] if kw else []) + ["--overwrite"])  # fmt: skip
        with open(out) as f:
            row = json.load(f)["results"][0]
        assert set(seen) == {expect} and row["nfe"] == len(expect), kw


def test_help_lists_the_adversarial_phase_flags_and_hides_the_test_switches(capsys):
    with pytest.raises(SystemExit):
        L.parse_args(["--help"])
    text = capsys.readouterr().out
    for flag in (
        "--disc {ctm,patch}",
        "--adapt-clamp",
        "--g-period",
        "--sot-start",
        "--init TEACHER",
        "--ema-decay",
    ):
        assert flag in text, flag
    for hidden in ("torchvision", "--ema ", "--lpips-random-trunk", "--disc-random-weights", "--steps"):
        assert hidden not in text, hidden


def test_imagenet64_preset_is_table6s_adm_column():
    args = L.parse_args(["--pairs", "p.npz", "--preset", "imagenet64"])
    table6 = dict(arch="adm", model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_res=[32, 16, 8],
                  lr=8e-6, batch=512, ema_decay=0.999, sched_steps=40, duration=512 * 110e3 / 1e6, adv_start=512 * 80e3 / 1e3)  # fmt: skip
    for k, v in table6.items():  # lists exactly, floats to rounding
        assert getattr(args, k) == (pytest.approx(v) if isinstance(v, float) else v), k
    with pytest.raises(SystemExit):
        L.parse_args(["--pairs", "p.npz", "--preset", "imagenet128"])  # an unknown preset is an error


def test_adm_teacher_to_pairs_to_lmm(tmp_path):
    """ImageNet-64's route at toy size: an ADM teacher (as tools/convert_edm.py writes EDM's ImageNet snapshot), its
    class-labelled pairs through gen_pairs, and LMM from those pairs starting from the teacher."""
    import gen_pairs

    torch.manual_seed(0)
    kw = dict(arch="adm", img_resolution=16, img_channels=3, label_dim=5, model_channels=64,
              channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.1)  # fmt: skip
    sd = E.build_net(kw).state_dict()
    teacher = dict(method="edm_teacher", version=1, args={}, net_kwargs=kw, net=sd, ema=sd, opt=None, step=0)
    L.atomic_save(dict(teacher, kimg=0.0, state={}), str(tmp_path / "adm.pt"))
    pairs = str(tmp_path / "adm_pairs.npz")
    gen_pairs.main(
        ["--ckpt", str(tmp_path / "adm.pt"), "--num-pairs", "8", "--out", pairs, "--nfe", "3", "--cond"]
    )
    with np.load(pairs) as f:
        assert f["label"].shape == (8,) and f["label"].max() < 5 and f["data"].shape == (8, 3, 16, 16)
    flags = ["--loss", "l2", "--adv-start", "off", "--grid", "0", "--init", str(tmp_path / "adm.pt")]
    L.main(lmm_flags(tmp_path, "lmm-adm", 2, flags, pairs))
    ck = L.load_checkpoint(str(tmp_path / "lmm-adm"))
    assert ck["net_kwargs"]["arch"] == "adm" and ck["step"] == 2 and "model.out_conv.weight" in ck["ema"]


def test_real_images_are_mirrored_at_random_as_ctms_loader(tmp_path, npz_data, monkeypatch):
    seen, forward = [], L.PatchDisc.forward

    def spy(self, x, *a, **k):
        seen.append(x.detach().clone())
        return forward(self, x, *a, **k)

    monkeypatch.setattr(L.PatchDisc, "forward", spy)
    reals = {}
    for xflip in ("off", "random"):  # --g-period 1: D sees N_theta's fakes (G step), then the reals and fakes
        seen.clear()
        extra = ["--loss", "l2", "--adv-start", "0", "--g-period", "1", "--grid", "0", "--xflip", xflip]
        L.main(lmm_flags(tmp_path, xflip, 2, extra, data=npz_data))
        reals[xflip] = torch.cat([seen[1], seen[4]])
    same = (reals["random"] == reals["off"]).flatten(1).all(1)
    mirrored = (reals["random"] == reals["off"].flip(3)).flatten(1).all(1)
    assert (same | mirrored).all() and mirrored.any() and same.any()


# --- nothing lost, nothing silently wrong (issue 35) ---

L2 = ["--loss", "l2", "--adv-start", "off", "--grid", "0"]


def test_resuming_another_runs_checkpoint_into_a_run_folder_is_refused(tmp_path):
    L.main(lmm_flags(tmp_path, "a", 1, L2))
    L.main(lmm_flags(tmp_path, "b", 1, L2 + ["--seed", "1"]))
    before = (tmp_path / "b" / "ckpt-0000001.pt").read_bytes()
    with pytest.raises(
        SystemExit, match=r"b holds another run \(step 1\); resume .*a into its own folder"
    ) as e:
        L.main(lmm_flags(tmp_path, "b", 2, L2 + ["--resume", str(tmp_path / "a")]))
    assert "\n" not in str(e.value) and (tmp_path / "b" / "ckpt-0000001.pt").read_bytes() == before
    L.main(
        lmm_flags(tmp_path, "c", 2, L2 + ["--resume", str(tmp_path / "a" / "ckpt-0000001.pt")])
    )  # a new folder
    L.main(lmm_flags(tmp_path, "b", 2, L2 + ["--resume", str(tmp_path / "a"), "--overwrite"]))
    assert sorted(os.listdir(tmp_path / "b")) == [".lock", "ckpt-0000002.pt", "latest.pt", "log.jsonl"]
    assert (
        [r["step"] for r in read_log(tmp_path / "b")] == [r["step"] for r in read_log(tmp_path / "c")] == [2]
    )


def test_non_finite_weights_are_never_saved_or_sampled_and_flags_refuse_nan(tmp_path):
    L.main(lmm_flags(tmp_path, "run", 1, L2))
    ck = L.load_checkpoint(str(tmp_path / "run"))
    ck["ema"]["model.dec.16x16_aux_conv.bias"][0] = float("nan")  # one EMA weight
    L.atomic_save(ck, str(tmp_path / "run" / "ckpt-0000001.pt"))
    with pytest.raises(
        SystemExit, match="non-finite weights at step 2: not saved; the newest checkpoint"
    ) as e:
        L.main(lmm_flags(tmp_path, "run", 2, L2 + ["--resume", str(tmp_path / "run")]))
    assert "\n" not in str(e.value) and not (tmp_path / "run" / "ckpt-0000002.pt").exists()
    with pytest.raises(SystemExit, match="non-finite samples"):
        L.main(["--generate", "2", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "s.npz")])
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.png").exists()
    for flag in ("--ema-decay", "--lr", "--lr-d", "--duration", "--dropout", "--adv-start", "--adapt-clamp"):
        for bad in ("nan", "inf", "-inf"):
            with pytest.raises(SystemExit):
                L.parse_args(["--pairs", "p.npz", flag, bad])


def test_generate_never_replaces_a_grid_or_shares_its_output_and_runs_keep_user_files(tmp_path):
    L.main(lmm_flags(tmp_path, "run", 1, L2))
    png = tmp_path / "s.png"
    png.write_bytes(b"mine")
    with pytest.raises(SystemExit, match="s.png exists; pass --overwrite"):
        L.main(["--generate", "2", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "s.npz")])
    assert png.read_bytes() == b"mine" and not (tmp_path / "s.npz").exists()
    fd = os.open(tmp_path / "t.npz.lock", os.O_RDWR | os.O_CREAT)  # a second job on t.npz
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with pytest.raises(SystemExit, match="t.npz is locked by a running job"):
        L.main(["--generate", "2", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "t.npz")])
    os.close(fd)
    (tmp_path / "run" / "notes.tmp2024").write_text("mine")
    (tmp_path / "run" / "ckpt-0000009.pt.tmp77").write_text("a killed save")
    L.main(lmm_flags(tmp_path, "run", 2, L2 + ["--resume", str(tmp_path / "run")]))
    assert sorted(os.listdir(tmp_path / "run")) == [
        ".lock", "ckpt-0000001.pt", "ckpt-0000002.pt", "latest.pt", "log.jsonl", "notes.tmp2024"
    ]  # fmt: skip


def test_a_checkpoint_member_marked_as_a_directory_is_refused(tmp_path):
    L.main(lmm_flags(tmp_path, "run", 1, L2))
    path = tmp_path / "run" / "ckpt-0000001.pt"
    data, at = bytearray(path.read_bytes()), 0
    while (at := data.find(b"PK\x01\x02", at + 1)) > 0:  # central-directory records: name at 46, attr at 38
        if b"/data/" in data[at + 46 : at + 46 + int.from_bytes(data[at + 28 : at + 30], "little")]:
            data[at + 38] |= 0x10  # one bit: "directory", which the CRC check does not cover
            break
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r"flipped.pt is corrupt: its member .*/data/.* is damaged") as e:
        L.load_checkpoint(str(tmp_path / "flipped.pt"))
    assert "\n" not in str(e.value)


def test_an_outdir_or_an_out_folder_that_is_a_file_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match="file: File exists") as e:
        L.main(lmm_flags(tmp_path, "file", 1, L2))
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)
    L.main(lmm_flags(tmp_path, "run", 1, L2))
    with pytest.raises(SystemExit, match="Not a directory") as e:
        L.main(
            ["--generate", "1", "--ckpt", str(tmp_path / "run"), "--out", str(tmp_path / "file" / "s.npz")]
        )
    assert str(e.value).startswith("error: ") and "\n" not in str(e.value)


def test_real_images_with_bad_labels_or_cut_short_are_one_line(tmp_path, npz_data):
    images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
    bad = dict(
        float=np.arange(8) * 0.5, huge=np.full(8, 2**40), neg=-np.ones(8, np.int64), bool=np.ones(8, bool)
    )
    for name, labels in bad.items():
        np.savez(tmp_path / f"{name}.npz", images=images, labels=labels)
        with pytest.raises(SystemExit, match="labels must be class indices in"):
            L.load_data(str(tmp_path / f"{name}.npz"))
    (tmp_path / "cut.npz").write_bytes((tmp_path / "data.npz").read_bytes()[:5000])  # npz_data, cut
    np.save(tmp_path / "big.npy", images)
    head = (tmp_path / "big.npy").read_bytes()
    (tmp_path / "big.npy").write_bytes(head.replace(b"(8, 16, 16, 3)", b"(9, 16, 16, 3)"))  # N overstated
    for name in ("cut.npz", "big.npy"):
        with pytest.raises(SystemExit, match=f"cannot read --data .*{name}") as e:
            L.load_data(str(tmp_path / name))
        assert "\n" not in str(e.value)


def test_a_checkpoint_with_the_wrong_content_is_one_line(tmp_path):
    L.main(lmm_flags(tmp_path, "run", 1, L2))
    ck = L.load_checkpoint(str(tmp_path / "run"))
    cases = dict(tensor=torch.zeros(3), no_kwargs={k: v for k, v in ck.items() if k != "net_kwargs"},
                 future=dict(ck, version=99), arch=dict(ck, net_kwargs=dict(ck["net_kwargs"], arch="nope")),
                 shape=dict(ck, ema={k: v[:1] for k, v in ck["ema"].items()}))  # fmt: skip
    for name, obj in cases.items():
        torch.save(obj, tmp_path / f"{name}.pt")
        with pytest.raises(SystemExit) as e:
            L.main(
                ["--generate", "1", "--ckpt", str(tmp_path / f"{name}.pt"), "--out", str(tmp_path / "s.npz")]
            )
        assert (
            str(e.value).startswith("error: ") and f"{name}.pt" in str(e.value) and "\n" not in str(e.value)
        )
    with pytest.raises(
        SystemExit, match=r"no_kwargs.pt is not a checkpoint of this project: it has no \['net_k"
    ):
        L.main(lmm_flags(tmp_path, "run", 2, L2 + ["--resume", str(tmp_path / "no_kwargs.pt")]))


def test_sample_refuses_a_schedule_it_cannot_use():
    net = LineDenoiser(torch.ones(1))
    for bad in (
        dict(rho=float("nan")),
        dict(sigma_min=0.0),
        dict(sigma_max=float("inf")),
        dict(sched_steps=2.5),
    ):
        with pytest.raises(ValueError, match="the schedule needs"):
            L.sample(net, torch.randn(1, 1, 2, 2), 1, **bad)


def test_resuming_with_another_number_of_processes_says_the_noise_changes(tmp_path, capsys):
    L.main(lmm_flags(tmp_path, "run", 1, L2))
    ck = L.load_checkpoint(str(tmp_path / "run"))
    L.atomic_save(dict(ck, state=dict(ck["state"], world=2)), str(tmp_path / "run" / "ckpt-0000001.pt"))
    capsys.readouterr()
    L.main(lmm_flags(tmp_path, "run", 2, L2 + ["--resume", str(tmp_path / "run")]))
    assert "note: saved with 2 process(es), resumed with 1" in capsys.readouterr().out

"""EDM's mathematics against closed forms and an independent ODE solver."""

import math

import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

import edm_teacher as E


def test_preconditioning_matches_hand_computed_values():
    # sigma_data = 0.5: c_skip = 0.25/(s^2+0.25), c_out = 0.5 s/sqrt(s^2+0.25), c_in = 1/sqrt(s^2+0.25)
    expected = {
        0.5: (0.5, 0.25 / math.sqrt(0.5), 1 / math.sqrt(0.5), math.log(0.5) / 4),
        1.0: (0.2, 0.5 / math.sqrt(1.25), 1 / math.sqrt(1.25), 0.0),
        80.0: (0.25 / 6400.25, 40 / math.sqrt(6400.25), 1 / math.sqrt(6400.25), math.log(80) / 4),
        0.002: (0.25 / 0.250004, 0.001 / math.sqrt(0.250004), 1 / math.sqrt(0.250004), math.log(0.002) / 4),
    }
    for s, want in expected.items():
        got = E.edm_precond(torch.tensor(s, dtype=torch.float64))
        for g, w in zip(got, want, strict=True):
            assert g.item() == pytest.approx(w, rel=1e-12, abs=1e-15)


class RecordingModel(torch.nn.Module):
    """Stands in for the UNet: records its inputs and returns a fixed F."""

    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        self.x, self.noise_labels, self.class_labels = x, noise_labels, class_labels
        return self.f


def test_precond_wraps_the_network_as_in_edm_eq7():
    torch.manual_seed(0)
    net = E.EDMPrecond(16, 3, label_dim=4, **{"model_channels": 16, "channel_mult": [1, 2], "num_blocks": 1})
    f = torch.randn(3, 3, 16, 16)
    net.model = RecordingModel(f)
    x, sigma = torch.randn(3, 3, 16, 16), torch.tensor([0.5, 1.0, 80.0])
    d = net(x, sigma, class_labels=torch.tensor([0, 3, 1]))
    c_skip, c_out, c_in, c_noise = (
        torch.tensor(v)
        for v in zip(
            *[
                (
                    0.25 / (s * s + 0.25),
                    0.5 * s / math.sqrt(s * s + 0.25),
                    1 / math.sqrt(s * s + 0.25),
                    math.log(s) / 4,
                )
                for s in (0.5, 1.0, 80.0)
            ],
            strict=True,
        )
    )
    view = (-1, 1, 1, 1)
    torch.testing.assert_close(net.model.x, c_in.float().view(view) * x)
    torch.testing.assert_close(net.model.noise_labels, c_noise.float())
    torch.testing.assert_close(net.model.class_labels, torch.eye(4)[[0, 3, 1]])
    torch.testing.assert_close(d, c_skip.float().view(view) * x + c_out.float().view(view) * f)
    with pytest.raises(ValueError, match="class-conditional"):
        net(x, sigma)


def test_loss_weight_times_c_out_squared_is_one():
    # EDM Sec. 5 / Table 1: lambda(sigma) = 1 / c_out(sigma)^2, so F's effective weight is 1 at every sigma.
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64).view(-1, 1, 1, 1)
    y, n = torch.zeros(50, 1, 1, 1, dtype=torch.float64), torch.zeros(50, 1, 1, 1, dtype=torch.float64)

    def ones(x, s, class_labels=None):  # D = 1 and y = 0: the loss is lambda(sigma)
        return torch.ones_like(x)

    weight = E.edm_loss(ones, y, sigma=sigma, n=n)
    _, c_out, _, _ = E.edm_precond(sigma)
    torch.testing.assert_close(weight * c_out**2, torch.ones_like(weight), rtol=1e-12, atol=0)
    assert weight[0].item() == pytest.approx((0.001**2 + 0.25) / (0.001 * 0.5) ** 2)


def test_loss_is_weighted_squared_error_on_noised_data():
    torch.manual_seed(0)
    y, n = torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)
    sigma = torch.tensor([0.1, 0.5, 2.0, 30.0]).view(-1, 1, 1, 1)
    seen = {}

    def shrink(x, s, class_labels=None):  # a fixed, non-trivial "denoiser"
        seen["x"], seen["s"] = x, s
        return 0.3 * x

    loss = E.edm_loss(shrink, y, sigma=sigma, n=n)
    s = sigma
    torch.testing.assert_close(seen["x"], y + s * n)
    torch.testing.assert_close(seen["s"], sigma.flatten())
    torch.testing.assert_close(loss, (s**2 + 0.25) / (0.5 * s) ** 2 * (0.3 * (y + s * n) - y) ** 2)


def test_training_sigmas_are_log_normal():
    seen = []
    torch.manual_seed(0)
    E.edm_loss(lambda x, s, class_labels=None: (seen.append(s), x)[1], torch.zeros(20000, 1, 1, 1))
    log_s = seen[0].log()
    assert log_s.mean().item() == pytest.approx(-1.2, abs=0.03)
    assert log_s.std().item() == pytest.approx(1.2, abs=0.03)


def test_karras_sigmas_equal_edm_float64_values():
    t = E.karras_sigmas(18, 0.002, 80, 7)
    assert t.dtype == torch.float64 and len(t) == 19
    want = {
        0: 80.0,
        1: 57.58598472124816,
        2: 40.78557379650796,
        3: 28.374584604156844,
        16: 0.0075280199627840785,
        17: 0.002000000000000003,
        18: 0.0,
    }
    for i, v in want.items():
        assert abs(t[i].item() - v) < 1e-12, (i, t[i].item(), v)
    assert (t[:-1] > t[1:]).all()
    assert E.karras_sigmas(1).tolist() == [80.0, 0.0]


# Exact denoisers: D(x; s) = E[y | y + s n = x] for known data distributions.
MU, S0 = torch.tensor([0.3, -0.6], dtype=torch.float64), 0.5


def gaussian_denoiser(x, s, class_labels=None):
    s = torch.as_tensor(s, dtype=torch.float64)
    return MU + S0**2 / (S0**2 + s**2) * (x - MU)


MIX_MU, MIX_S0, MIX_W = torch.tensor([[-1.0, -1.0], [1.0, 1.0]], dtype=torch.float64), 0.2, [0.3, 0.7]


def mixture_denoiser(x, s, class_labels=None):
    s = torch.as_tensor(s, dtype=torch.float64)
    var = MIX_S0**2 + s**2  # marginal variance of each component at noise level s
    logits = (
        -((x[:, None, :] - MIX_MU) ** 2).sum(-1) / (2 * var) + torch.tensor(MIX_W, dtype=torch.float64).log()
    )
    post = logits.softmax(dim=1)  # [N, 2] posterior of the component
    means = MIX_MU + MIX_S0**2 / var * (x[:, None, :] - MIX_MU)  # [N, 2, D]
    return (post[:, :, None] * means).sum(1)


def heun_error(denoiser, noise, exact, N):
    x, nfe = E.sample(denoiser, noise, 2 * N - 1)
    assert nfe == 2 * N - 1
    return (x.double() - exact).abs().max().item()


def test_heun_lands_on_closed_form_for_gaussian_data_with_second_order_error():
    noise = torch.randn(64, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_T = 80.0 * noise
    exact = MU + (x_T - MU) * S0 / math.sqrt(S0**2 + 80.0**2)  # x(0) of the probability-flow ODE
    scale = (exact - MU).abs().max().item()
    errors = [heun_error(gaussian_denoiser, noise, exact, N) / scale for N in (9, 18, 36, 72)]
    # relative errors ~[0.28, 0.055, 0.012, 0.003] (an independent scalar Heun gives the same)
    assert errors[1] < 0.07 and errors[3] < 5e-3, errors
    ratios = [b / a for a, b in zip(errors, errors[1:], strict=False)]
    assert all(r < 0.3 for r in ratios), (errors, ratios)  # 2nd order: doubling N divides the error by ~4


def test_heun_converges_for_a_gaussian_mixture():
    noise = torch.randn(16, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def ode(s, x):  # dx/ds = (x - D(x; s)) / s, EDM Eq. 4 with sigma(t) = t; an independent reference solve
        x = torch.from_numpy(x).view(-1, 2)
        return ((x - mixture_denoiser(x, s)) / s).flatten().numpy()

    ref = solve_ivp(
        ode, (80.0, 1e-9), (80.0 * noise).flatten().numpy(), method="DOP853", rtol=1e-11, atol=1e-11
    )
    exact = torch.from_numpy(ref.y[:, -1]).view(-1, 2)
    errors = [heun_error(mixture_denoiser, noise, exact, N) for N in (9, 18, 36, 72)]
    assert all(b < a / 3 for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 5e-3, errors
    # every sample ends in one of the two modes
    d = torch.cdist(exact, MIX_MU).min(1).values
    assert (d < 5 * MIX_S0).all()


class CountingNet:
    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, s, class_labels=None):
        self.calls += 1
        return self.denoiser(x, s)


@pytest.mark.parametrize(
    "nfe,steps,expected", [(35, None, 35), (79, None, 79), (1, None, 1), (4, None, 3), (None, 5, 9)]
)
def test_sample_reports_true_nfe(nfe, steps, expected):
    net = CountingNet(gaussian_denoiser)
    _, used = E.sample(net, torch.randn(4, 2, dtype=torch.float64), nfe or 0, steps=steps)
    assert net.calls == used == expected


def test_churn_is_seeded_and_keeps_nfe():
    noise = torch.randn(8, 2, dtype=torch.float64)
    kw = dict(S_churn=10.0, S_min=0.05, S_max=50.0)
    a, n_a = E.sample(gaussian_denoiser, noise, 35, generator=torch.Generator().manual_seed(3), **kw)
    b, _ = E.sample(gaussian_denoiser, noise, 35, generator=torch.Generator().manual_seed(3), **kw)
    c, _ = E.sample(gaussian_denoiser, noise, 35)
    assert n_a == 35 and torch.equal(a, b) and not torch.allclose(a, c)


def test_per_image_seeds_do_not_depend_on_batching():
    noise, labels = E.noise_for_seeds(range(10, 16), (3, 4, 4), label_dim=10)
    noise2, labels2 = E.noise_for_seeds([13], (3, 4, 4), label_dim=10)
    assert torch.equal(noise[3:4], noise2) and torch.equal(labels[3:4], labels2)
    assert labels.dtype == torch.int64 and ((labels >= 0) & (labels < 10)).all()
    assert np.isclose(noise.std().item(), 1, atol=0.2)

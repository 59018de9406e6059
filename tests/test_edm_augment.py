"""EDM's geometric augmentation (App. F.2): identity at p = 0, each transform moving pixels as its matrix says,
the 9-dim labels, the draw frequencies of EDM's CIFAR-10 configuration, and the recipe defaults."""

import math

import pytest
import torch

import aot_edm as A
import edm_teacher as E
from conftest import TINY_NET

KEYS = ("xflip", "yflip", "scale", "rotate", "aniso", "aniso_angle", "tx", "ty")
H = W = 32
# centred pixel coordinates, as the pipeline's matrices use them (x to the right, y down)
YY, XX = torch.meshgrid(torch.arange(H) - (H - 1) / 2, torch.arange(W) - (W - 1) / 2, indexing="ij")


def blob(x, y):
    """A smooth off-centre test image f(x, y): resampling errors stay small, wrong conventions do not."""
    return torch.exp(-((x - 4) ** 2 + (y + 2) ** 2) / (2 * 3.0**2))


def forced(**values):
    a = {k: torch.zeros(1) for k in KEYS}
    for k, v in values.items():
        a[k][:] = v
    return a


def augment_blob(**values):
    img = blob(XX, YY)[None, None].repeat(1, 3, 1, 1)
    out, labels = E.edm_augment(img, 0.12, a=forced(**values))
    return out[0], labels[0]


def test_p_zero_is_the_identity_with_zero_labels():
    x = torch.randn(64, 3, 8, 8)
    out, labels = E.edm_augment(x, 0.0)
    assert torch.equal(out, x) and labels.shape == (64, 9) and not labels.any()


@pytest.mark.parametrize("key, dim", [("xflip", 3), ("yflip", 2)])
def test_flips_equal_torch_flip_and_say_so_in_the_label(key, dim):
    x = torch.randn(2, 3, 8, 8)
    a = {k: torch.zeros(2) for k in KEYS}
    a[key][0] = 1  # image 0 flipped, image 1 not
    out, labels = E.edm_augment(x, 0.12, a=a)
    assert torch.equal(out[0], x[0].flip(dim - 1)) and torch.equal(out[1], x[1])
    expect = torch.zeros(2, 9)
    expect[0, KEYS.index(key)] = 1
    assert torch.equal(labels, expect)


S = 2**0.2  # one standard deviation of EDM's log2 scale (scale_std = aniso_std = 0.2)
# out(p) = f(G_inv p), with G_inv written out by hand from EDM's definitions for one forced parameter each
CASES = {
    "rotate +90": (dict(rotate=math.pi / 2), lambda x, y: blob(-y, x), [0, 0, 0, -1, 1, 0, 0, 0, 0]),
    "scale +1 std": (dict(scale=1.0), lambda x, y: blob(x / S, y / S), [0, 0, 1, 0, 0, 0, 0, 0, 0]),
    "aniso +1 std": (dict(aniso=1.0), lambda x, y: blob(x / S, y * S), [0, 0, 0, 0, 0, 1, 0, 0, 0]),
    "aniso at 90 deg": (
        dict(aniso=1.0, aniso_angle=math.pi / 2),
        lambda x, y: blob(x * S, y / S),
        [0, 0, 0, 0, 0, 0, 1, 0, 0],
    ),
    "translate x +1 std": (dict(tx=1.0), lambda x, y: blob(x - 0.125 * W, y), [0, 0, 0, 0, 0, 0, 0, 1, 0]),
    "translate y -1 std": (dict(ty=-1.0), lambda x, y: blob(x, y + 0.125 * H), [0, 0, 0, 0, 0, 0, 0, 0, -1]),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_transform_moves_pixels_as_its_matrix_says(name):
    values, expect, label = CASES[name]
    out, labels = augment_blob(**values)
    err = (out - expect(XX, YY)).abs().max().item()
    assert err < 0.03, (name, err)  # anti-aliased bilinear resampling of a smooth image
    assert (out - blob(XX, YY)).abs().max() > 0.15  # and the image did move (5x the tolerance above)
    assert torch.allclose(labels, torch.tensor(label, dtype=torch.float32), atol=1e-6)
    assert torch.allclose(out[0], out[1]) and torch.allclose(out[1], out[2])  # channels alike


def test_rotation_direction_and_composed_labels():
    out, _ = augment_blob(rotate=math.pi / 2)
    assert (out - blob(YY, -XX)).abs().max() > 0.5  # the other direction would be far off
    a = forced(rotate=0.3, aniso=-0.7, aniso_angle=0.4, scale=0.5, tx=0.2, ty=-0.1, xflip=1)
    labels = E.augment_labels(a)[0]
    expect = [
        1,
        0,
        0.5,
        math.cos(0.3) - 1,
        math.sin(0.3),
        -0.7 * math.cos(0.4),
        -0.7 * math.sin(0.4),
        0.2,
        -0.1,
    ]
    assert torch.allclose(labels, torch.tensor(expect, dtype=torch.float32), atol=1e-6)


def test_draws_follow_edms_cifar10_probabilities():
    n, p = 20000, 0.12
    labels = E.augment_labels(E.augment_draw(n, p, torch.Generator().manual_seed(0)))
    rate = (labels != 0).float().mean(0)
    tol = 4 * math.sqrt(0.25 / n)
    # x-flip: always drawn (EDM's multiplier 1e8), flips half; y-flip: p, then half; the rest: p
    assert abs(rate[0] - 0.5) < tol and abs(rate[1] - p / 2) < tol
    for col in (2, 3, 4, 5, 7, 8):
        assert abs(rate[col] - p) < tol, (col, rate[col])
    assert abs(rate[6] - p / 2) < tol  # the anisotropy axis is rotated in half of the draws
    angle = torch.atan2(labels[:, 4], labels[:, 3] + 1)[labels[:, 4] != 0]
    assert angle.min() < -3.0 and angle.max() > 3.0  # arbitrary rotation: the whole circle


def test_recipe_defaults_and_bad_flags():
    for data in ("cifar10", "x.npy", "x.npz", "shapes"):  # EDM's train.py: p = 0.12 whatever the dataset
        args = E.parse_args(["--data", data])
        assert args.augment == 0.12 and args.augment_dim == 9, data
    args = E.parse_args(["--data", "x.npy", "--augment", "0"])
    assert args.augment == 0.0 and args.augment_dim == 0
    assert E.parse_args(["--data", "x.npy", "--augment", "0", "--augment-dim", "9"]).augment_dim == 9
    for bad in (["--augment", "0.2", "--augment-dim", "0"], ["--augment", "1.5"], ["--augment-dim", "4"]):
        with pytest.raises(SystemExit):
            E.parse_args(["--data", "shapes", *bad])
    for data in ("cifar10", "x.npz"):  # aot_edm: the same default for every dataset
        args = A.parse_args(["--data", data])
        assert args.augment == 0.12 and args.augment_dim == 9, data
    assert A.parse_args(["--data", "x.npz", "--augment", "0"]).augment_dim == 0


def test_net_with_augment_dim_gets_zero_labels_and_a_gradient_without_augmentation():
    torch.manual_seed(0)
    net = E.build_net(dict(img_resolution=16, img_channels=3, augment_dim=9, dropout=0.0, **TINY_NET))
    with torch.no_grad():
        net.model.map_augment.weight.normal_()
    x, sigma = torch.randn(2, 3, 16, 16), torch.tensor([0.5, 2.0])
    assert torch.equal(net(x, sigma), net(x, sigma, augment_labels=torch.zeros(2, 9)))
    assert not torch.equal(net(x, sigma), net(x, sigma, augment_labels=torch.ones(2, 9)))
    net(x, sigma).square().sum().backward()
    assert net.model.map_augment.weight.grad is not None  # in the graph: DDP finds every parameter used

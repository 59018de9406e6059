"""The shared UNet block against the reference networks it mirrors: NVlabs/edm's SongUNet (DDPM++, NCSN++) and
DhariwalUNet, torchcfm's guided-diffusion UNet (fixtures made by running their own code, numbers only)."""

import json
import os

import pytest
import torch

import edm_teacher as E
from conftest import TINY_NET

DATA = os.path.join(os.path.dirname(__file__), "data")


U = E  # the UNet block, as every method file carries it (tests/test_runtime.py keeps the copies identical)
CIFAR = dict(img_resolution=32, img_channels=3, augment_dim=9, dropout=0.13)  # EDM's DDPM++ CIFAR-10 config


@pytest.mark.parametrize("label_dim,count", [(0, 55_733_891), (10, 55_735_299)])
def test_cifar10_ddpmpp_parameter_count_and_keys_equal_edm(label_dim, count):
    torch.manual_seed(0)
    net = E.build_net(dict(CIFAR, label_dim=label_dim))
    assert sum(p.numel() for p in net.parameters()) == count
    # edm_ddpmpp_cifar10_keys.json: EDMPrecond(SongUNet) state_dict (key, shape) list, NVlabs/edm @ 008a4e5
    with open(os.path.join(DATA, "edm_ddpmpp_cifar10_keys.json")) as f:
        ref = json.load(f)["cond" if label_dim else "uncond"]
    mine = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert mine == ref  # same keys, same shapes, same order: official checkpoints load strictly by key


def test_output_equals_edm_reference_network_on_random_weights():
    # edm_songunet_tiny_ref.pt: a tiny SongUNet (EDM's code) with random weights, its inputs and its output D.
    ref = torch.load(os.path.join(DATA, "edm_songunet_tiny_ref.pt"), weights_only=True)
    net = E.build_net(
        dict(img_resolution=16, img_channels=3, label_dim=4, augment_dim=9, dropout=0.0, **TINY_NET)
    )
    net.load_state_dict(ref["state_dict"], strict=True)
    net.eval()
    with torch.no_grad():
        d = net(ref["x"], ref["sigma"], ref["class_labels"], augment_labels=ref["augment_labels"])
        d_int = net(
            ref["x"], ref["sigma"], ref["class_labels"].argmax(1), augment_labels=ref["augment_labels"]
        )
    torch.testing.assert_close(d, ref["D"], rtol=0, atol=1e-5)
    torch.testing.assert_close(d_int, d)  # int labels are one-hot encoded like EDM's
    c_skip = E.edm_precond(ref["sigma"].view(-1, 1, 1, 1))[0]
    assert (ref["D"] - c_skip * ref["x"]).abs().mean() > 1e-2  # the network part is not negligible


def test_shapes_labels_and_dropout():
    torch.manual_seed(0)
    net = E.build_net(dict(img_resolution=16, img_channels=3, label_dim=5, dropout=0.5, **TINY_NET))
    with torch.no_grad():
        for p in net.parameters():  # move away from EDM's near-zero init of the output layers
            p.add_(torch.randn_like(p) * 0.05)
    x, sigma = torch.randn(4, 3, 16, 16), torch.full([4], 1.0)
    net.eval()
    a = net(x, sigma, torch.tensor([0, 1, 2, 3]))
    b = net(x, sigma, torch.tensor([4, 4, 4, 4]))
    assert a.shape == x.shape and a.dtype == torch.float32
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4  # the label changes every output
    assert torch.equal(a, net(x, sigma, torch.tensor([0, 1, 2, 3])))  # eval: deterministic
    net.train()
    assert not torch.equal(net(x, sigma, torch.tensor([0, 1, 2, 3])), a)  # train: dropout active
    net.eval()
    torch.testing.assert_close(
        net(x, torch.tensor(1.0), torch.tensor([0, 1, 2, 3])), a
    )  # scalar sigma broadcasts


ADM_TINY = dict(img_resolution=16, img_channels=3, label_dim=4, augment_dim=9, model_channels=64,
                channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.0)  # fmt: skip


def test_adm_imagenet64_keys_shapes_order_and_count_equal_edm():
    # edm_adm_keys.json: EDMPrecond(model_type="DhariwalUNet") state_dict (key, shape) lists made by NVlabs/edm's
    # code at EDM's ImageNet-64 configuration (label_dim 1000) and at a tiny one, with parameter counts
    with open(os.path.join(DATA, "edm_adm_keys.json")) as f:
        ref = json.load(f)
    kw = dict(arch="adm", img_resolution=64, img_channels=3, label_dim=1000, model_channels=192,
              channel_mult=[1, 2, 3, 4], num_blocks=3, attn_resolutions=[32, 16, 8])  # fmt: skip
    with torch.device("meta"):  # 296M parameters: shapes only, no memory
        net = E.build_net(kw)
    assert [[k, list(v.shape)] for k, v in net.state_dict().items()] == ref["imagenet64_cond"]
    assert sum(p.numel() for p in net.parameters()) == ref["imagenet64_cond_params"] == 295_899_267
    tiny = E.build_net(dict(ADM_TINY, arch="adm"))
    assert [[k, list(v.shape)] for k, v in tiny.state_dict().items()] == ref["tiny"]
    heads = {name: b.heads for name, b in tiny.model.dec.items() if getattr(b, "heads", 0)}
    assert heads == {"8x8_in0": 2, "8x8_block0": 2, "8x8_block1": 2}  # 128 channels / 64 per head


def fill_like_the_fixture(net, prefix=""):
    """The fixture's weights: each tensor from its own seed (crc32 of prefix + its key), so no weights are stored."""
    import zlib

    with torch.no_grad():
        for k, v in net.state_dict().items():
            if v.is_floating_point() and not k.endswith("resample_filter"):
                g = torch.Generator().manual_seed(zlib.crc32((prefix + k).encode()))
                norm = 1.0 if "norm" in k and k.endswith("weight") else 0.0
                v.copy_(torch.randn(v.shape, generator=g) * 0.1 + norm)


def test_adm_output_equals_edm_dhariwal_unet_on_random_weights():
    # edm_adm_tiny_ref.pt: inputs and outputs of EDM's EDMPrecond(DhariwalUNet) with fill_like_the_fixture's
    # weights (2 attention heads, class and augment labels)
    ref = torch.load(os.path.join(DATA, "edm_adm_tiny_ref.pt"), weights_only=True)
    net = E.build_net(dict(ADM_TINY, arch="adm")).eval()
    fill_like_the_fixture(net)
    with torch.no_grad():
        d = net(ref["x"], ref["sigma"], ref["class_labels"], augment_labels=ref["augment_labels"])
        d0 = net(ref["x"], ref["sigma"], ref["class_labels"].argmax(1))
    torch.testing.assert_close(d, ref["D"], rtol=0, atol=2e-5)
    torch.testing.assert_close(d0, ref["D_no_augment"], rtol=0, atol=2e-5)  # no labels = zero labels
    assert (ref["D"] - ref["D_no_augment"]).abs().max() > 1e-2  # and the augment labels matter


def test_unknown_arch_is_an_error():
    with pytest.raises(ValueError, match="unknown network architecture"):
        E.build_net(dict(arch="unet3d", img_resolution=16, img_channels=3))
    choices = r"unknown network architecture 'unet3d': use one of \['adm', 'adm-cfm', 'ddpmpp', 'ncsnpp'\]"
    with pytest.raises(ValueError, match=choices):
        U.make_unet("unet3d", 16, 3, 3)


def test_flow_files_build_adm_velocity_nets_from_net_kwargs():
    import cfm_couplings
    import dansm
    import loom_cfm

    kw = dict(img_resolution=16, img_channels=3, arch="adm", model_channels=64, channel_mult=[1, 2],
              num_blocks=1, attn_resolutions=[8], dropout=0.0)  # fmt: skip
    for module in (cfm_couplings, loom_cfm, dansm):
        net = module.build_net(kw)
        assert isinstance(net.model, module.ADMUNet) and "model.out_conv.weight" in net.state_dict()
        v = net(torch.randn(2, 3, 16, 16), torch.tensor([0.1, 0.9]))
        assert v.shape == (2, 3, 16, 16) and torch.isfinite(v).all()


def keys_and_shapes(net):
    return [[k, list(v.shape)] for k, v in net.state_dict().items()]


def edm_denoiser(net, x, sigma, class_labels, augment_labels=None, sigma_data=0.5):
    """EDM's D(x; sigma) (EDMPrecond) around a bare UNet of the block."""
    s = sigma.reshape(-1, 1, 1, 1)
    c_skip, c_in = sigma_data**2 / (s**2 + sigma_data**2), 1 / (sigma_data**2 + s**2).sqrt()
    c_out = s * sigma_data / (s**2 + sigma_data**2).sqrt()
    return c_skip * x + c_out * net(c_in * x, sigma.log() / 4, class_labels, augment_labels)


@pytest.mark.parametrize("arch", ["ddpmpp", "adm"])
def test_block_ddpmpp_and_adm_equal_edm_reference_networks(arch):
    # the block's own make_unet (no precond) against the fixtures of the tests above
    if arch == "ddpmpp":
        ref = torch.load(os.path.join(DATA, "edm_songunet_tiny_ref.pt"), weights_only=True)
        net = U.make_unet("ddpmpp", 16, 3, 3, label_dim=4, augment_dim=9, dropout=0.0, **TINY_NET).eval()
        net.load_state_dict({k.removeprefix("model."): v for k, v in ref["state_dict"].items()}, strict=True)
    else:
        ref = torch.load(os.path.join(DATA, "edm_adm_tiny_ref.pt"), weights_only=True)
        kw = {k: v for k, v in ADM_TINY.items() if k not in ("img_resolution", "img_channels")}
        net = U.make_unet("adm", 16, 3, 3, **kw).eval()
        fill_like_the_fixture(net, prefix="model.")
    with torch.no_grad():
        d = edm_denoiser(net, ref["x"], ref["sigma"], ref["class_labels"], ref["augment_labels"])
    torch.testing.assert_close(d, ref["D"], rtol=0, atol=2e-5)


NCSN_TINY = dict(label_dim=4, augment_dim=9, model_channels=16, channel_mult=[1, 2, 2], num_blocks=1,
                 attn_resolutions=[8], dropout=0.0)  # fmt: skip


def test_ncsnpp_cifar10_keys_shapes_order_and_count_equal_edm():
    # edm_ncsnpp_cifar10_keys.json: (key, shape) lists of NVlabs/edm's SongUNet as its train.py --arch ncsnpp
    # builds it (EDM's VE networks), at EDM's class-conditional CIFAR-10 configuration and at a tiny one
    with open(os.path.join(DATA, "edm_ncsnpp_cifar10_keys.json")) as f:
        ref = json.load(f)
    kw = dict(label_dim=10, augment_dim=9, model_channels=128, channel_mult=[2, 2, 2], num_blocks=4,
              attn_resolutions=[16], dropout=0.13)  # fmt: skip
    with torch.device("meta"):
        net = U.make_unet("ncsnpp", 32, 3, 3, **kw)
    assert keys_and_shapes(net) == ref["cifar10_cond"]
    assert len(net.state_dict()) == ref["cifar10_cond_tensors"] == 434
    assert sum(p.numel() for p in net.parameters()) == ref["cifar10_cond_params"] == 56_400_643
    tiny = U.make_unet("ncsnpp", 16, 3, 3, **NCSN_TINY)
    assert keys_and_shapes(tiny) == ref["tiny"]
    assert sum(p.numel() for p in tiny.parameters()) == ref["tiny_params"]
    assert keys_and_shapes(U.make_unet("ddpmpp", 16, 3, 3, **NCSN_TINY)) != ref["tiny"]


def test_ncsnpp_output_equals_edm_songunet_on_random_weights():
    # edm_ncsnpp_tiny_ref.pt: inputs and outputs of NVlabs/edm's NCSN++ SongUNet (Fourier noise embedding,
    # [1, 3, 3, 1] resampling, residual encoder path, two down-samplings) with fill_like_the_fixture's weights
    ref = torch.load(os.path.join(DATA, "edm_ncsnpp_tiny_ref.pt"), weights_only=True)
    net = U.make_unet("ncsnpp", 16, 3, 3, **NCSN_TINY).eval()
    fill_like_the_fixture(net)
    with torch.no_grad():
        y = net(ref["x"], ref["noise_labels"], ref["class_labels"], ref["augment_labels"])
        y0 = net(ref["x"], ref["noise_labels"], ref["class_labels"])
    torch.testing.assert_close(y, ref["F"], rtol=0, atol=1e-5)
    torch.testing.assert_close(y0, ref["F_no_augment"], rtol=0, atol=1e-5)
    assert (ref["F"] - ref["F_no_augment"]).abs().max() > 1e-2


CFM_TINY = dict(label_dim=5, model_channels=32, channel_mult=[1, 2, 4], num_blocks=1, attn_resolutions=[8, 4],
                dropout=0.0)  # fmt: skip


def test_adm_cfm_cifar10_keys_shapes_order_and_count_equal_torchcfm():
    # torchcfm_adm_cifar10_keys.json: (key, shape) lists of torchcfm's UNetModelWrapper(dim=(3, 32, 32),
    # num_res_blocks=2, num_channels=128, channel_mult=[1, 2, 2, 2], num_heads=4, num_head_channels=64,
    # attention_resolutions="16", dropout=0.1) (LOOM's CIFAR-10 net), also with 10 classes, and a tiny one
    with open(os.path.join(DATA, "torchcfm_adm_cifar10_keys.json")) as f:
        ref = json.load(f)
    kw = dict(model_channels=128, channel_mult=[1, 2, 2, 2], num_blocks=2, attn_resolutions=[16], dropout=0.1)
    with torch.device("meta"):
        net = U.make_unet("adm-cfm", 32, 3, 3, **kw)
        cond = U.make_unet("adm-cfm", 32, 3, 3, label_dim=10, **kw)
    assert keys_and_shapes(net) == ref["cifar10"] and keys_and_shapes(cond) == ref["cifar10_cond"]
    assert sum(p.numel() for p in net.parameters()) == ref["cifar10_params"] == 35_746_307
    assert sum(p.numel() for p in cond.parameters()) == ref["cifar10_cond_params"]
    assert keys_and_shapes(U.make_unet("adm-cfm", 32, 3, 3)) == ref["cifar10"]  # the defaults
    tiny = U.make_unet("adm-cfm", 16, 3, 3, **CFM_TINY)
    assert keys_and_shapes(tiny) == ref["tiny"]
    assert sum(p.numel() for p in tiny.parameters()) == ref["tiny_params"]
    with pytest.raises(ValueError, match="augment_dim"):
        U.make_unet("adm-cfm", 16, 3, 3, augment_dim=9)


def test_adm_cfm_output_equals_torchcfm_on_random_weights():
    # torchcfm_adm_tiny_ref.pt: inputs (t, x, labels) and output v of torchcfm's class-conditional
    # UNetModelWrapper with fill_like_the_fixture's weights (heads of 64 channels: 1 at 8x8, 2 at 4x4)
    ref = torch.load(os.path.join(DATA, "torchcfm_adm_tiny_ref.pt"), weights_only=True)
    net = U.make_unet("adm-cfm", 16, 3, 3, **CFM_TINY).eval()
    fill_like_the_fixture(net)
    with torch.no_grad():
        v = net(ref["x"], ref["t"], ref["class_labels"])
        v_other = net(ref["x"], ref["t"], torch.eye(5)[[1, 1, 1]])
    torch.testing.assert_close(v, ref["v"], rtol=0, atol=1e-5)
    assert (v - v_other).abs().max() > 1e-3  # the labels matter


def test_adm_cfm_init_dropout_and_gradients():
    torch.manual_seed(0)
    net = U.make_unet("adm-cfm", 16, 3, 3, **dict(CFM_TINY, dropout=0.5))
    sd = net.state_dict()
    zero = [k for k in sd if k.startswith("out.2.") or ".out_layers.3." in k or ".proj_out." in k]
    assert zero and all(sd[k].abs().max() == 0 for k in zero)  # zero_module, as torchcfm
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([0.2, 0.8]), torch.eye(5)[[0, 3]]
    assert torch.equal(net(x, t, y), torch.zeros(2, 3, 16, 16))  # zero output layer: v = 0 at init
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    net.eval()
    a = net(x, t, y)
    assert torch.equal(a, net(x, t, y))  # eval: deterministic
    assert not torch.equal(net.train()(x, t, y), a)  # train: dropout active
    a.square().mean().backward()
    assert all(p.grad is not None for p in net.parameters())

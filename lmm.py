"""LMM: Generative Lines Matching Models (Matityahu & Fattal, 2024).

A deterministic teacher sampler pairs each noise x0 with an image x1 (gen_pairs.py). N_theta learns the
straight lines between them: from any x_sigma = x1 + sigma x0 it predicts the line's end x1 (Eq. 3), with
EDM's preconditioning and an L2 or LPIPS distance; then CTM's adversarial phase adds a hinge loss against real
images with VQGAN's adaptive weight (Eq. 5). Sampling (App. A.4): x = sigma_max noise, then x_hat =
N_theta(x, sigma_t), x = x_hat + sigma_t' eta over a few indices t of EDM's schedule (Table 7).
Convention: x0 ~ N(0, I) is the noise, x1 the image in [-1, 1], sigma in [0.002, 80] (80: the noise end).
Choices the paper leaves open are flags, explained in docs/lmm.md. Commands: a CPU smoke run on pairs of
gen_pairs.py; the paper's CIFAR-10 run (Table 6; D's real images: the dataset the pairs' meta names);
50,000 images at Table 7's step indices (0, 1) on one GPU (many GPUs: gen_pairs.py, evaluate.py):
    python lmm.py --pairs pairs_shapes.npz --outdir runs/lmm-shapes --tiny --loss l2 --adv-start off
    torchrun --standalone --nproc_per_node=4 lmm.py --pairs pairs_cifar10.npz --cond
    python lmm.py --generate 50000 --ckpt runs/lmm --nfe 2 --out lmm-nfe2.npz    # or --step-indices 0,3,5
"""

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import re
import signal
import struct
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import save_image

METHOD = "lmm"  # equals the file name
VERSION = 1
NFE_STEPS = {1: (0,), 2: (0, 1), 3: (0, 3, 5), 4: (0, 1, 3, 5)}  # LMM Table 7: the step indices per NFE
SCHEDULE = dict(steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0)  # EDM's CIFAR-10 schedule (App. A.4)


# --- LMM: the lines, their loss, the sampler ---


def lmm_schedule(steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """LMM App. A.4 (EDM Eq. 5), the levels that Table 7's step indices t = 0..N-1 index, float64."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + torch.arange(steps, dtype=torch.float64) / max(steps - 1, 1) * (b - a)) ** rho


def draw_sigma(n, sot=None, schedule=None, device="cpu"):
    """sigma [n] for Eq. 3 (global RNG): EDM's schedule at a continuous u ~ U[0, 1] (the paper does not say;
    docs/lmm.md), or SOT (Sec. 3): uniform over the schedule's levels at the indices `sot`."""
    s = dict(SCHEDULE, **(schedule or {}))
    if sot:
        levels = lmm_schedule(**s)[list(sot)].float().to(device)
        return levels[torch.randint(len(levels), (n,), device=device)]
    a, b = s["sigma_max"] ** (1 / s["rho"]), s["sigma_min"] ** (1 / s["rho"])
    return (a + torch.rand(n, device=device) * (b - a)) ** s["rho"]


def lmm_loss(net, x0, x1, sigma, labels=None, distance=None):
    """LMM Eq. 3: distance(N_theta(x1 + sigma x0, sigma), x1) per pair (None: mean square), N_theta's x1."""
    x1_hat = net(x1 + sigma.reshape(-1, 1, 1, 1) * x0, sigma, class_labels=labels)  # a point of the line
    return (x1_hat - x1).square().flatten(1).mean(1) if distance is None else distance(x1_hat, x1), x1_hat


def make_lpips(device, random_trunk=False):
    """LPIPS-VGG of the `lpips` package, frozen; random_trunk: a random VGG16 (tests, offline)."""
    import lpips

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation of `pretrained=` inside lpips
            model = lpips.LPIPS(net="vgg", pnet_rand=random_trunk, verbose=False)
    except Exception as e:
        fail(f"cannot load the VGG16 weights for LPIPS ({type(e).__name__}): put vgg16-397923af.pth in"
             f" {torch.hub.get_dir()}/checkpoints/ (under $TORCH_HOME) or use --loss l2")  # fmt: skip
    return model.eval().requires_grad_(False).to(device)


def lpips_distance(model, a, b, res):
    """LPIPS of images in [-1, 1], both bilinearly resized to res x res first (LMM App. A.4: 224), [N]."""
    if a.shape[-1] != res:
        a, b = (F.interpolate(v, size=(res, res), mode="bilinear", align_corners=False) for v in (a, b))
    return model(a, b).flatten()


@torch.no_grad()
def lmm_sampler(net, noise, sigmas, steps, labels=None, generator=None):
    """LMM App. A.4: x = sigma_{t_0} noise; at each index t, x_hat = N_theta(x, sigma_t), then x = x_hat +
    sigma_t' eta (t' the next index; eta from a generator, or one per image); the last x_hat is the sample."""
    x = noise.float() * float(sigmas[steps[0]])
    for k, t in enumerate(steps):
        x_hat = net(x, torch.full((x.shape[0],), float(sigmas[t]), device=x.device), class_labels=labels)
        if k == len(steps) - 1:
            return x_hat.float()
        if isinstance(generator, (list, tuple)):  # one generator per image: independent of the batching
            eta = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator]).to(x.device)
        else:
            eta = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        x = x_hat.float() + float(sigmas[steps[k + 1]]) * eta


def nfe_steps(nfe, n=18, steps=None):
    """Step indices on an n-level schedule: `steps` checked, or Table 7's (NFE 1-4), or spread evenly."""
    if steps is None and not 1 <= nfe <= n:
        raise ValueError(f"LMM takes 1..{n} evaluations on a {n}-level schedule, not {nfe}")
    if steps is None:
        steps = NFE_STEPS[nfe] if NFE_STEPS.get(nfe, (n,))[-1] < n else np.linspace(0, n - 1, nfe).round()
    if not len(steps) or min(steps) < 0 or max(steps) >= n:
        raise ValueError(f"step indices {list(steps)} must lie in 0..{n - 1} (the schedule's levels)")
    return tuple(int(t) for t in steps)


# --- the adversarial phase: LMM Eq. 5 as CTM (hinge losses, VQGAN's adaptive weight, DiffAugment, its D) ---


def adaptive_weight(loss_lines, loss_g, last_layer, clamp=(0.01, 10.0), eps=1e-4):
    """VQGAN's adaptive weight (Esser et al. Eq. 7; LMM App. A.4), detached, clipped to [0.01, 10] as CTM:
    lambda_adapt = ||grad_W L_lines|| / (||grad_W L_G|| + 1e-4), W the last layer; global batch under DDP."""
    (g_lines,) = torch.autograd.grad(loss_lines, last_layer, retain_graph=True)
    (g_adv,) = torch.autograd.grad(loss_g, last_layer, retain_graph=True)
    if torch.distributed.is_initialized():
        g = torch.stack([g_lines, g_adv]) / torch.distributed.get_world_size()
        torch.distributed.all_reduce(g)
        g_lines, g_adv = g[0], g[1]
    return (g_lines.norm() / (g_adv.norm() + eps)).clamp(*clamp).detach()


def d_hinge_loss(d_real, d_fake):  # CTM's form of Eq. 5 for D, the mean over images and patch logits
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()


def g_hinge_loss(d_fake):
    return -d_fake.mean()


AUGMENT = ("color", "translation", "cutout")  # CTM's DiffAugment policy, for real and fake images alike


def diff_augment(x, policy=AUGMENT, translation=0.125, cutout=0.2):
    """DiffAugment (Zhao et al. 2020) per image (global RNG): colour, a shift with zero fill, a cutout."""
    (n, _, h, w), dev = x.shape, x.device
    rand = lambda: torch.rand(n, 1, 1, 1, device=dev)  # noqa: E731
    yy, xx = torch.arange(h, device=dev).reshape(1, h, 1), torch.arange(w, device=dev).reshape(1, 1, w)
    if "color" in policy:
        x = x + (rand() - 0.5)
        mean = x.mean(1, keepdim=True)  # one node each: the gradients sum as in DiffAugment's code
        x = (x - mean) * (rand() * 2) + mean
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * (rand() + 0.5) + mean
    if "translation" in policy:
        sy, sx = int(h * translation + 0.5), int(w * translation + 0.5)
        dy, dx = (torch.randint(-s, s + 1, (n, 1, 1), device=dev) for s in (sy, sx))
        sy, sx = yy - dy, xx - dx  # output (y, x) shows input (sy, sx)
        inside = ((sy >= 0) & (sy < h) & (sx >= 0) & (sx < w)).unsqueeze(1)
        flat = (sy.clamp(0, h - 1) * w + sx.clamp(0, w - 1)).reshape(n, 1, h * w)
        x = x.flatten(2).gather(2, flat.expand(-1, x.shape[1], -1)).reshape(x.shape) * inside
    if "cutout" in policy:
        ch, cw = int(h * cutout + 0.5), int(w * cutout + 0.5)
        cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=dev) - ch // 2
        cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=dev) - cw // 2
        x = x * ~((yy >= cy) & (yy < cy + ch) & (xx >= cx) & (xx < cx + cw)).unsqueeze(1)
    return x


_sn = nn.utils.parametrizations.spectral_norm


class PatchDisc(nn.Module):
    """--disc patch (offline, the tests' fast path): spectral-norm convs, patch logits, class projection."""

    def __init__(self, img_channels, label_dim=0, width=64):
        super().__init__()
        layers, c = [_sn(nn.Conv2d(img_channels, width, 3, 1, 1)), nn.LeakyReLU(0.2)], width
        for _ in range(3):
            layers, c = layers + [_sn(nn.Conv2d(c, 2 * c, 4, 2, 1)), nn.LeakyReLU(0.2)], 2 * c
        self.body, self.out = nn.Sequential(*layers), _sn(nn.Conv2d(c, 1, 3, 1, 1))
        self.embed = _sn(nn.Linear(label_dim, c, bias=False)) if label_dim else None

    def forward(self, x, onehot=None, augment=()):
        h = self.body(diff_augment(x, augment) if augment else x)
        logits = self.out(h)
        if self.embed is not None:
            logits = logits + (self.embed(onehot)[:, :, None, None] * h).sum(1, keepdim=True)
        return logits.flatten(1)  # [N, patches]


# --disc ctm: CTM's discriminator (Kim et al. 2024; sony/ctm pg_modules: Projected GAN, StyleGAN-XL)
CTM_BACKBONES = ("deit_base_distilled_patch16_224", "tf_efficientnet_lite0")  # CTM's d_backbone, its order


def _timm_net(name, pretrained):
    import timm
    from huggingface_hub.constants import HF_HUB_CACHE

    if not timm.is_model(name):
        fail(f"--disc-backbones: {name!r} is not a timm model (CTM uses {','.join(CTM_BACKBONES)})")
    try:
        return timm.create_model(name, pretrained=pretrained)
    except Exception as e:
        hub = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) or name
        fail(f"cannot load the ImageNet weights of {name} for --disc ctm ({type(e).__name__}): timm reads "
             f"model.safetensors of the Hugging Face repo {hub} from {HF_HUB_CACHE}/ ($HF_HUB_CACHE); fetch "
             f"it (huggingface-cli download {hub}) or use --disc patch")  # fmt: skip


class TimmFeatures(nn.Module):
    """CTM's frozen F_RandomProj (Projected GAN): a timm network's maps at 1/4 ... 1/32 (EfficientNet: blocks
    2, 3, 5, 7; DeiT: tokens of blocks 3, 6, 9, 12 as DPT), random 1x1 mixing to 64 ... 512 channels, then
    coarse to fine p_3 = conv(up2(c_3)), p_k = conv(up2(p_{k+1} + c_k)): 64, 64, 128, 256 channels."""

    def __init__(self, name, pretrained=True, res=224):
        super().__init__()
        net = _timm_net(name, pretrained)
        cfg = net.pretrained_cfg  # the network's own input normalisation (lite0: 0.5 / 0.5; DeiT: ImageNet's)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg["std"]).reshape(1, 3, 1, 1))
        self.vit, seq = hasattr(net, "pos_embed"), nn.Sequential
        if self.vit:
            if len(net.blocks) != 12:
                fail(f"--disc-backbones {name}: CTM's ViT features take a 12-block ViT (tiny, small or base)")
            d, self.backbone = net.embed_dim, net
            up = lambda c, k: nn.ConvTranspose2d(c, c, k, stride=k)  # noqa: E731
            r = [seq(nn.Conv2d(d, d // 8, 1), up(d // 8, 4)), seq(nn.Conv2d(d, d // 4, 1), up(d // 4, 2))]
            r += [nn.Conv2d(d, d // 2, 1), seq(nn.Conv2d(d, d, 1), nn.Conv2d(d, d, 3, 2, 1))]  # as DPT
            self.reassemble = nn.ModuleList(r)
        elif hasattr(net, "conv_stem") and len(getattr(net, "blocks", ())) == 7:
            b = net.blocks  # timm's bn1 holds the stem activation (act1 in older timm, as CTM's code has)
            stages = [seq(net.conv_stem, net.bn1, *b[:2]), b[2], seq(*b[3:5]), seq(*b[5:])]
            self.backbone = nn.ModuleList(stages)
        else:
            fail(f"--disc-backbones {name}: CTM's features take an EfficientNet or a DeiT/ViT from timm")
        with torch.no_grad():  # the channels at any size (eval: BatchNorm of a 1x1 map)
            chans = [f.shape[1] for f in self.eval().backbone_maps(torch.zeros(1, 3, 32, 32))]
        self.ccm = nn.ModuleList(nn.Conv2d(c, 64 << k, 1) for k, c in enumerate(chans))
        self.csm = nn.ModuleList(nn.Conv2d(64 << k, 64 << max(k - 1, 0), 1) for k in range(4))
        self.channels, self.sizes = [64, 64, 128, 256], [res >> k for k in (1, 2, 3, 4)]
        self.requires_grad_(False).eval()

    def train(self, mode=True):
        return super().train(False)  # frozen: BatchNorm statistics and dropout stay in eval mode

    def backbone_maps(self, x):
        out = []
        if not self.vit:
            for stage in self.backbone:
                out.append(x := stage(x))
            return out
        v, g = self.backbone, x.shape[-1] // 16
        t = v.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [N, g*g, D]
        prefix = [v.cls_token] + ([v.dist_token] if getattr(v, "dist_token", None) is not None else [])
        pos, n0 = v.pos_embed, len(prefix)
        if g != (g0 := math.isqrt(pos.shape[1] - n0)):  # other sizes: bilinear positions (CTM's forward_flex)
            grid = pos[:, n0:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(g, g), mode="bilinear", align_corners=False)
            pos = torch.cat([pos[:, :n0], grid.permute(0, 2, 3, 1).reshape(1, g * g, -1)], dim=1)
        t = v.pos_drop(torch.cat([p.expand(len(t), -1, -1) for p in prefix] + [t], dim=1) + pos)
        for i, block in enumerate(v.blocks):
            t = block(t)
            if i in (2, 5, 8, 11):
                out.append(self.reassemble[len(out)](t[:, n0:].transpose(1, 2).unflatten(2, (g, g))))
        return out

    def forward(self, x):
        up2 = functools.partial(F.interpolate, scale_factor=2, mode="bilinear", align_corners=True)
        c = [m(f) for m, f in zip(self.ccm, self.backbone_maps(x), strict=True)]
        p = [self.csm[3](up2(c[3]))]
        for k in (2, 1, 0):
            p.insert(0, self.csm[k](up2(p[0] + c[k])))
        return p


class EqualizedLinearLReLU(nn.Module):
    """StyleGAN's FullyConnectedLayer(activation='lrelu'): weight N(0, 1) / sqrt(fan_in), lrelu * 2^0.5."""

    def __init__(self, cin, cout):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(cout, cin)), nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        x = F.linear(x, self.weight / math.sqrt(self.weight.shape[1]), self.bias)
        return F.leaky_relu(x, 0.2) * math.sqrt(2)


class CTMHead(nn.Module):
    """CTM's SingleDisc(Cond): 4x4 stride-2 DownBlocks to 8 x 8 (channels by the nearest size key, as CTM's
    112, 56, ...), a 4x4 conv to patch logits; conditional: 64 channels . projected class embedding / 8."""

    NFC = {4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}

    def __init__(self, cin, size, label_dim=0, cmap_dim=64, embed_dim=320):
        super().__init__()
        layers, c, s = [], cin, min(self.NFC, key=lambda k: abs(k - size))
        while s > 8:  # DownBlocks: spectral-norm 4x4 stride-2 conv, BatchNorm, LeakyReLU 0.2
            s, size, cout = s // 2, size // 2, self.NFC[s // 2]
            layers += [_sn(nn.Conv2d(c, cout, 4, 2, 1)), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
            c = cout
        self.main, self.cmap_dim = nn.Sequential(*layers), cmap_dim if label_dim else 1
        self.cls = _sn(nn.Conv2d(c, self.cmap_dim, min(4, size), 1, 0, bias=False))
        self.embed = nn.Embedding(label_dim, embed_dim) if label_dim else None
        self.embed_proj = EqualizedLinearLReLU(embed_dim, cmap_dim) if label_dim else None

    def forward(self, h, onehot=None):
        out = self.cls(self.main(h))
        if self.embed is not None:
            cmap = self.embed_proj(self.embed(onehot.argmax(1)))[:, :, None, None]
            out = (out * cmap).sum(1, keepdim=True) / math.sqrt(self.cmap_dim)
        return out.flatten(1)


class CTMDisc(nn.Module):
    """--disc ctm: CTM's ProjectedDiscriminator (LMM App. A.4): per feature network its own DiffAugment draw,
    its normalisation, a resize to res (224) and a CTMHead per map -> patch logits [N, 2 x 4 x 16]."""

    def __init__(self, label_dim=0, backbones=CTM_BACKBONES, res=224, pretrained=True):
        super().__init__()
        self.res, self.features = res, nn.ModuleList(TimmFeatures(n, pretrained, res) for n in backbones)
        heads = [zip(f.channels, f.sizes, strict=True) for f in self.features]
        self.heads = nn.ModuleList(nn.ModuleList(CTMHead(c, s, label_dim) for c, s in h) for h in heads)

    def forward(self, x, onehot=None, augment=()):
        logits = []
        for feat, heads in zip(self.features, self.heads, strict=True):
            h = diff_augment(x, augment) if augment else x  # CTM: a fresh draw for each feature network
            h = ((h + 1) / 2 - feat.mean) / feat.std
            h = F.interpolate(h, size=(self.res, self.res), mode="bilinear", align_corners=False)
            logits += [head(f, onehot) for head, f in zip(heads, feat(h), strict=True)]
        return torch.cat(logits, dim=1)


def build_disc(kind, img_channels, label_dim, res=224, backbones=None, pretrained=True):
    if kind == "patch":
        return PatchDisc(img_channels, label_dim)
    if res % 32 or res < 32:
        fail(f"--disc-res {res}: --disc ctm needs a multiple of 32 (CTM: 224)")
    return CTMDisc(label_dim, tuple(backbones or CTM_BACKBONES), res, pretrained)


def disc_params(disc):  # the trainable parameters: all but the frozen feature networks and projections
    return [p for n, p in disc.named_parameters() if not n.startswith("features.")]


def disc_state(disc):  # D for a checkpoint, less the ImageNet weights (rebuilt from timm)
    return {k: v for k, v in disc.state_dict().items() if ".backbone." not in k}


def load_disc_state(disc, state):
    missing, unexpected = disc.load_state_dict(state, strict=False)
    if bad := [k for k in missing if ".backbone." not in k] + list(unexpected):
        fail(f"the checkpoint's discriminator does not match --disc / --disc-backbones (e.g. {bad[0]})")


# --- EDM's preconditioning of N_theta (LMM Sec. 3) ---


def edm_precond(sigma, sigma_data=0.5):
    """EDM Table 1 ("Ours"): c_skip, c_out, c_in, c_noise."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, 1 / (sigma_data**2 + sigma**2).sqrt(), sigma.log() / 4


class EDMPrecond(nn.Module):
    """EDM Eq. 7, in float32: N_theta(x; sigma) = c_skip x + c_out F(c_in x, c_noise), F the UNet of `arch`.
    class_labels: int64 indices [N] or one-hot [N, label_dim]."""

    def __init__(self, img_resolution, img_channels, label_dim=0, sigma_data=0.5, arch="ddpmpp", **unet):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.sigma_data = sigma_data
        self.model = make_unet(arch, img_resolution, img_channels, img_channels, label_dim=label_dim, **unet)

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma.expand(len(x), 1, 1, 1), self.sigma_data)
        labels, dim = class_labels, self.label_dim
        if dim and labels is None:
            raise ValueError("this network is class-conditional: pass class labels (int64 [N] or one-hot)")
        if dim:  # one-hot, as EDM's class labels
            labels = labels if labels.is_floating_point() else F.one_hot(labels.long(), dim)
        labels = labels.reshape(-1, dim).float() if dim else None
        F_x = self.model(c_in * x, c_noise.flatten(), labels, augment_labels)
        return c_skip * x + c_out * F_x.float()


# --- the interface of every method file ---


def build_net(net_kwargs):
    """N_theta: net(x, sigma, class_labels=None) -> the line's end x1; net.schedule: its sampling schedule."""
    net = EDMPrecond(**{k: v for k, v in net_kwargs.items() if k != "schedule"})
    net.schedule = dict(SCHEDULE, **net_kwargs.get("schedule", {}))
    return net


def sample(net, noise, nfe, labels=None, step_indices=None, generator=None, **schedule):
    """noise [N, C, H, W] standard normal -> (images in [-1, 1], NFE). nfe 1-4: Table 7's step indices;
    step_indices overrides (also "0:1:2", as evaluate.py --sampler-kw passes it); schedule: sched_steps,
    sigma_min, sigma_max, rho overrides of the net's schedule."""
    s = dict(SCHEDULE, **getattr(net, "schedule", {}))
    s.update({"steps" if k == "sched_steps" else k: v for k, v in schedule.items()})
    if isinstance(step_indices, (str, int)):  # --sampler-kw step_indices=0:1:2 (its commas split keywords)
        step_indices = [int(t) for t in str(step_indices).split(":") if t]
    if not (all(isinstance(v, int | float) and math.isfinite(v) for v in s.values()) and s["rho"] > 0
            and 0 < s["sigma_min"] < s["sigma_max"] and s["steps"] == int(s["steps"]) >= 1):  # fmt: skip
        raise ValueError(
            f"the schedule needs finite numbers, 0 < sigma_min < sigma_max, rho > 0, steps >= 1: {s}"
        )
    steps = nfe_steps(nfe, s["steps"], step_indices)
    return lmm_sampler(net, noise, lmm_schedule(**s), steps, labels, generator), len(steps)


def ode_start(net, noise):
    """x at t = 0 of the common clock: the sampler's start, sigma_max noise."""
    return noise * getattr(net, "schedule", SCHEDULE)["sigma_max"]


def ode_velocity(net, x, t, labels=None):
    """dx/dt on the common clock t in [0, 1] (noise at 0), sigma = sigma_max (1 - t): the remaining path to
    the line's end over the remaining time, (N_theta(x, sigma) - x) / (1 - t) (LMM Eq. 4)."""
    s = getattr(net, "schedule", SCHEDULE)
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
    sigma = (s["sigma_max"] * (1 - t)).clamp(min=s["sigma_min"])
    return (net(x, sigma, class_labels=labels) - x) * (s["sigma_max"] / sigma).reshape(-1, 1, 1, 1)


# --- pairs, real images, checkpoints, run folders ---


def fail(msg):
    raise SystemExit(f"error: {msg}")  # one line for the user, exit code 1, no traceback


def load_pairs(path, cond=False):
    """gen_pairs.py's uncompressed .npz (noise, data [N, C, H, W], label [N], meta), memory-mapped (RSS
    O(batch)) -> (arrays with meta decoded, (C, H, W), classes: 0 unless --cond)."""
    pairs = {}
    try:
        with zipfile.ZipFile(path) as z, open(path, "rb") as f:
            for info in z.infolist():  # each array is mapped where it lies in the zip
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"{info.filename} is compressed")
                f.seek(info.header_offset + 26)  # the local header: 30 bytes, a name and an extra field
                f.seek(info.header_offset + 30 + sum(struct.unpack("<HH", f.read(4))))
                major, _ = np.lib.format.read_magic(f)
                shape, fortran, dtype = getattr(np.lib.format, f"read_array_header_{major}_0")(f)
                arr = np.memmap(path, dtype, "r", f.tell(), shape, "F" if fortran else "C") if shape else None
                pairs[info.filename[:-4]] = arr if shape else np.frombuffer(f.read(dtype.itemsize), dtype)[0]
        pairs["meta"] = json.loads(str(pairs.get("meta", "{}")))
    except FileNotFoundError:
        fail(f"pairs file not found: {path} (make it with gen_pairs.py)")
    except (ValueError, OSError, zipfile.BadZipFile, struct.error) as e:
        fail(f"cannot read {path} as an uncompressed .npz of pairs: {str(e).strip().splitlines()[0]}")
    if missing := [k for k in ("noise", "data") if k not in pairs]:
        fail(f"{path} has no {missing} array(s) (found {sorted(pairs)}); make pairs with gen_pairs.py")
    x0, x1, lab = pairs["noise"], pairs["data"], pairs.get("label")
    C = (1, 3, 4) if (pairs["meta"].get("data") or {}).get("kind") == "latents" else (1, 3)  # SD latents: 4
    if x0.ndim != 4 or x0.shape != x1.shape or x0.shape[1] not in C or x0.shape[2] != x0.shape[3]:
        fail(f"{path}: 'noise' and 'data' must both be [N, C, H, W], C in {C}, H = W: {x0.shape}, {x1.shape}")
    if not len(x0) or x0.dtype.kind != "f" or x1.dtype.kind != "f":
        fail(f"{path}: 'noise' and 'data' must be float16/32/64 with at least one pair")
    if lab is not None and (lab.shape != x0.shape[:1] or lab.dtype.kind not in "iu" or lab.min() < 0):
        fail(f"{path}: 'label' must be class indices >= 0 of shape [{len(x0)}], got {lab.dtype} {lab.shape}")
    for lo in range(0, len(x0), 1 << 14):  # in chunks: RAM O(chunk)
        for k in ("noise", "data"):
            if not (ok := np.isfinite(pairs[k][lo : lo + (1 << 14)]).reshape(-1, x0[0].size).all(1)).all():
                fail(f"{path}: '{k}' is not finite (NaN/inf) in pair {lo + int(np.argmin(ok))}")
    if cond and lab is None:
        fail(f"--cond, but {path} has no 'label' array (the teacher was unconditional)")
    label_dim = int(pairs["meta"].get("label_dim") or lab.max() + 1) if cond else 0
    if cond and lab.max() >= label_dim:
        fail(f"{path}: labels reach {lab.max()}, beyond its {label_dim} classes")
    return pairs, tuple(x0.shape[1:]), label_dim


def load_data(spec):
    """D's real images: cifar10 | FILE.npz ('images', 'labels') | FILE.npy (tools/prepare_data.py's array,
    memory-mapped; labels in FILE.labels.npy) -> uint8 [N, H, W, C], int64 labels or None."""
    if spec == "cifar10":
        import torchvision

        try:
            ds = torchvision.datasets.CIFAR10(root="datasets", train=True, download=True)
        except Exception as e:
            fail(f"CIFAR-10 is not in datasets/ and cannot be downloaded ({type(e).__name__}): put it there")
        return ds.data, torch.tensor(ds.targets)
    try:
        if spec.endswith(".npz"):
            with np.load(spec) as f:
                images, labels = f["images"], f.get("labels")
        else:
            images, lab = np.load(spec, mmap_mode="r"), spec.removesuffix(".npy") + ".labels.npy"
            labels = np.load(lab) if os.path.isfile(lab) else None
    except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
        fail(f"cannot read --data {spec} ({e}): use cifar10, an .npz ('images', 'labels') or an .npy")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3) or not len(images):
        fail(f"{spec}: images must be uint8 [N, H, W, C], C 1 or 3; got {images.dtype} {images.shape}")
    if labels is not None and not (labels.shape == images.shape[:1] and labels.dtype.kind in "iu"
                                   and labels.min() >= 0 and labels.max() < 1 << 16):  # fmt: skip
        fail(f"{spec}: labels must be class indices in [0, 65536), one per image; got {labels.dtype}")
    return images, None if labels is None else torch.from_numpy(labels.astype(np.int64))


def get_batch(images, labels, idx, device):
    """Index i >= N is the mirror image of i - N (--xflip copies) -> floats in [-1, 1], labels."""
    i = (idx % len(images)).numpy()
    y = torch.from_numpy(np.ascontiguousarray(images[i].transpose(0, 3, 1, 2))).to(device).float() / 127.5 - 1
    y = torch.where((idx >= len(images)).to(device)[:, None, None, None], y.flip(3), y)
    return y, None if labels is None else labels[i].to(device)


def load_checkpoint(path, methods=(METHOD,)):
    """A checkpoint of `methods` (a run folder: its latest.pt) holding what this file reads, its zip checked
    (CRC, every member a file), loaded without executing code."""
    path = os.path.join(path, "latest.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        fail(f"checkpoint not found: {path}")
    try:
        with zipfile.ZipFile(path) as z:
            dirs = (i.filename for i in z.infolist() if i.is_dir() or i.external_attr & 0x10)  # torch: files
            bad = z.testzip() or next(dirs, None)
            bad = bad and f"its member {bad} is damaged"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        bad = f"not a complete torch checkpoint ({str(e) or type(e).__name__})"
    if bad:
        fail(f"{path} is corrupt: {bad}; resume from an intact ckpt-*.pt beside it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign file: never unpickled unsafely
        fail(f"cannot read {path} as a weights-only torch checkpoint: {(str(e) or repr(e)).splitlines()[0]}")
    keys = ("method", "version", "net_kwargs", "net", "ema", "step")
    if missing := [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]:
        fail(f"{path} is not a checkpoint of this project: it has no {missing}")
    if ckpt["method"] not in methods or not isinstance(ckpt["version"], int) or ckpt["version"] > VERSION:
        fail(f"{path} is a {ckpt['method']!r} checkpoint, version {ckpt['version']}: lmm.py takes "
             f"{'/'.join(methods)} up to version {VERSION}")  # fmt: skip
    return ckpt


def load_init(path, shape, label_dim):
    """--init: an EDM-family checkpoint (official snapshots via tools/convert_edm.py) -> (its architecture's
    net_kwargs, its EMA weights), which must fit the pairs' image shape and classes."""
    if path.endswith(".pkl"):
        pt = os.path.basename(path).removesuffix(".pkl") + ".pt"
        fail(f"--init {path} is an EDM snapshot: convert it with python tools/convert_edm.py {path} {pt}")
    init = load_checkpoint(path, ("lmm", "edm_teacher", "aot_edm"))
    keys = ("img_channels", "img_resolution", "label_dim", "augment_dim", "sigma_data", "model_channels")
    keys += ("arch", "channel_mult", "num_blocks", "attn_resolutions")
    arch = {k: init["net_kwargs"][k] for k in keys if k in init["net_kwargs"]}
    theirs = tuple(arch.get(k, 0) for k in ("img_channels", "img_resolution", "img_resolution", "label_dim"))
    if theirs != (*shape, label_dim):
        fail(f"--init {path} makes (C, H, W, classes) {theirs} but the pairs are {(*shape, label_dim)}: make "
             "the pairs with that teacher (gen_pairs.py --cond for its classes, lmm.py --cond)")  # fmt: skip
    return arch, init["ema"] if init.get("ema") is not None else init["net"]


def hold_lock(path, what, _held={}):  # noqa: B006 (locks held for the process's life)
    """fcntl.flock on `path`: a second job on the same output stops at once, naming the holder."""
    import fcntl

    if (path := os.path.abspath(path)) not in _held:
        f = _held[path] = open(path, "a+")  # noqa: SIM115
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0), _held.pop(path)
            fail(f"{what} is locked by a running job ({f.read()}); wait for it or write elsewhere")
        f.truncate(0), f.write(f"pid {os.getpid()} on {os.uname().nodename}"), f.flush()


def claim_outdir(outdir, ckpt, resume, overwrite):
    """Rank 0: lock --outdir; never write over a run unless it is the one resumed or --overwrite; remove a
    killed run's temporary files; on resume cut log.jsonl back to the resumed step."""
    os.makedirs(outdir, exist_ok=True)
    hold_lock(os.path.join(outdir, ".lock"), outdir)
    runs = sorted(n for n in os.listdir(outdir) if re.fullmatch(r"ckpt-\d+\.pt", n))
    src = resume and os.path.realpath(resume if os.path.isdir(resume) else os.path.dirname(resume))
    new = ckpt is None or src != os.path.realpath(outdir)  # a new run here, or another folder's checkpoint
    if runs and new and not overwrite and ckpt is None:
        fail(f"{outdir} holds a run at step {int(runs[-1][5:-3])}: pass --resume {outdir} to continue it, "
             "--overwrite to replace it, or choose another --outdir")  # fmt: skip
    if runs and new and not overwrite:  # resuming another folder's run here would mix the two
        fail(f"{outdir} holds another run (step {int(runs[-1][5:-3])}); resume {resume} into its own folder "
             "or pass --overwrite")  # fmt: skip
    for name in os.listdir(outdir):  # only the names this file writes
        tmp = re.fullmatch(r"(ckpt-\d+\.pt|latest\.pt|log\.jsonl)\.tmp\d*|latest\.tmp", name)
        if tmp or (new and (name in runs or name in ("latest.pt", "log.jsonl"))):
            os.remove(os.path.join(outdir, name))
    if not new and os.path.isfile(log := os.path.join(outdir, "log.jsonl")):
        with open(log) as f:
            keep = []
            for s in f:  # lines cut off by a kill or not ours are dropped, and steps after the checkpoint
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    keep += [s] if s.endswith("\n") and json.loads(s)["step"] <= ckpt["step"] else []
        with open(log + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(log + ".tmp", log)


def atomic_save(obj, path):  # a kill or a full disk never leaves a half-written file under the final name
    with open(f"{path}.tmp{os.getpid()}", "wb") as f:  # through a Python file: a full disk is an OSError
        torch.save(obj, f)
    os.replace(f"{path}.tmp{os.getpid()}", path)


def batch_indices(n, batch, step, seed):
    """Step `step`'s global data indices: consecutive slices of a stream of per-epoch permutations, each from
    (seed, epoch) alone, so that the order does not depend on the number of processes."""
    pos, out = step * batch + torch.arange(batch), torch.empty(batch, dtype=torch.long)
    for e in (pos // n).unique().tolist():
        order = torch.randperm(n, generator=torch.Generator().manual_seed((seed * 1_000_003 + e) % 2**64))
        out[pos // n == e] = order[pos[pos // n == e] % n]
    return out


# --- training: LMM App. A.4's schedule, nanoGPT-style ---


def train(args):
    ddp, cuda = "RANK" in os.environ, torch.cuda.is_available()  # torchrun: one process per GPU or CPU
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if ddp:
        torch.cuda.set_device(device) if cuda else None
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if ddp else (0, 1)
    batch_rank = args.batch // world
    batch_gpu = args.batch_gpu or batch_rank
    if args.batch % world or batch_rank % batch_gpu:
        fail(f"--batch {args.batch} (global) must split into {world} processes and chunks of --batch-gpu")
    ckpt = load_checkpoint(args.resume) if args.resume else None
    pairs, shape, label_dim = load_pairs(args.pairs, args.cond)
    n_pairs, d_label_dim = len(pairs["noise"]), 0 if args.disc_uncond else label_dim
    if args.sot and max(args.sot) >= args.sched_steps:
        fail(f"--sot {args.sot}: indices must lie in 0..{args.sched_steps - 1} (--sched-steps)")
    total = round(args.duration * 1e6)
    adv = args.adv_start >= 0 and args.adv_start * 1000 < total
    latent = (meta := pairs["meta"].get("data") or {}).get("kind") == "latents"  # gen_pairs: a latent teacher
    if latent and (adv or args.loss == "lpips"):
        fail(f"{args.pairs} are latents of {meta['vae']}: LPIPS and the discriminator are defined on images; "
             "train Eq. 3 alone with --loss l2 --adv-start off")  # fmt: skip
    if adv:  # D's real images: --data, else the teacher's training set, which the pairs' meta names
        data = args.data or pairs["meta"].get("dataset")
        if not (data == "cifar10" or str(data).endswith((".npz", ".npy")) and os.path.isfile(data)):
            fail(f"the adversarial loss needs real images: {data!r} (--data, else the pairs' teacher set) "
                 "is one lmm.py cannot load by name: pass --data cifar10 | FILE.npz | FILE.npy")  # fmt: skip
        images, real_labels = load_data(data)
        if (images.shape[3], *images.shape[1:3]) != shape:
            fail(f"{data}: images are {images.shape[1:]} but the pairs are {shape}: use the same size")
        if label_dim and (real_labels is None or real_labels.max() >= label_dim):
            fail(f"the pairs are class-conditional ({label_dim} classes) but {data} has no labels for the "
                 "discriminator or labels beyond them")  # fmt: skip
        real_labels, n_real = real_labels if label_dim else None, len(images) * (1 + (args.xflip == "copies"))
    schedule = dict(SCHEDULE, steps=args.sched_steps)
    net_kwargs = dict(img_resolution=shape[-1], img_channels=shape[0], label_dim=label_dim, arch=args.arch,
                      model_channels=args.model_channels, channel_mult=args.channel_mult, schedule=schedule,
                      num_blocks=args.num_blocks, attn_resolutions=args.attn_res,
                      dropout=args.dropout)  # fmt: skip
    arch, init = load_init(args.init, shape, label_dim) if args.init and ckpt is None else ({}, None)
    net_kwargs = dict(net_kwargs, **arch) if ckpt is None else ckpt["net_kwargs"]  # --init: the teacher's
    made_for = [net_kwargs.get(k) for k in ("img_channels", "img_resolution", "label_dim")]
    if made_for != [*shape[:2], label_dim]:
        fail(f"--resume {args.resume} was trained on other pairs or --cond: resume it with the pairs it had")
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    try:
        net = build_net(net_kwargs).to(device).train()
        net.load_state_dict(init) if init is not None else None
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        fail(f"{args.resume or args.init}: its network does not build ({' '.join(str(e).split())[:200]})")
    if net.model.map_augment is not None:  # EDM's augmentation conditioning: LMM never uses it
        net.model.map_augment.requires_grad_(False)
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.RAdam(net.parameters(), lr=args.lr, betas=(0.9, 0.999))  # LMM Table 6
    disc = opt_d = None
    if adv:  # D's random heads and projections from the seed alone; LMM Table 6's RAdam
        torch.manual_seed(args.seed + 1)
        disc = build_disc(args.disc, shape[0], d_label_dim, args.disc_res, args.disc_backbones,
                          not args.disc_random_weights).to(device)  # fmt: skip
        opt_d = torch.optim.RAdam(disc_params(disc), lr=args.lr_d, betas=(0.5, 0.9))
    lp = make_lpips(device, args.lpips_random_trunk) if args.loss == "lpips" else None
    step, nimg, adv_step0 = 0, 0, None  # adv_step0: the first adversarial step, which sets the G/D phase
    if ckpt is not None:
        try:
            net.load_state_dict(ckpt["net"]), ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["opt"])
            if adv and ckpt["state"].get("disc") is not None:
                load_disc_state(disc, ckpt["state"]["disc"]), opt_d.load_state_dict(ckpt["state"]["disc_opt"])
            step, nimg, adv_step0 = ckpt["step"], ckpt["state"]["nimg"], ckpt["state"].get("adv_step0")
        except (TypeError, ValueError, KeyError, RuntimeError) as e:
            fail(f"--resume {args.resume} does not fit this run ({' '.join(str(e).split())[:200]})")
    if rank == 0:
        claim_outdir(args.outdir, ckpt, args.resume, args.overwrite)
        n_par, start = sum(p.numel() for p in net.parameters()), f" from --init {args.init}" * bool(init)
        print(f"{n_pairs} pairs {shape}, {label_dim} classes, {n_par} parameters{start}, {world} process(es) "
              f"on {device}, from step {step}", flush=True)  # fmt: skip
        if ckpt is not None and ckpt["state"].get("world", world) != world:  # the step seeds below
            print(f"note: saved with {ckpt['state']['world']} process(es), resumed with {world}: the per-rank"
                  " noise (sigma, DiffAugment) changes from here on; the data order does not")  # fmt: skip
        if adv:
            print(f"from {args.adv_start:g} kimg: --disc {args.disc}, G on 1 step in {args.g_period}; real"
                  f" images for the discriminator: {data} ({len(images)} images)", flush=True)  # fmt: skip
    torch.backends.cudnn.benchmark = True  # full fp32 unless --precision tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    amp = functools.partial(torch.autocast, device.type, torch.bfloat16, enabled=args.precision == "bf16")
    model, model_d = torch.compile(net) if args.compile else net, disc  # what is called; never stored
    if ddp:
        ids = [device] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, ids)
        model_d = torch.nn.parallel.DistributedDataParallel(disc, ids) if adv else None
    m = net.model  # W of the adaptive weight: N_theta's last layer (DDPM++: aux_conv, ADM: out_conv)
    w_last = (m.out_conv if hasattr(m, "out_conv") else [*m.dec.values()][-1]).weight
    onehot = lambda y: F.one_hot(y, d_label_dim).float() if d_label_dim else None  # noqa: E731

    def lines(idx, sot):  # Eq. 3's inputs: the pairs idx and a noise level for each, (x0, x1, labels, sigma)
        dtypes = dict(noise=np.float32, data=np.float32, label=np.int64)
        x0, x1, y = (torch.from_numpy(np.asarray(pairs[k][idx.numpy()], t)).to(device) if k in pairs else None
                     for k, t in dtypes.items())  # fmt: skip
        return x0, x1, y if label_dim else None, draw_sigma(len(idx), sot, schedule, device)

    stop = []  # SIGINT/SIGTERM: a checkpoint at the end of the step, then exit 128 + signal (a requeue)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: stop.append(signum))
    sums, counts, t_log, step_log, t0, step0 = {}, {}, time.time(), step, time.time(), step
    grid = torch.randn([args.grid, *shape], generator=torch.Generator().manual_seed(0)).to(device)
    grid_labels = (torch.arange(args.grid) % label_dim).to(device) if label_dim else None
    while nimg < total:
        s0, s1 = np.random.SeedSequence([args.seed * world + rank, step]).generate_state(2)
        torch.manual_seed(int(s0) << 32 | int(s1))  # the step's draws from (seed, rank, step): no RNG state
        in_adv = adv and nimg >= args.adv_start * 1000  # App. A.4: Eq. 3 (80k steps), then with Eq. 5 (20k)
        adv_step0 = step if in_adv and adv_step0 is None else adv_step0
        phase = (step - adv_step0) % args.g_period if in_adv else 0  # CTM's g_learning_period: G, then D
        g_step, d_step = phase == 0, in_adv and (args.g_period == 1 or phase != 0)  # g_period 1: G then D
        sot = args.sot if nimg >= args.sot_start * 1000 else None  # SOT (Sec. 3) as fine-tuning
        res = args.lpips_res if in_adv or not adv else args.lpips_res_pre  # App. A.4: LPIPS at 64, then 224
        distance = None if lp is None else functools.partial(lpips_distance, lp, res=res)
        mine = slice(rank * batch_rank, (rank + 1) * batch_rank)  # this rank's share of the global batch
        chunks = batch_indices(n_pairs, args.batch, step, args.seed)[mine].split(batch_gpu)
        rec, inputs = {}, []
        if g_step:  # N_theta: Eq. 3; adversarial phase: lambda_lines L_lines + lambda_adapt L_G (Sec. 3)
            for p in disc_params(disc) if in_adv else ():  # D's gradients stay untouched
                p.requires_grad_(False)
            opt.zero_grad(set_to_none=True)
            rec.update(L_lines=0.0, **(dict(L_G=0.0, lambda_adapt=0.0) if in_adv else {}))
            for j, chunk in enumerate(chunks):
                x0, x1, y, sigma = lines(chunk, sot)
                sync = contextlib.nullcontext() if j == len(chunks) - 1 or not ddp else model.no_sync()
                with sync, amp():
                    d, x1_hat = lmm_loss(model, x0, x1, sigma, y, distance)
                    loss = l_lines = d.mean()
                    if in_adv:  # Eq. 5 in CTM's hinge form, weighted by VQGAN's adaptive weight
                        l_g = g_hinge_loss(disc(x1_hat, onehot(y), AUGMENT))
                        lam = adaptive_weight(l_lines, l_g, w_last, args.adapt_clamp)
                        loss = args.lambda_lines * l_lines + lam * l_g
                        rec["L_G"] += l_g.item() / len(chunks)
                        rec["lambda_adapt"] += lam.item() / len(chunks)
                        inputs.append((x0, x1, y, sigma))
                    (loss * len(chunk) / batch_rank).backward()
                rec["L_lines"] += l_lines.item() * len(chunk) / batch_rank
            for p in (p for p in net.parameters() if p.grad is not None):
                torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
            opt.step()
            with torch.no_grad():  # EMA on N_theta's steps (LMM Table 6: 0.999 per step)
                for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
                    p_ema.copy_(p.detach().lerp(p_ema, args.ema_decay))
                for b_ema, b in zip(ema.buffers(), net.buffers(), strict=True):
                    b_ema.copy_(b)
        elif d_step:  # a D-only step: fakes from the current N_theta on this step's pairs and noise levels
            inputs = [lines(chunk, sot) for chunk in chunks]
        if d_step:  # D: CTM's hinge loss, real images against N_theta's (after its update if g_period 1)
            for p in disc_params(disc):
                p.requires_grad_(True)
            opt_d.zero_grad(set_to_none=True)
            rec.update(L_D=0.0, D_real=0.0, D_fake=0.0)
            reals = batch_indices(n_real, args.batch, step, args.seed + 1)[mine].split(batch_gpu)
            flip_seed = np.random.SeedSequence([args.seed, step, 1]).generate_state(1)[0]
            g = torch.Generator().manual_seed(int(flip_seed))
            flips = (torch.rand(args.batch, generator=g) < 0.5)[mine].split(batch_gpu)  # --xflip random (CTM)
            for j, ((x0, x1, y, sigma), ridx, flip) in enumerate(zip(inputs, reals, flips, strict=True)):
                with torch.no_grad(), amp():
                    fake = net(x1 + sigma.reshape(-1, 1, 1, 1) * x0, sigma, class_labels=y)
                x_real, y_real = get_batch(images, real_labels, ridx, device)
                if args.xflip == "random":
                    x_real = torch.where(flip.to(device)[:, None, None, None], x_real.flip(3), x_real)
                sync = contextlib.nullcontext() if j == len(chunks) - 1 or not ddp else model_d.no_sync()
                with sync, amp():
                    d_real = model_d(x_real, onehot(y_real), AUGMENT)
                    d_fake = model_d(fake, onehot(y), AUGMENT)
                    l_d = d_hinge_loss(d_real, d_fake)
                    (l_d / len(chunks)).backward()
                rec["L_D"] += l_d.item() / len(chunks)
                rec["D_real"] += d_real.mean().item() / len(chunks)
                rec["D_fake"] += d_fake.mean().item() / len(chunks)
            opt_d.step()
        for k, v in rec.items():
            sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
        nimg, step = nimg + args.batch, step + 1
        flags = torch.tensor([float(bool(stop)), float(not math.isfinite(sum(rec.values())))], device=device)
        torch.distributed.all_reduce(flags) if ddp else None  # every rank stops together
        if flags[1]:
            fail(f"non-finite loss at step {step}: stopped before a checkpoint; lower --lr, check the pairs")
        done, stopping = nimg >= total, bool(flags[0])
        if step % args.log_every == 0 or done or stopping:
            means = torch.tensor([sums[k] / counts[k] for k in sums], dtype=torch.float64, device=device)
            torch.distributed.all_reduce(means) if ddp else None
            rec = dict(step=step, kimg=nimg / 1000, **dict(zip(sums, (means / world).tolist(), strict=True)),
                       sec_per_step=(time.time() - t_log) / (step - step_log))  # fmt: skip
            if rank == 0:
                text = (f"{k}={v:.5g}" if type(v) is float else f"{k}={v}" for k, v in rec.items())
                eta = round((time.time() - t0) / (step - step0) * (total - nimg) / args.batch)
                print(*text, f"eta={eta // 60}m{eta % 60:02d}s", flush=True)
                with open(os.path.join(args.outdir, "log.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
            sums, counts, t_log, step_log = {}, {}, time.time(), step
        if rank == 0 and (step % args.snap_every == 0 or done or stopping):  # all a bit-exact resume needs
            state = dict(nimg=nimg, adv_step0=adv_step0, world=world, disc=disc_state(disc) if adv else None,
                         disc_opt=opt_d.state_dict() if adv else None)  # fmt: skip
            ckpt = dict(method=METHOD, version=VERSION, args=vars(args), net_kwargs=net_kwargs, step=step,
                        net=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), kimg=nimg / 1000,
                        state=state, data=meta)  # fmt: skip
            if not all(v.isfinite().all() for v in (*ckpt["net"].values(), *ckpt["ema"].values())):
                fail(f"non-finite weights at step {step}: not saved; the newest checkpoint is the last good"
                     " one")  # fmt: skip
            atomic_save(ckpt, os.path.join(args.outdir, name := f"ckpt-{step:07d}.pt"))
            os.symlink(name, os.path.join(args.outdir, "latest.tmp"))
            os.replace(os.path.join(args.outdir, "latest.tmp"), os.path.join(args.outdir, "latest.pt"))
            for nfe in (1, 2) if args.grid and not latent else ():  # EMA samples of the grid at NFE 1 and 2
                x, _ = sample(ema, grid, nfe, grid_labels, generator=torch.Generator().manual_seed(1))
                path = os.path.join(args.outdir, f"grid-nfe{nfe}-{step:07d}.png")
                save_image((x.cpu() + 1) / 2, path, nrow=math.ceil(math.sqrt(len(x))), padding=0)
        if stopping:
            break
    if ddp:
        torch.distributed.barrier(), torch.distributed.destroy_process_group()
    if stop:
        raise SystemExit(128 + stop[0])


@torch.no_grad()
def generate(args):
    """--generate N on one device (many: gen_pairs.py, evaluate.py): image i from seed --seed + i (its noise,
    label and sampler noise, as gen_pairs.py's pair i) by --ckpt's EMA -> --out .npz ('images' uint8 NHWC,
    'seeds', 'labels'; latents: 'latents' too) and a .png grid beside it."""
    from tqdm import tqdm

    png, seeds = args.out.removesuffix(".npz") + ".png", range(args.seed, args.seed + args.generate)
    hold_lock(f"{args.out}.lock", args.out)
    if (old := [p for p in (args.out, png) if os.path.exists(p)]) and not args.overwrite:
        fail(f"{old[0]} exists; pass --overwrite to replace it")
    ckpt, device = load_checkpoint(args.ckpt), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    meta = ckpt.get("data") or {}
    try:
        net = build_net(ckpt["net_kwargs"]).eval().requires_grad_(False)
        net.load_state_dict(ckpt["ema"])
        steps = nfe_steps(args.nfe, net.schedule["steps"], args.step_indices)
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        fail(f"--ckpt {args.ckpt}: {' '.join(str(e).split())[:200]}")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    model = torch.compile(net.to(device)) if args.compile else net.to(device)
    vae = load_vae(meta["vae"]).to(device) if meta.get("kind") == "latents" else None  # its encoder's VAE
    shape, n_cls = (net.img_channels, net.img_resolution, net.img_resolution), net.label_dim
    out = dict(images=[], seeds=[torch.tensor(seeds)], labels=[], latents=[])
    for i in tqdm(range(0, args.generate, args.gen_batch), unit="batch"):
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + args.gen_batch]]
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
        lab = torch.stack([torch.randint(n_cls, [], generator=g) for g in gens]) if n_cls else None
        with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
            x, _ = sample(
                model, noise, len(steps), lab if lab is None else lab.to(device), steps, generator=gens
            )
        if vae is not None:  # tools/prepare_data.py stored the VAE's latents times "scale"
            out["latents"].append(x.cpu())
            x = vae.decode(x / meta["scale"]).sample.float()
        if not x.isfinite().all():
            fail(f"--ckpt {args.ckpt} makes non-finite samples (seed {seeds[i]} on): nothing written")
        out["images"].append((x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
        out["labels"] += [] if lab is None else [lab]
    out = {name: torch.cat(v).numpy() for name, v in out.items() if v}
    with open(f"{args.out}.tmp{os.getpid()}", "wb") as f:
        np.savez(f, **out)
    os.replace(f"{args.out}.tmp{os.getpid()}", args.out)
    grid = torch.from_numpy(out["images"][:64]).permute(0, 3, 1, 2).float() / 255
    save_image(grid, png, nrow=math.ceil(math.sqrt(len(grid))), padding=0)
    print(f"wrote {args.generate} images to {args.out} (steps {list(steps)}, NFE {len(steps)})", flush=True)


def load_vae(name):
    """tools/prepare_data.py's diffusers AutoencoderKL: a folder or a model id (Hugging Face cache)."""
    from diffusers import AutoencoderKL
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return AutoencoderKL.from_pretrained(name, local_files_only=not os.path.isdir(name)).eval()
    except Exception as e:  # missing, unreadable or not a VAE: one line with the reason
        fail(f"cannot load the VAE {name} of this checkpoint's latents ({type(e).__name__}): put its "
             f"diffusers files at {name} or in {HF_HUB_CACHE}/models--{name.replace('/', '--')}")  # fmt: skip


# --- command line ---

# LMM Table 6: batch 512, 80k steps without the adversarial loss (40960 kimg), then 20k, 25k or 30k with it.
# Dropout is not in Table 6: EDM's for the same networks (imagenet64: EDM's ADM).
PRESETS = {"cifar10": dict(lr=4e-4, channel_mult=[2, 2, 2], sched_steps=18, duration=51.2, dropout=0.13),
           "afhq64": dict(lr=1e-4, channel_mult=[1, 2, 2, 2], sched_steps=40, duration=53.76, dropout=0.25),
           "imagenet64": dict(arch="adm", model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3,
                              attn_res=[32, 16, 8], lr=8e-6, sched_steps=40, duration=56.32,
                              dropout=0.1)}  # fmt: skip
PRESET_ALL = dict(arch="ddpmpp", model_channels=128, num_blocks=4, attn_res=[16], adv_start=40960)


def number(cast, lo, hi=math.inf, lo_open=False, many=False):  # argparse type: finite numbers in range
    def parse(s):
        v = [cast(x) for x in s.split(",") if x] if many else [cast(s)]
        if not v or not all(math.isfinite(x) and (lo < x if lo_open else lo <= x) and x <= hi for x in v):
            raise argparse.ArgumentTypeError(f"{s} is not in {'(' if lo_open else '['}{lo}, {hi}]")
        return v if many else v[0]

    return parse


def parse_args(argv=None):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = argparse.ArgumentParser(description="LMM: train or sample", allow_abbrev=False, formatter_class=fmt)
    add, hide, ints, count = p.add_argument, argparse.SUPPRESS, number(int, 0, many=True), number(int, 1)
    pos, nonneg, batch = number(float, 0, lo_open=True), number(float, 0), number(int, 1, 1 << 20)
    add("--pairs", help="pairs .npz of gen_pairs.py (noise, data, optional label)")
    add("--data", help="D's real images: cifar10 | FILE.npy | FILE.npz (default: the pairs' teacher's)")
    add("--xflip", default="random", choices=["off", "random", "copies"], help="mirror D's reals (CTM)")
    add("--outdir", default="runs/lmm", help="checkpoints, grids, log.jsonl")
    add("--preset", default="cifar10", choices=sorted(PRESETS), help="LMM Table 6 column")
    add("--cond", action="store_true", help="class-conditional: train on the pairs' labels")
    add("--batch", type=batch, default=512, help="global batch per optimizer step (Table 6: 512)")
    add("--batch-gpu", type=batch, help="pairs per forward pass (accumulating to the per-process batch)")
    add("--lr", type=pos, help="N_theta's RAdam learning rate (preset; CIFAR-10: 4e-4)")
    add("--lr-d", type=pos, default=2e-3, help="D's RAdam learning rate (Table 6: 2e-3)")
    add("--ema-decay", type=number(float, 0, 1), default=0.999, help="EMA decay per N_theta step (Table 6)")
    add("--duration", type=pos, help="training length, Mimg (preset; CIFAR-10: 51.2 = 100k steps)")
    add("--loss", default="lpips", choices=["lpips", "l2"], help="the distance of Eq. 3")
    add("--lpips-res", type=count, default=224, help="LPIPS size with the adversary (App. A.4: 224)")
    add("--lpips-res-pre", type=count, default=64, help="LPIPS image size before it (App. A.4: 64)")
    add("--lpips-random-trunk", action="store_true", help=hide)  # tests: LPIPS with a random VGG16
    add("--sot", type=ints, default=[], help="Sampling-Optimised Training: train only at these step indices")
    add("--sot-start", type=nonneg, default=0.0, help="kimg where --sot starts (the +SOT recipe: 40960)")
    add("--sched-steps", type=count, help="EDM schedule length (preset: 18; 40 at 64x64)")
    add("--adv-start", type=lambda s: -1.0 if s == "off" else nonneg(s), help="kimg where Eq. 5 starts; off")
    add("--disc", default="ctm", choices=["ctm", "patch"], help="CTM's projected D | a patch D (offline)")
    add("--disc-backbones", type=lambda s: s.split(","), help=f"timm networks ({','.join(CTM_BACKBONES)})")
    add("--disc-res", type=number(int, 32), default=224, help="feature networks' input size (App. A.4: 224)")
    add("--disc-uncond", action="store_true", help="unconditional D heads (CTM's public CIFAR-10 code)")
    add("--disc-random-weights", action="store_true", help=hide)  # tests: random feature networks
    add("--g-period", type=count, default=2, help="N_theta on 1 step in K, D on the others (CTM: 2); 1: both")
    add("--lambda-lines", type=nonneg, default=0.5, help="weight of L_lines with the adversarial loss")
    add("--adapt-clamp", type=number(float, 0, many=True), default=[0.01, 10.0], help="LO,HI")
    add("--init", metavar="TEACHER", help="start N_theta from this EDM-family checkpoint, its arch")
    add("--arch", choices=["ddpmpp", "adm"], help="N_theta's network (preset: ddpmpp)")
    add("--model-channels", type=count, help="UNet base width (preset: 128; ADM 192)")
    add("--channel-mult", type=number(int, 1, many=True), help="width multiplier per resolution (preset)")
    add("--num-blocks", type=count, help="residual blocks per resolution (preset)")
    add("--attn-res", type=ints, help="self-attention resolutions (preset)")
    add("--dropout", type=number(float, 0, math.nextafter(1, 0)), help="dropout (preset; EDM CIFAR-10: 0.13)")
    add("--tiny", action="store_true", help="a tiny UNet for CPU smoke runs")
    add("--seed", type=number(int, 0, 2**63 - 1), default=0, help="init, data order; first --generate seed")
    add("--log-every", type=count, default=100, help="steps between log lines")
    add("--snap-every", type=count, default=2000, help="steps between checkpoints and image grids")
    add("--grid", type=number(int, 0), default=64, help="images per snapshot grid at NFE 1 and 2; 0: none")
    add("--resume", help="run folder (its latest.pt) or checkpoint to continue")
    add("--overwrite", action="store_true", help="replace a run in --outdir or an existing --out")
    add("--generate", type=number(int, 0), default=0, metavar="N", help="generate N images from --ckpt")
    add("--ckpt", help="--generate: a checkpoint of this file, or its run folder")
    add("--out", default="samples.npz", help="--generate's .npz (a .png grid beside it)")
    add("--nfe", type=count, default=1, help="network evaluations per image (1-4: Table 7's step indices)")
    add("--step-indices", type=ints, help="--generate: explicit step indices, e.g. 0,3,5")
    add("--gen-batch", type=count, default=256, help="images per sampling batch")
    add("--precision", default="fp32", choices=["fp32", "tf32", "bf16"], help="the paper's: fp32")
    add("--compile", action="store_true", help="torch.compile the network")
    args = p.parse_args(argv)
    for k, v in {**PRESET_ALL, **PRESETS[args.preset]}.items():
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if args.tiny:
        args.model_channels, args.channel_mult, args.num_blocks, args.attn_res = 16, [1, 2], 1, [8]
    if len(args.adapt_clamp) != 2 or args.adapt_clamp[0] > args.adapt_clamp[1]:
        p.error("--adapt-clamp takes two numbers 0 <= LOW <= HIGH: LOW,HIGH (CTM: 0.01,10)")
    if not (args.ckpt if args.generate else args.pairs):
        p.error("--generate N needs --ckpt" if args.generate else "--pairs is required for training")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        generate(args) if args.generate else train(args)
    except OSError as e:  # a full disk, a read-only folder, a name too long: one line
        fail(f"{e.filename or (args.out if args.generate else args.outdir)}: {e.strerror or e}")
    except KeyboardInterrupt:  # Ctrl-C during --generate (training saves and exits itself)
        raise SystemExit(130) from None


# --- UNet: identical in every file that builds a net (EDM's SongUNet / DhariwalUNet keys) ---


def _init(shape, fan_in, fan_out, gain=1.0, mode="xavier", bias=False):
    """EDM's inits: xavier_uniform, biases 0 (DDPM++); kaiming_uniform * sqrt(1/3) (ADM; PyTorch default)."""
    if bias and mode != "kaiming":
        return torch.zeros(shape)
    bound = math.sqrt(1 / fan_in) if mode == "kaiming" else math.sqrt(6 / (fan_in + fan_out))
    return torch.randn(shape) * gain if mode == "normal" else (torch.rand(shape) * 2 - 1) * bound * gain


class Linear(nn.Module):  # EDM's Linear
    def __init__(self, cin, cout, bias=True, gain=1.0, mode="xavier"):
        super().__init__()
        self.weight = nn.Parameter(_init([cout, cin], cin, cout, gain, mode))
        self.bias = nn.Parameter(_init([cout], cin, cout, gain, mode, True)) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


class Conv2d(nn.Module):  # EDM's Conv2d: x2 up/down-sampling by a FIR filter first ([1, 1]: nearest, box)
    def __init__(self, cin, cout, kernel, up=False, down=False, gain=1.0, mode="xavier", filt=(1, 1),
                 fused=False, dims=2):  # fmt: skip
        super().__init__()
        self.up, self.down, self.fused, self.pad = up, down, fused, (len(filt) - 1) // 2
        fan_in, fan_out, shape = cin * kernel * kernel, cout * kernel * kernel, [cout, cin] + [kernel] * dims
        self.weight = nn.Parameter(_init(shape, fan_in, fan_out, gain, mode)) if kernel else None
        self.bias = nn.Parameter(_init([cout], fan_in, cout, gain, mode, True)) if kernel else None
        f = torch.tensor(filt, dtype=torch.float32)
        f = f.ger(f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x):
        f, c, pad = self.resample_filter, x.shape[1], self.pad
        f = None if f is None else f.to(x.dtype)
        if self.up:
            x = F.conv_transpose2d(x, f.mul(4).tile(c, 1, 1, 1), None, 2, pad, groups=c)
        if self.down and not self.fused:
            x = F.conv2d(x, f.tile(c, 1, 1, 1), None, 2, pad, groups=c)
        if self.weight is None:  # kernel 0: resampling only
            return x
        w, b = self.weight.to(x.dtype), self.bias.to(x.dtype)
        w = w if w.ndim == 4 else w[..., None]  # dims 1: a Conv1d-shaped weight
        if self.fused:  # conv, down-sampling, then the bias, as EDM (for NCSN++'s aux_residual)
            x = F.conv2d(x, w, padding=w.shape[-1] // 2 + pad)
            return F.conv2d(x, f.tile(x.shape[1], 1, 1, 1), None, 2, groups=x.shape[1]).add_(b[:, None, None])
        return F.conv2d(x, w, b, padding=w.shape[-1] // 2)


def _attention(qkv, heads, cfm=False):
    """qkv [N, 3C, H, W], channels (head, c, 3) as EDM / (head, 3, c) as guided-diffusion -> [N, C, H, W]."""
    n, c, h, w = qkv.shape[0], qkv.shape[1] // 3, qkv.shape[2], qkv.shape[3]
    shape = (n * heads, 3, c // heads, h * w) if cfm else (n * heads, c // heads, 3, h * w)
    q, k, v = qkv.reshape(shape).unbind(1 if cfm else 2)
    a = torch.einsum("ncq,nck->nqk", q.float(), k.float() / math.sqrt(c // heads)).softmax(dim=2)
    return torch.einsum("nqk,nck->ncq", a.to(v.dtype), v).reshape(n, c, h, w)


def _freqs(n, device, endpoint=False, cfm=False):  # sinusoid frequencies: EDM's, guided-diffusion's
    i = torch.arange(n // 2, device=device, dtype=torch.float32)
    return torch.exp(-math.log(10000) * i / (n // 2)) if cfm else (1 / 10000) ** (i / (n // 2 - endpoint))


class UNetBlock(nn.Module):
    """EDM's UNetBlock: DDPM++ / NCSN++ (skips * sqrt(1/2), 1 head) or ADM (scale-shift norm, 64-ch heads)."""

    def __init__(self, cin, cout, emb, up=False, down=False, attn=False, dropout=0.0, adm=False, filt=(1, 1)):
        super().__init__()
        self.in_channels, self.out_channels, self.dropout, self.adm = cin, cout, dropout, adm
        eps, mode, zero = (1e-5, "kaiming", 0.0) if adm else (1e-6, "xavier", 1e-5)
        self.norm0 = nn.GroupNorm(min(32, cin // 4), cin, eps)
        self.conv0 = Conv2d(cin, cout, 3, up, down, mode=mode, filt=filt)
        self.affine = Linear(emb, cout * (2 if adm else 1), mode=mode)
        self.norm1 = nn.GroupNorm(min(32, cout // 4), cout, eps)
        self.conv1 = Conv2d(cout, cout, 3, gain=zero, mode=mode)
        k = 0 if adm and cin == cout else 1  # ADM's skip of a resampling block keeping its width: no weights
        has_skip = cin != cout or up or down
        self.skip = Conv2d(cin, cout, k, up, down, mode=mode, filt=filt) if has_skip else None
        self.heads = (cout // 64 if adm else 1) if attn else 0  # ADM below 64 channels: none, as EDM
        if self.heads:
            self.norm2 = nn.GroupNorm(min(32, cout // 4), cout, eps)
            self.qkv = Conv2d(cout, cout * 3, 1, gain=1.0 if adm else math.sqrt(0.2), mode=mode)
            self.proj = Conv2d(cout, cout, 1, gain=zero, mode=mode)

    def forward(self, x, emb):
        h = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adm:  # ADM's adaptive group norm: norm(h) * (1 + scale) + shift
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(F.dropout(h, p=self.dropout, training=self.training))
        skip_scale = 1.0 if self.adm else math.sqrt(0.5)
        x = (h + (x if self.skip is None else self.skip(x))) * skip_scale
        if self.heads:
            x = (self.proj(_attention(self.qkv(self.norm2(x)), self.heads)) + x) * skip_scale
        return x


class UNet(nn.Module):
    """EDM's SongUNet (DDPM++, NCSN++) or DhariwalUNet (kind adm); defaults: EDM's CIFAR-10 DDPM++ (56M)."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=(2, 2, 2), num_blocks=4, attn_resolutions=(16,),
                 dropout=0.10, kind="ddpmpp"):  # fmt: skip
        super().__init__()
        self.kind, adm, ncsn = kind, kind == "adm", kind == "ncsnpp"
        mc, emb, nc = model_channels, model_channels * 4, model_channels * (1 + ncsn)
        mode, filt = "kaiming" if adm else "xavier", (1, 3, 3, 1) if ncsn else (1, 1)
        blk = dict(emb=emb, dropout=dropout, adm=adm, filt=filt)
        if ncsn:  # NCSN++'s random frequencies, drawn first: EDM's buffer map_noise.freqs
            self.map_noise = nn.Module()
            self.map_noise.register_buffer("freqs", torch.randn(nc // 2) * 16)
        self.map_label = Linear(label_dim, nc) if label_dim and not adm else None
        self.map_augment = Linear(augment_dim, nc, False, 1.0 - adm, mode) if augment_dim else None
        self.map_layer0, self.map_layer1 = Linear(nc, emb, mode=mode), Linear(emb, emb, mode=mode)
        if label_dim and adm:  # ADM's label map joins after the noise MLP
            self.map_label = Linear(label_dim, emb, bias=False, mode="normal")
        self.enc, self.dec = nn.ModuleDict(), nn.ModuleDict()
        cout, caux, skips, c0 = in_channels, in_channels, [], mc * channel_mult[0] if adm else mc
        for level, mult in enumerate(channel_mult):
            r, c = img_resolution >> level, mc * mult
            if level == 0:
                self.enc[f"{r}x{r}_conv"], cout = Conv2d(cout, c0, 3, mode=mode), c0
            else:
                self.enc[f"{r}x{r}_down"] = UNetBlock(cout, cout, down=True, **blk)
                if ncsn:  # NCSN++: the input image, down-sampled alongside, joins through a strided conv
                    aux = Conv2d(caux, cout, 3, down=True, filt=filt, fused=True)
                    self.enc[f"{r}x{r}_aux_residual"], caux = aux, cout
            skips.append(cout)
            for i in range(num_blocks):
                self.enc[f"{r}x{r}_block{i}"], cout = UNetBlock(cout, c, attn=r in attn_resolutions, **blk), c
                skips.append(cout)
        for level, mult in reversed(list(enumerate(channel_mult))):
            r, c = img_resolution >> level, mc * mult
            if level == len(channel_mult) - 1:
                self.dec[f"{r}x{r}_in0"] = UNetBlock(cout, cout, attn=True, **blk)
                self.dec[f"{r}x{r}_in1"] = UNetBlock(cout, cout, **blk)
            else:
                self.dec[f"{r}x{r}_up"] = UNetBlock(cout, cout, up=True, **blk)
            for i in range(num_blocks + 1):
                a = r in attn_resolutions and (adm or i == num_blocks)
                self.dec[f"{r}x{r}_block{i}"], cout = UNetBlock(cout + skips.pop(), c, attn=a, **blk), c
        if adm:
            self.out_norm = nn.GroupNorm(min(32, cout // 4), cout)
            self.out_conv = Conv2d(cout, out_channels, 3, gain=0.0, mode=mode)
        else:
            self.dec[f"{r}x{r}_aux_norm"] = nn.GroupNorm(min(32, cout // 4), cout, 1e-6)  # r: img_resolution
            self.dec[f"{r}x{r}_aux_conv"] = Conv2d(cout, out_channels, 3, gain=1e-5)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        # Noise embedding: SongUNet [sin, cos] (positional with endpoint=True, or Fourier), ADM [cos, sin]
        adm, n = self.kind == "adm", self.map_layer0.weight.shape[1]
        freqs = 2 * math.pi * self.map_noise.freqs if self.kind == "ncsnpp" else _freqs(n, x.device, not adm)
        arg = noise_labels.float().ger(freqs)
        emb = torch.cat([arg.cos(), arg.sin()] if adm else [arg.sin(), arg.cos()], dim=1)
        if self.map_label is not None and not adm:
            emb = emb + self.map_label(class_labels * math.sqrt(self.map_label.weight.shape[1]))
        if self.map_augment is not None:  # no augmentation = zero label: every weight joins the graph (DDP)
            if augment_labels is None:
                augment_labels = torch.zeros(len(x), self.map_augment.weight.shape[1], device=x.device)
            emb = emb + self.map_augment(augment_labels.float())
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None and adm:
            emb = emb + self.map_label(class_labels)
        emb, skips, aux = F.silu(emb), [], x
        for name, block in self.enc.items():
            if name.endswith("aux_residual"):
                x = skips[-1] = aux = (x + block(aux)) / math.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
        blocks = [*self.dec.values(), *([self.out_norm, self.out_conv] if adm else [])]
        for block in blocks[:-2]:
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return blocks[-1](F.silu(blocks[-2](x)))  # aux_norm, aux_conv or ADM's out_norm, out_conv


class ADMUNet(UNet):  # EDM's DhariwalUNet; defaults: EDM's ImageNet-64 configuration (about 296M parameters)
    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3, attn_resolutions=(32, 16, 8),
                 dropout=0.10):  # fmt: skip
        super().__init__(img_resolution, in_channels, out_channels, label_dim, augment_dim, model_channels,
                         channel_mult, num_blocks, attn_resolutions, dropout, kind="adm")  # fmt: skip


class CFMResBlock(nn.Module):  # guided-diffusion's ResBlock without scale-shift norm, zero-init output conv
    def __init__(self, cin, cout, emb, dropout):
        super().__init__()
        conv0, conv1 = Conv2d(cin, cout, 3, mode="kaiming"), Conv2d(cout, cout, 3, gain=0.0, mode="kaiming")
        self.in_layers = nn.Sequential(nn.GroupNorm(32, cin), nn.SiLU(), conv0)
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb, cout, mode="kaiming"))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, cout), nn.SiLU(), nn.Dropout(dropout), conv1)
        self.skip_connection = nn.Identity() if cin == cout else Conv2d(cin, cout, 1, mode="kaiming")

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class CFMAttention(nn.Module):  # guided-diffusion's AttentionBlock: heads of 64 channels, zero-init proj_out
    def __init__(self, c):
        super().__init__()
        self.heads, self.norm = max(c // 64, 1), nn.GroupNorm(32, c)
        self.qkv = Conv2d(c, c * 3, 1, mode="kaiming", dims=1)
        self.proj_out = Conv2d(c, c, 1, gain=0.0, mode="kaiming", dims=1)

    def forward(self, x, emb):
        return x + self.proj_out(_attention(self.qkv(self.norm(x)), self.heads, cfm=True))


class CFMResample(nn.ModuleDict):  # guided-diffusion's Upsample (nearest, conv) / Downsample (stride 2)
    def __init__(self, c, up):
        super().__init__({"conv" if up else "op": Conv2d(c, c, 3, mode="kaiming")})

    def forward(self, x, emb):
        if "conv" in self:
            return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))
        return F.conv2d(x, self.op.weight.to(x.dtype), self.op.bias.to(x.dtype), stride=2, padding=1)


class CFMUNet(nn.Module):
    """guided-diffusion's UNet as torchcfm's UNetModelWrapper builds it; defaults: its CIFAR-10 net (36M)."""

    def __init__(self, img_resolution, in_channels, out_channels, label_dim=0, augment_dim=0,
                 model_channels=128, channel_mult=(1, 2, 2, 2), num_blocks=2, attn_resolutions=(16,),
                 dropout=0.1):  # fmt: skip
        super().__init__()
        if augment_dim:
            raise ValueError(f"arch adm-cfm has no augmentation labels: use augment_dim 0, not {augment_dim}")
        mc, emb, ch = model_channels, model_channels * 4, model_channels * channel_mult[0]
        lin0, lin1 = Linear(mc, emb, mode="kaiming"), Linear(emb, emb, mode="kaiming")
        self.time_embed = nn.Sequential(lin0, nn.SiLU(), lin1)
        self.label_emb = nn.Embedding(label_dim, emb) if label_dim else None
        self.input_blocks = nn.ModuleList([nn.ModuleList([Conv2d(in_channels, ch, 3, mode="kaiming")])])
        chans = [ch]
        for level, mult in enumerate(channel_mult):
            attn = img_resolution >> level in attn_resolutions
            for _ in range(num_blocks):
                block, ch = [CFMResBlock(ch, mc * mult, emb, dropout)], mc * mult
                self.input_blocks.append(nn.ModuleList(block + ([CFMAttention(ch)] if attn else [])))
                chans.append(ch)
            if level < len(channel_mult) - 1:
                self.input_blocks.append(nn.ModuleList([CFMResample(ch, up=False)]))
                chans.append(ch)
        mid = [CFMResBlock(ch, ch, emb, dropout), CFMAttention(ch), CFMResBlock(ch, ch, emb, dropout)]
        self.middle_block, self.output_blocks = nn.ModuleList(mid), nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            attn = img_resolution >> level in attn_resolutions
            for i in range(num_blocks + 1):
                block, ch = [CFMResBlock(ch + chans.pop(), mc * mult, emb, dropout)], mc * mult
                block += [CFMAttention(ch)] if attn else []
                block += [CFMResample(ch, up=True)] if level and i == num_blocks else []
                self.output_blocks.append(nn.ModuleList(block))
        conv = Conv2d(ch, out_channels, 3, gain=0.0, mode="kaiming")
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(), conv)

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        arg = noise_labels.float().ger(_freqs(self.time_embed[0].weight.shape[1], x.device, cfm=True))
        emb = self.time_embed(torch.cat([arg.cos(), arg.sin()], dim=1))
        if self.label_emb is not None:  # one-hot labels times label_emb.weight: its lookup, exactly
            emb = emb + class_labels.to(emb.dtype) @ self.label_emb.weight.to(emb.dtype)
        h, hs, n_in = x, [], len(self.input_blocks)
        for i, layers in enumerate([*self.input_blocks, self.middle_block, *self.output_blocks]):
            if i > n_in:  # output blocks take the input blocks' outputs, last first
                h = torch.cat([h, hs.pop()], dim=1)
            for layer in layers:
                h = layer(h) if isinstance(layer, Conv2d) else layer(h, emb)
            if i < n_in:
                hs.append(h)
        return self.out(h)


ARCHS = {"ddpmpp": UNet, "ncsnpp": lambda *a, **k: UNet(*a, **k, kind="ncsnpp"), "adm": ADMUNet}
ARCHS["adm-cfm"] = CFMUNet


def make_unet(arch, *args, **kwargs):
    """ddpmpp | ncsnpp | adm: EDM's nets and state_dict keys; adm-cfm: torchcfm's (LOOM's) UNet and keys."""
    if arch not in ARCHS:
        raise ValueError(f"unknown network architecture {arch!r}: use one of {sorted(ARCHS)}")
    return ARCHS[arch](*args, **kwargs)


# --- end UNet ---


if __name__ == "__main__":
    main()

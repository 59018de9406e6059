"""LMM: Generative Lines Matching Models (Matityahu & Fattal, 2024).

A deterministic teacher sampler pairs every noise x0 with one image x1 = N*_Sampler(x0) (EDM, 18 Heun steps
for CIFAR-10; made by gen_pairs.py). The LMM N_theta learns the *globally straight* lines between them: from
any point x_sigma = x1 + sigma * x0 of a line it predicts the line's end x1 (Eq. 3), under EDM's
preconditioning. Because the target is an image, the distance can be perceptual (LPIPS-VGG), an adversarial
loss against real data can be added with VQGAN's adaptive weight (Eq. 5), and training can be restricted to
the noise levels the sampler uses (Sampling-Optimised Training). Sampling (App. A.4): x = sigma_max * noise,
then x_hat = N_theta(x, sigma_t) and x = x_hat + sigma_{t+1} * eta on a few indices t of EDM's schedule.

Convention (VE, as the paper and EDM): x0 ~ N(0, I) is the noise, x1 the teacher's image in [-1, 1],
x_sigma = x1 + sigma * x0 with sigma in [sigma_min, sigma_max] = [0.002, 80]; sigma = 80 is the noise end.
Step indices t refer to EDM's rho = 7 schedule of --sched-steps levels (18 for CIFAR-10, 40 at 64x64).

Choices where the paper is silent (each is a flag):
  - sigma for Eq. 3 is drawn from EDM's rho-schedule at a continuous u ~ U[0, 1] (--sigma-dist rho): the
    density of the sampling steps, sigma_max included, which the 1-2 step sampler starts from. EDM's
    training log-normal (--sigma-dist lognormal) almost never reaches sigma > 20.
  - L2 is the mean squared error per image; LPIPS is the `lpips` package's VGG variant.
  - The adversarial loss is the hinge form used by CTM (Kim et al.), whose discriminator LMM adopts, not the
    log form written in Eq. 5. --disc ctm (default) is CTM's projected discriminator (sony/ctm pg_modules:
    frozen timm DeiT-B and EfficientNet-lite0 at 224 px, random cross-channel and cross-scale mixing,
    multi-scale heads; conditional heads by class projection, as App. A.4 says, where CTM's public CIFAR-10
    code builds unconditional ones: --disc-uncond).
  - G/D schedule: CTM's g_learning_period, --g-period 2 (its CIFAR-10 command): in the adversarial phase the
    steps alternate between one N_theta update and one D update (D on fakes N_theta makes from that step's
    pairs); each step is one iteration of Table 6's count. The paper names no schedule beyond "similar to
    CTM". --g-period 1: every step updates N_theta, then D against it.
  - lambda_adapt is clipped to [0.01, 10] as CTM does (--adapt-clamp); it uses the gradients of the global
    batch (all-reduced over ranks), computed per --batch-gpu chunk when gradients are accumulated.
  - Weights start random unless --init TEACHER (the paper does not say; CTM and consistency distillation
    start from the teacher, as docs/lmm.md's recipes do). SOT is fine-tuning (Sec. 3): --sot-start KIMG.
  - The real images default to the teacher's dataset recorded in the pairs' meta (gen_pairs.py).

Commands
  Pairs first (see gen_pairs.py), then a CPU smoke run on them (tiny net, L2, no discriminator):
    python lmm.py --pairs pairs_shapes.npz --outdir runs/lmm-shapes --tiny --loss l2 --adv-start off \\
        --duration 0.05 --batch 64
  The paper's CIFAR-10 run (Table 6: LPIPS at 64 px for 80k steps, then LPIPS at 224 px + adversarial loss
  for 20k steps, batch 512) from the converted official EDM teacher, 4 GPUs (real images: the pairs' cifar10):
    torchrun --standalone --nproc_per_node=4 lmm.py --pairs pairs_cifar10.npz --init edm_cifar10_cond.pt \\
        --outdir runs/lmm-cifar10
  Generate 50,000 images with Table 7's steps (0, 1) (image i from seed i, same for any number of GPUs):
    python lmm.py --generate 50000 --ckpt runs/lmm-cifar10 --nfe 2 --out lmm-nfe2.npz     # or --steps 0,3,5
  Table 7 columns (docs/lmm.md has each command): --loss l2 --adv-start off | --adv-start off --lpips-res 64 |
  (default) | --sot 0 (NFE 1) or --sot 0,1, with --sot-start 40960.
  Other datasets: --preset afhq64 | imagenet64 (Table 6 columns; ImageNet-64's generator is ADM, the
  network of EDM's edm-imagenet-64x64-cond-adm.pkl teacher, which --init loads once tools/convert_edm.py has
  converted it).
"""

import argparse
import contextlib
import copy
import functools
import inspect
import json
import math
import os
import shutil
import signal
import struct
import time
import warnings
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --- method: Lines Matching Model (Matityahu & Fattal) ---
# N_theta is EDM-preconditioned (the EDM preconditioning block, first in the shared appendix at the end).
METHOD = "lmm"
VERSION = 1
# LMM Table 7: the step indices t of EDM's schedule behind each NFE (for 3: the better of (0,1,2) and (0,3,5))
NFE_STEPS = {1: (0,), 2: (0, 1), 3: (0, 3, 5), 4: (0, 1, 3, 5)}
SCHEDULE = dict(steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0)  # EDM's CIFAR-10 schedule (App. A.4)


def lmm_schedule(steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """LMM App. A.4 (EDM Eq. 5), t = 0..N-1:
    sigma_t = (sigma_max^(1/rho) + t/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, float64 [N].
    The step indices of Tables 7-9 index this list."""
    t = torch.arange(steps, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + t / max(steps - 1, 1) * (b - a)) ** rho


def draw_sigma(n, dist="rho", sot=None, schedule=None, P_mean=-1.2, P_std=1.2, device="cpu"):
    """Noise levels [n] for Eq. 3 (global RNG). sot: Sampling-Optimised Training (Sec. 3), sigma uniform over
    the schedule's levels at those indices. Otherwise dist 'rho': EDM's schedule at continuous u ~ U[0, 1]
    over [sigma_min, sigma_max]; 'lognormal': EDM's ln sigma ~ N(P_mean, P_std^2)."""
    s = dict(SCHEDULE, **(schedule or {}))
    if sot:
        levels = lmm_schedule(**s)[list(sot)].float().to(device)
        return levels[torch.randint(len(levels), (n,), device=device)]
    if dist == "lognormal":
        return (torch.randn(n, device=device) * P_std + P_mean).exp()
    a, b = s["sigma_max"] ** (1 / s["rho"]), s["sigma_min"] ** (1 / s["rho"])
    return (a + torch.rand(n, device=device) * (b - a)) ** s["rho"]


def lmm_loss(net, x0, x1, sigma, labels=None, distance=None):
    """LMM Eq. 3: || N_theta(x1 + sigma x0, sigma) - x1 ||_p per pair, [N]; also N_theta's output (the sample
    the adversarial loss judges). distance(a, b) -> [N]; None: squared L2, mean over pixels."""
    x_sigma = x1 + sigma.reshape(-1, 1, 1, 1) * x0  # a point on the line from x1 (sigma=0) towards noise
    x1_hat = net(x_sigma, sigma, class_labels=labels)
    d = (x1_hat - x1).square().flatten(1).mean(1) if distance is None else distance(x1_hat, x1)
    return d, x1_hat


VGG_FILE = "vgg16-397923af.pth"


def make_lpips(device, random_trunk=False):
    """LPIPS-VGG (Zhang et al. 2018) from the `lpips` package, frozen and in eval mode. random_trunk: VGG16
    with random weights (tests only: no download). Offline without the VGG16 weights: a one-line error."""
    import lpips

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's deprecation of `pretrained=` inside lpips
            model = lpips.LPIPS(net="vgg", pnet_rand=random_trunk, verbose=False)
    except Exception as e:
        fail(
            f"cannot load the VGG16 weights for LPIPS ({type(e).__name__}): put {VGG_FILE} in "
            f"{os.path.join(torch.hub.get_dir(), 'checkpoints')}/ ($TORCH_HOME/hub/checkpoints) "
            "or use --loss l2"
        )
    return model.eval().requires_grad_(False).to(device)


def lpips_distance(model, a, b, res):
    """LPIPS of images in [-1, 1], both bilinearly resized to res x res first (224 in LMM App. A.4), [N]."""
    if a.shape[-1] != res:
        a = F.interpolate(a, size=(res, res), mode="bilinear", align_corners=False)
        b = F.interpolate(b, size=(res, res), mode="bilinear", align_corners=False)
    return model(a, b).flatten()


# --- adversarial loss (LMM Eq. 5 with CTM's discriminator, VQGAN's adaptive weight, DiffAugment) ---


def adaptive_weight(loss_lines, loss_g, last_layer, clamp=(0.01, 10.0), eps=1e-4):
    """VQGAN's adaptive weight (Esser et al. 2021, Eq. 7; LMM App. A.4):
    lambda_adapt = ||grad_{W_L} L_lines|| / (||grad_{W_L} L_G|| + 1e-4), clipped to [0.01, 10] as CTM does
    (its clamp to [0, 1e4], then th.clip(d_weight, 0.01, 10.)) and detached. W_L is the network's last
    layer. Under torchrun the two gradients are averaged over ranks first (global batch)."""
    (g_lines,) = torch.autograd.grad(loss_lines, last_layer, retain_graph=True)
    (g_adv,) = torch.autograd.grad(loss_g, last_layer, retain_graph=True)
    if torch.distributed.is_initialized():
        g = torch.stack([g_lines, g_adv]) / torch.distributed.get_world_size()
        torch.distributed.all_reduce(g)
        g_lines, g_adv = g[0], g[1]
    return (g_lines.norm() / (g_adv.norm() + eps)).clamp(*clamp).detach()


def d_hinge_loss(d_real, d_fake):
    """Discriminator hinge loss: relu(1 - D(real)) + relu(1 + D(fake)), mean over images and patches."""
    return F.relu(1 - d_real).mean() + F.relu(1 + d_fake).mean()


def g_hinge_loss(d_fake):
    return -d_fake.mean()


def diff_augment(x, policy=("color", "translation", "cutout"), translation=0.125, cutout=0.2):
    """DiffAugment (Zhao et al. 2020), independently per image, differentiable in x (global RNG).
    color: brightness +U[-0.5, 0.5), saturation x U[0, 2), contrast x U[0.5, 1.5); translation: integer shift
    of up to translation * size pixels per axis, zero fill; cutout: a zeroed square of cutout * size."""
    n, _, h, w = x.shape
    dev = x.device
    if "color" in policy:
        x = x + (torch.rand(n, 1, 1, 1, device=dev) - 0.5)
        mean = x.mean(1, keepdim=True)
        x = (x - mean) * (torch.rand(n, 1, 1, 1, device=dev) * 2) + mean
        mean = x.mean((1, 2, 3), keepdim=True)
        x = (x - mean) * (torch.rand(n, 1, 1, 1, device=dev) + 0.5) + mean
    if "translation" in policy:
        sy, sx = int(h * translation + 0.5), int(w * translation + 0.5)
        dy = torch.randint(-sy, sy + 1, (n, 1, 1), device=dev)
        dx = torch.randint(-sx, sx + 1, (n, 1, 1), device=dev)
        yy = torch.arange(h, device=dev).reshape(1, h, 1) - dy  # output (y, x) shows input (y - dy, x - dx)
        xx = torch.arange(w, device=dev).reshape(1, 1, w) - dx
        inside = ((yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)).unsqueeze(1)
        flat = (yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)).reshape(n, 1, h * w)
        x = x.flatten(2).gather(2, flat.expand(-1, x.shape[1], -1)).reshape(x.shape) * inside
    if "cutout" in policy:
        ch, cw = int(h * cutout + 0.5), int(w * cutout + 0.5)
        cy = torch.randint(0, h + (1 - ch % 2), (n, 1, 1), device=dev)
        cx = torch.randint(0, w + (1 - cw % 2), (n, 1, 1), device=dev)
        yy = torch.arange(h, device=dev).reshape(1, h, 1)
        xx = torch.arange(w, device=dev).reshape(1, 1, w)
        hole = (
            (yy >= cy - ch // 2) & (yy < cy - ch // 2 + ch) & (xx >= cx - cw // 2) & (xx < cx - cw // 2 + cw)
        )
        x = x * ~hole.unsqueeze(1)
    return x


def _sn(module):
    return nn.utils.parametrizations.spectral_norm(module)


class PatchDisc(nn.Module):
    """--disc patch: a small discriminator trained from scratch (works offline): spectral-norm convs, three
    stride-2 stages, a grid of patch logits; class-conditional by projection (Miyato & Koyama 2018)."""

    def __init__(self, img_channels, label_dim=0, width=64):
        super().__init__()
        layers, c = [_sn(nn.Conv2d(img_channels, width, 3, 1, 1)), nn.LeakyReLU(0.2)], width
        for _ in range(3):
            layers += [_sn(nn.Conv2d(c, 2 * c, 4, 2, 1)), nn.LeakyReLU(0.2)]
            c *= 2
        self.body, self.out = nn.Sequential(*layers), _sn(nn.Conv2d(c, 1, 3, 1, 1))
        self.embed = _sn(nn.Linear(label_dim, c, bias=False)) if label_dim else None

    def forward(self, x, onehot=None, augment=()):
        h = self.body(diff_augment(x, augment) if augment else x)
        logits = self.out(h)
        if self.embed is not None:
            logits = logits + (self.embed(onehot)[:, :, None, None] * h).sum(1, keepdim=True)
        return logits.flatten(1)  # [N, patches]


# --- --disc ctm: CTM's discriminator (Kim et al. 2024; sony/ctm pg_modules: Projected GAN, StyleGAN-XL) ---

CTM_BACKBONES = ("deit_base_distilled_patch16_224", "tf_efficientnet_lite0")  # CTM's d_backbone, its order


def _timm_net(name, pretrained):
    """A timm ImageNet network. Offline without its weights: one line naming the file and timm's cache."""
    import timm

    if not timm.is_model(name):
        fail(f"--disc-backbones: {name!r} is not a timm model (CTM uses {','.join(CTM_BACKBONES)})")
    try:
        return timm.create_model(name, pretrained=pretrained)
    except Exception as e:
        if not pretrained:
            raise
        from huggingface_hub import constants

        hub = getattr(timm.models.get_pretrained_cfg(name), "hf_hub_id", None) or name
        fail(
            f"cannot load the ImageNet weights of {name} for --disc ctm ({type(e).__name__}): timm looks for "
            f"model.safetensors (or pytorch_model.bin) of the Hugging Face repo {hub} in "
            f"{constants.HF_HUB_CACHE}/ ($HF_HUB_CACHE, $HF_HOME/hub); fetch it there where online "
            f"(huggingface-cli download {hub}) or use --disc patch"
        )


def _up2(x):
    return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True)


class TimmFeatures(nn.Module):
    """One frozen feature network of CTM's discriminator (Projected GAN's F_RandomProj, proj_type 2): a timm
    ImageNet network cut into 4 maps at 1/4, 1/8, 1/16, 1/32 of its input; random 1x1 cross-channel mixing
    (CCM) to 64, 128, 256, 512 channels; cross-scale mixing (CSM) from coarse to fine,
    p_3 = conv1x1(up2(c_3)), p_k = conv1x1(up2(p_{k+1} + c_k)), halving the channels except at the finest:
    maps of 64, 64, 128, 256 channels at 1/2, 1/4, 1/8, 1/16 of the input. EfficientNet: after blocks 2,
    3, 5, 7; DeiT/ViT: the patch tokens (readout tokens dropped) after blocks 3, 6, 9, 12, reassembled as DPT
    does (1x1 conv to D/8, D/4, D/2, D channels, then a x4 and a x2 transposed conv, none, a stride-2 3x3).
    Every weight is frozen, the random ones included; BatchNorm stays in eval mode."""

    def __init__(self, name, pretrained=True, res=224):
        super().__init__()
        net = _timm_net(name, pretrained)
        cfg = net.pretrained_cfg  # the network's own input normalisation (lite0: 0.5 / 0.5; DeiT: ImageNet's)
        self.register_buffer("mean", torch.tensor(cfg["mean"]).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(cfg["std"]).reshape(1, 3, 1, 1))
        self.vit = hasattr(net, "pos_embed")
        if self.vit:
            if len(net.blocks) != 12:
                fail(f"--disc-backbones {name}: CTM's ViT features take a 12-block ViT (tiny, small or base)")
            d, self.backbone = net.embed_dim, net
            w = [d // 8, d // 4, d // 2, d]
            self.reassemble = nn.ModuleList(
                [
                    nn.Sequential(nn.Conv2d(d, w[0], 1), nn.ConvTranspose2d(w[0], w[0], 4, stride=4)),
                    nn.Sequential(nn.Conv2d(d, w[1], 1), nn.ConvTranspose2d(w[1], w[1], 2, stride=2)),
                    nn.Conv2d(d, w[2], 1),
                    nn.Sequential(nn.Conv2d(d, w[3], 1), nn.Conv2d(w[3], w[3], 3, stride=2, padding=1)),
                ]
            )
        elif hasattr(net, "conv_stem") and len(getattr(net, "blocks", ())) == 7:
            b = net.blocks  # timm's bn1 holds the stem activation (act1 in older timm, as CTM's code has)
            self.backbone = nn.ModuleList(
                [
                    nn.Sequential(net.conv_stem, net.bn1, *b[:2]),
                    b[2],
                    nn.Sequential(*b[3:5]),
                    nn.Sequential(*b[5:]),
                ]
            )
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
        if not self.vit:
            out = []
            for stage in self.backbone:
                x = stage(x)
                out.append(x)
            return out
        v, g = self.backbone, x.shape[-1] // 16
        t = v.patch_embed.proj(x).flatten(2).transpose(1, 2)  # [N, g*g, D]
        prefix = [v.cls_token] + ([v.dist_token] if getattr(v, "dist_token", None) is not None else [])
        pos, n0 = v.pos_embed, len(prefix)
        g0 = int(math.isqrt(pos.shape[1] - n0))
        if g != g0:  # other input sizes: bilinear position embeddings, as CTM's forward_flex
            grid = pos[:, n0:].reshape(1, g0, g0, -1).permute(0, 3, 1, 2)
            grid = F.interpolate(grid, size=(g, g), mode="bilinear", align_corners=False)
            pos = torch.cat([pos[:, :n0], grid.permute(0, 2, 3, 1).reshape(1, g * g, -1)], dim=1)
        t = v.pos_drop(torch.cat([p.expand(len(t), -1, -1) for p in prefix] + [t], dim=1) + pos)
        out = []
        for i, block in enumerate(v.blocks):
            t = block(t)
            if i in (2, 5, 8, 11):
                m = t[:, n0:].transpose(1, 2).unflatten(2, (g, g))
                out.append(self.reassemble[len(out)](m))
        return out

    def forward(self, x):
        c = [m(f) for m, f in zip(self.ccm, self.backbone_maps(x), strict=True)]
        p = [self.csm[3](_up2(c[3]))]
        for k in (2, 1, 0):
            p.insert(0, self.csm[k](_up2(p[0] + c[k])))
        return p


class EqualizedLinearLReLU(nn.Module):
    """StyleGAN's FullyConnectedLayer(activation='lrelu'): weight N(0, 1) scaled by 1/sqrt(fan_in) at run
    time, leaky ReLU 0.2 with gain sqrt(2)."""

    def __init__(self, cin, cout):
        super().__init__()
        self.weight, self.bias = nn.Parameter(torch.randn(cout, cin)), nn.Parameter(torch.zeros(cout))

    def forward(self, x):
        x = F.linear(x, self.weight / math.sqrt(self.weight.shape[1]), self.bias)
        return F.leaky_relu(x, 0.2) * math.sqrt(2)


class CTMHead(nn.Module):
    """CTM's SingleDisc / SingleDiscCond on one feature map: spectral-norm 4x4 stride-2 DownBlocks
    (+ BatchNorm, LeakyReLU 0.2) from the map's size down to 8 x 8, with Projected GAN's channel plan by size
    (128 and 64 px: 64, 32: 128, 16: 256, 8: 512; a size snaps to the nearest key, as CTM's 112, 56, ...),
    then a 4x4 spectral-norm conv to patch logits (4 x 4 at 224 px input). Conditional (StyleGAN-XL): that
    conv gives 64 channels whose dot product with a projected class embedding, / sqrt(64), is the logit;
    the embedding is learnt (CTM loads ImageNet's for ImageNet; none exists for other labels)."""

    NFC = {4: 512, 8: 512, 16: 256, 32: 128, 64: 64, 128: 64, 256: 32, 512: 16, 1024: 8}

    def __init__(self, cin, size, label_dim=0, cmap_dim=64, embed_dim=320):
        super().__init__()
        layers, c, s = [], cin, min(self.NFC, key=lambda k: abs(k - size))
        while s > 8:
            s //= 2
            layers += [
                _sn(nn.Conv2d(c, self.NFC[s], 4, 2, 1)),
                nn.BatchNorm2d(self.NFC[s]),
                nn.LeakyReLU(0.2),
            ]
            c, size = self.NFC[s], size // 2
        self.main = nn.Sequential(*layers)
        self.cmap_dim = cmap_dim if label_dim else 1
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
    """--disc ctm (default): CTM's ProjectedDiscriminator + MultiScaleD, which LMM App. A.4 adopts. Per
    feature network: one DiffAugment draw of the image in [-1, 1], then [0, 1], the network's normalisation,
    bilinear resize to res (224), the frozen TimmFeatures and a trainable CTMHead per map. Output: every
    head's patch logits [N, 2 x 4 x 16] at 224 px; the hinge losses average them (as CTM's per-logit mean)."""

    def __init__(self, label_dim=0, backbones=CTM_BACKBONES, res=224, pretrained=True):
        super().__init__()
        self.res = res
        self.features = nn.ModuleList(TimmFeatures(name, pretrained, res) for name in backbones)
        self.heads = nn.ModuleList(
            nn.ModuleList(CTMHead(c, s, label_dim) for c, s in zip(f.channels, f.sizes, strict=True))
            for f in self.features
        )

    def forward(self, x, onehot=None, augment=()):
        logits = []
        for feat, heads in zip(self.features, self.heads, strict=True):
            h = diff_augment(x, augment) if augment else x  # CTM: a fresh draw for each feature network
            h = ((h + 1) / 2 - feat.mean) / feat.std
            h = F.interpolate(h, size=(self.res, self.res), mode="bilinear", align_corners=False)
            logits += [head(f, onehot) for head, f in zip(heads, feat(h), strict=True)]
        return torch.cat(logits, dim=1)


# --- --disc torchvision: the same projected design on torchvision networks (this file's earlier default) ---


def _imagenet_net(name, pretrained):
    import torchvision

    weights = torchvision.models.get_model_weights(name).IMAGENET1K_V1 if pretrained else None
    try:
        return getattr(torchvision.models, name)(weights=weights)
    except Exception as e:
        fail(
            f"cannot load the ImageNet weights of {name} for --disc torchvision ({type(e).__name__}): put "
            f"{os.path.basename(weights.url)} in {os.path.join(torch.hub.get_dir(), 'checkpoints')}/ "
            "or use --disc patch"
        )


class FeatureNet(nn.Module):
    """A frozen ImageNet network -> 4 feature maps at 1/4, 1/8, 1/16, 1/32 of its input size.
    efficientnet_b0: the outputs of stages 2, 3, 5, 7; vit_b_16: tokens after blocks 3, 6, 9, 12 as
    14x14 maps, resized to those sizes (DPT-style reassembly, as Projected GAN does with DeiT)."""

    def __init__(self, name, pretrained=True):
        super().__init__()
        self.name, self.backbone = name, _imagenet_net(name, pretrained)
        self.requires_grad_(False).eval()

    def train(self, mode=True):
        return super().train(False)  # frozen: BatchNorm statistics and dropout stay in eval mode

    def forward(self, x):
        size = x.shape[-1]
        if self.name.startswith("efficientnet"):
            out = []
            for i, stage in enumerate(self.backbone.features[:8]):
                x = stage(x)
                if i in (2, 3, 5, 7):
                    out.append(x)
            return out
        v = self.backbone
        x = v._process_input(x)
        x = torch.cat([v.class_token.expand(x.shape[0], -1, -1), x], dim=1) + v.encoder.pos_embedding
        out, g = [], size // v.patch_size
        for i, block in enumerate(v.encoder.layers):
            x = block(x)
            if i in (2, 5, 8, 11):
                m = x[:, 1:].transpose(1, 2).reshape(x.shape[0], -1, g, g)
                out.append(
                    F.interpolate(m, size=size >> (2 + len(out)), mode="bilinear", align_corners=False)
                )
        return out


class DiscHead(nn.Module):
    """One scale of the torchvision discriminator: spectral-norm 4x4 stride-2 convs (+ BatchNorm, LeakyReLU)
    down to <= 8x8, then patch logits; conditional: <features, class embedding> / sqrt(64) (StyleGAN-XL)."""

    def __init__(self, cin, size, label_dim=0):
        super().__init__()
        layers, c = [], cin
        while size > 8:
            size //= 2
            cout = 64 if size > 32 else 128 if size > 16 else 256 if size > 8 else 512
            layers += [_sn(nn.Conv2d(c, cout, 4, 2, 1)), nn.BatchNorm2d(cout), nn.LeakyReLU(0.2)]
            c = cout
        self.body = nn.Sequential(*layers)
        self.cmap_dim = 64 if label_dim else 1
        self.out = _sn(nn.Conv2d(c, self.cmap_dim, min(4, size), 1, 0))
        self.embed = nn.Linear(label_dim, self.cmap_dim) if label_dim else None

    def forward(self, h, onehot=None):
        h = self.out(self.body(h))
        if self.embed is not None:
            h = (h * self.embed(onehot)[:, :, None, None]).sum(1, keepdim=True) / math.sqrt(self.cmap_dim)
        return h.flatten(1)


class TorchvisionDisc(nn.Module):
    """--disc torchvision: images resized to res, normalised for ImageNet, fed to frozen torchvision networks
    (efficientnet_b0, vit_b_16); their 4 maps pass a frozen random cross-channel (1x1) and top-down
    cross-scale (3x3) mixing; a trainable spectral-norm patch head per map. One DiffAugment draw for all
    networks. Output: all heads' patch logits, [N, patches]."""

    def __init__(self, label_dim=0, backbones=("efficientnet_b0", "vit_b_16"), res=224, pretrained=True):
        super().__init__()
        self.res = res
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1))
        self.features, self.ccm, self.csm, self.heads = (nn.ModuleList() for _ in range(4))
        widths = (64, 128, 256, 512)
        for name in backbones:
            feat = FeatureNet(name, pretrained)
            with torch.no_grad():
                chans = [f.shape[1] for f in feat(torch.zeros(1, 3, res, res))]
            ccm = nn.ModuleList(nn.Conv2d(c, w, 1) for c, w in zip(chans, widths, strict=True))
            csm = nn.ModuleList(nn.Conv2d(w, w, 3, padding=1) for w in widths)
            csm.lift = nn.ModuleList(nn.Conv2d(widths[k + 1], widths[k], 1) for k in range(3))
            self.features.append(feat)
            self.ccm.append(ccm.requires_grad_(False))
            self.csm.append(csm.requires_grad_(False))
            self.heads.append(
                nn.ModuleList(DiscHead(w, res >> (2 + k), label_dim) for k, w in enumerate(widths))
            )

    def forward(self, x, onehot=None, augment=()):
        x = diff_augment(x, augment) if augment else x
        x = F.interpolate(x, size=(self.res, self.res), mode="bilinear", align_corners=False)
        x = ((x + 1) / 2 - self.mean) / self.std
        logits = []
        for feat, ccm, csm, heads in zip(self.features, self.ccm, self.csm, self.heads, strict=True):
            p = [m(f) for m, f in zip(ccm, feat(x), strict=True)]
            for k in (3, 2, 1, 0):  # cross-scale mixing, coarse to fine
                if k < 3:
                    p[k] = p[k] + F.interpolate(csm.lift[k](p[k + 1]), size=p[k].shape[-2:], mode="nearest")
                p[k] = csm[k](p[k])
            logits += [head(h, onehot) for head, h in zip(heads, p, strict=True)]
        return torch.cat(logits, dim=1)


DISC_BACKBONES = {"ctm": CTM_BACKBONES, "torchvision": ("efficientnet_b0", "vit_b_16")}


def build_disc(kind, img_channels, label_dim, res=224, backbones=None, pretrained=True):
    """--disc ctm | torchvision | patch. backbones None: the kind's defaults (DISC_BACKBONES)."""
    if kind == "patch":
        return PatchDisc(img_channels, label_dim)
    backbones = tuple(backbones or DISC_BACKBONES[kind])
    if kind == "ctm":
        if res % 32 or res < 32:
            fail(f"--disc-res {res}: --disc ctm needs a multiple of 32 (CTM: 224)")
        return CTMDisc(label_dim, backbones, res, pretrained)
    if "vit_b_16" in backbones and res != 224:
        fail(f"--disc-res {res}: the vit_b_16 features need 224 x 224 inputs (or drop vit_b_16)")
    return TorchvisionDisc(label_dim, backbones, res, pretrained)


def _frozen(name):
    return name.startswith(("features.", "ccm.", "csm."))


def disc_params(disc):
    """The trainable parameters: all but the frozen feature networks and random projections."""
    return [p for n, p in disc.named_parameters() if not _frozen(n)]


def _pretrained_key(name):
    return name.startswith("features.") and ".backbone." in name


def disc_state(disc):
    """The discriminator's state for a checkpoint, less the frozen ImageNet weights (rebuilt from timm /
    torchvision; the frozen random projections are kept)."""
    return {k: v for k, v in disc.state_dict().items() if not _pretrained_key(k)}


def load_disc_state(disc, state):
    missing, unexpected = disc.load_state_dict(state, strict=False)
    bad = [k for k in missing if not _pretrained_key(k)] + list(unexpected)
    if bad:
        fail(f"the checkpoint's discriminator does not match --disc / --disc-backbones (e.g. {bad[0]})")


# --- sampling ---


@torch.no_grad()
def lmm_sampler(net, noise, sigmas, steps, labels=None, sigma_min=None, generator=None):
    """LMM App. A.4 (the consistency-model multistep sampler): x = sigma_{t_0} * noise; at each chosen
    index t, x_hat = N_theta(x, sigma_t), then x = x_hat + sigma_{t'} * eta with t' the next chosen index and
    eta ~ N(0, I) (drawn on the CPU from `generator`, or from a list of one generator per image); the last
    x_hat is the sample. One network call per index. sigma_min given: consistency models' noise
    sqrt(sigma_{t'}^2 - sigma_min^2) instead."""
    x = noise.float() * float(sigmas[steps[0]])
    for k, t in enumerate(steps):
        x_hat = net(x, torch.full((x.shape[0],), float(sigmas[t]), device=x.device), class_labels=labels)
        if k == len(steps) - 1:
            return x_hat.float()
        s = float(sigmas[steps[k + 1]])
        scale = math.sqrt(max(s**2 - sigma_min**2, 0.0)) if sigma_min is not None else s
        if isinstance(generator, (list, tuple)):  # one generator per image: independent of the batching
            eta = torch.stack([torch.randn(x.shape[1:], generator=g) for g in generator]).to(x.device)
        else:
            eta = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
        x = x_hat.float() + scale * eta


def nfe_steps(nfe, sched_steps=18):
    """Step indices for an NFE: Table 7's sets for 1-4, else nfe indices spread evenly over the schedule."""
    if nfe < 1 or nfe > sched_steps:
        raise ValueError(
            f"LMM takes 1..{sched_steps} evaluations on a {sched_steps}-level schedule, not {nfe}"
        )
    if nfe in NFE_STEPS and NFE_STEPS[nfe][-1] < sched_steps:
        return NFE_STEPS[nfe]
    return tuple(int(round(v)) for v in np.linspace(0, sched_steps - 1, nfe))


def check_steps(steps, sched_steps):
    steps = tuple(int(t) for t in steps)
    if not steps or min(steps) < 0 or max(steps) >= sched_steps:
        raise ValueError(
            f"step indices {list(steps)} must lie in 0..{sched_steps - 1} (the schedule's levels)"
        )
    return steps


def build_net(net_kwargs):
    """The trained network: an EDM-preconditioned denoiser net(x, sigma, class_labels=None) -> x1 estimate.
    net.schedule holds the sampling schedule it was trained for."""
    kw = dict(net_kwargs)
    schedule = dict(SCHEDULE, **kw.pop("schedule", {}))
    net = EDMPrecond(**kw)
    net.schedule = schedule
    return net


def sample(net, noise, nfe, labels=None, steps=None, cm_noise=False, generator=None, **schedule):
    """Interface: noise [N, C, H, W] standard normal -> (images in [-1, 1], NFE = number of step indices).
    nfe 1, 2, 3, 4 -> steps (0,), (0, 1), (0, 3, 5), (0, 1, 3, 5) (Table 7); `steps` overrides. schedule:
    steps/sigma_min/sigma_max/rho overrides of the net's schedule (named sched_steps here, as `steps`
    means indices; also "0:1:2" or an int, as evaluate.py --sampler-kw passes them). cm_noise:
    consistency-model noise sqrt(sigma^2 - sigma_min^2)."""
    s = dict(SCHEDULE, **getattr(net, "schedule", {}))
    if "sched_steps" in schedule:
        schedule["steps"] = schedule.pop("sched_steps")
    s.update(schedule)
    if isinstance(steps, str):  # evaluate.py --sampler-kw steps=0:1:2 (its commas separate keywords)
        steps = [int(t) for t in steps.split(":") if t]
    elif isinstance(steps, int):  # --sampler-kw steps=0
        steps = [steps]
    steps = check_steps(steps, s["steps"]) if steps is not None else nfe_steps(nfe, s["steps"])
    sigmas = lmm_schedule(**s)
    x = lmm_sampler(net, noise, sigmas, steps, labels, s["sigma_min"] if cm_noise else None, generator)
    return x, len(steps)


def inputs_for_seeds(seeds, shape, label_dim=0):
    """Image i's noise, then its class label, from a generator seeded with seeds[i] (the same noise and label
    as edm_teacher.py --generate and gen_pairs.py for that seed: LMM image s starts from teacher pair s's
    noise). The generators, returned too, then draw that image's sampler noise eta."""
    gens, noise, labels = [], [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        noise.append(torch.randn(shape, generator=g))
        if label_dim:
            labels.append(torch.randint(label_dim, [], generator=g))
        gens.append(g)
    return torch.stack(noise), (torch.tensor(labels, dtype=torch.long) if label_dim else None), gens


def ode_start(net, noise):
    """x at t = 0 of the common clock: the sampler's start, sigma_max * noise."""
    return noise * getattr(net, "schedule", SCHEDULE)["sigma_max"]


def ode_velocity(net, x, t, labels=None):
    """dx/dt on the common clock t in [0, 1] (noise at 0, data at 1) with sigma(t) = sigma_max (1 - t): the
    remaining path to the line's end over the remaining time: (N_theta(x, sigma) - x) / (1 - t), Eq. 4."""
    schedule = getattr(net, "schedule", SCHEDULE)
    sigma_max, sigma_min = schedule["sigma_max"], schedule["sigma_min"]
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
    sigma = (sigma_max * (1 - t)).clamp(min=sigma_min)
    x1_hat = net(x, sigma, class_labels=labels)
    return (x1_hat - x) * (sigma_max / sigma).reshape(-1, 1, 1, 1)


def check_pairs(pairs, path, cond):
    """Validate a pairs file at start-up; -> (shape [C, H, W], label_dim or 0)."""
    missing = [k for k in ("noise", "data") if k not in pairs]
    if missing:
        fail(f"{path} has no {missing} array(s) (found {sorted(pairs)}); make pairs with gen_pairs.py")
    x0, x1 = pairs["noise"], pairs["data"]
    if x0.ndim != 4 or x0.shape != x1.shape or x0.shape[1] not in (1, 3) or x0.shape[2] != x0.shape[3]:
        fail(
            f"{path}: 'noise' and 'data' must both be [N, C, H, W] with C in (1, 3) and H = W; got "
            f"{tuple(x0.shape)} and {tuple(x1.shape)}"
        )
    problem = scan_pairs(pairs, path)
    if problem:
        fail(problem)
    has_label = "label" in pairs
    if has_label and pairs["label"].shape != (len(x0),):
        fail(f"{path}: 'label' must have shape [{len(x0)}], got {tuple(pairs['label'].shape)}")
    if cond == "on" and not has_label:
        fail(f"--cond on, but {path} has no 'label' array (the teacher was unconditional)")
    label_dim = 0
    if has_label and cond != "off":
        label_dim = int(pairs.get("meta", {}).get("label_dim") or int(np.max(pairs["label"])) + 1)
        if int(np.max(pairs["label"])) >= label_dim:
            fail(f"{path}: labels reach {int(np.max(pairs['label']))}, beyond its {label_dim} classes")
    return tuple(x0.shape[1:]), label_dim


def get_pairs(pairs, idx, device, cond):
    """Rows idx of the memory-mapped pairs -> float32 (x0, x1) and labels (or None) on the device."""
    i = idx.numpy()
    x0 = torch.from_numpy(np.asarray(pairs["noise"][i], dtype=np.float32)).to(device)
    x1 = torch.from_numpy(np.asarray(pairs["data"][i], dtype=np.float32)).to(device)
    y = torch.from_numpy(np.asarray(pairs["label"][i], dtype=np.int64)).to(device) if cond else None
    return x0, x1, y


# --- training ---


def _sync(module, sync):
    """DDP: skip the gradient all-reduce on accumulation chunks that are not the last."""
    return contextlib.nullcontext() if sync or not hasattr(module, "no_sync") else module.no_sync()


# The architecture of an --init checkpoint that the student takes over (dropout and schedule stay ours).
INIT_ARCH = (
    "arch",
    "img_resolution",
    "img_channels",
    "label_dim",
    "augment_dim",
    "sigma_data",
    "model_channels",
    "channel_mult",
    "num_blocks",
    "attn_resolutions",
)


def load_init(path, shape, label_dim, cond):
    """--init: an EDM-family checkpoint (ours, or an official EDM snapshot converted by tools/convert_edm.py)
    -> (its architecture's net_kwargs, its EMA weights). The student is built from the teacher's net_kwargs
    so that every key loads strictly; a real mismatch with the pairs is a one-line error."""
    url = path.startswith(("http://", "https://"))
    if url or path.endswith(".pkl"):
        pt = (os.path.basename(path) if url else path).removesuffix(".pkl") + ".pt"
        fail(
            f"--init {path} is {'a URL' if url else 'an EDM snapshot'}: convert it first with "
            f"python tools/convert_edm.py {path} {pt} and pass {pt}"
        )
    init = load_checkpoint(path)
    if init.get("method") not in ("lmm", "edm_teacher", "aot_edm") or "net_kwargs" not in init:
        fail(
            f"--init {path} is a {init.get('method')!r} checkpoint; it needs an EDM-family one "
            "(edm_teacher, aot_edm, lmm)"
        )
    arch = {k: init["net_kwargs"][k] for k in INIT_ARCH if k in init["net_kwargs"]}
    theirs = (arch["img_channels"], arch["img_resolution"], arch["img_resolution"])
    if theirs != shape:
        fail(
            f"--init {path} makes {theirs} images but the pairs are {shape}: make the pairs with that teacher"
        )
    t_dim = arch.get("label_dim", 0)
    if t_dim and not label_dim:
        why = "--cond off was given" if cond == "off" else "the pairs have no labels"
        fail(
            f"--init {path} is class-conditional ({t_dim} classes) but {why}: use conditional pairs "
            "(gen_pairs.py --cond) and drop --cond off, or an unconditional teacher"
        )
    if label_dim and t_dim != label_dim:
        fail(
            f"--init {path} has {t_dim or 'no'} classes but the pairs have {label_dim}: "
            + ("pass --cond off" if not t_dim else "make the pairs with that teacher")
        )
    return arch, init["ema"] if init.get("ema") is not None else init["net"]


def load_real_images(args, pairs, shape, label_dim, device):
    """The adversarial loss's real images: --data, else the teacher's training set named in the pairs' meta
    (gen_pairs.py) -> (images, labels or None, on the device; a line that says which and how many)."""
    data, data_from = args.data, "--data"
    if not data:
        data, data_from = pairs.get("meta", {}).get("dataset"), "the pairs' teacher dataset (meta)"
    if not data:
        fail(
            f"the adversarial loss needs real images and {args.pairs}'s meta names no teacher dataset: "
            "pass --data (or --adv-start off)"
        )
    if data_from != "--data" and not (data in ("cifar10", "shapes") or os.path.exists(data)):
        fail(f"{data_from} is {data!r}, which lmm.py cannot load by name: pass --data FILE.npz or DIR")
    images, labels = load_images(data, args.data_dir)
    if tuple(images.shape[1:]) != shape:
        fail(
            f"{data_from}: images are {tuple(images.shape[1:])} but the pairs are {shape}: use the same size"
        )
    if label_dim and labels is None:
        fail(f"the pairs are class-conditional but {data} has no labels for the discriminator")
    about = f"{data} ({len(images)} images, from {data_from})"
    return images.to(device), labels.to(device) if label_dim else None, about


# Flags whose change on --resume makes the run differ from an unbroken one (a warning, not an error).
RESUME_KEYS = ("pairs", "data", "batch", "seed", "loss", "sot", "sot_start", "adv_start", "g_period", "lr")


def run_net_kwargs(args, shape, label_dim, schedule, ckpt, log):
    """The network N_theta -> (net_kwargs, --init's weights or None): from the flags, from --init (the
    teacher's architecture; dropout and schedule stay ours), or the resumed run's."""
    net_kwargs = dict(img_resolution=shape[-1], img_channels=shape[0], label_dim=label_dim,
                      model_channels=args.model_channels, channel_mult=list(args.channel_mult),
                      num_blocks=args.num_blocks, attn_resolutions=list(args.attn_res), dropout=args.dropout,
                      schedule=schedule, arch=args.arch)  # fmt: skip
    init_sd = None
    if ckpt is not None:
        net_kwargs = resumed_net_kwargs(ckpt, net_kwargs, args, log, RESUME_KEYS)
    elif args.init:
        arch, init_sd = load_init(args.init, shape, label_dim, args.cond)
        net_kwargs = dict(net_kwargs, **arch)
    if shape[-1] % 2 ** (len(net_kwargs["channel_mult"]) - 1):
        fail(
            f"pairs resolution {shape[-1]} is not divisible by 2^{len(net_kwargs['channel_mult']) - 1} "
            "(--channel-mult)"
        )
    return net_kwargs, init_sd


def build_student(net_kwargs, init_sd, args, device):
    """N_theta, identical on every rank (seeded), with --init's weights if given -> (net, its EMA copy)."""
    torch.manual_seed(args.seed)
    net = build_net(net_kwargs).to(device).train()
    if init_sd is not None:
        try:
            net.load_state_dict(init_sd)
        except RuntimeError as e:
            why = " ".join(str(e).split())[:300]
            fail(
                f"--init {args.init}: its weights do not fit its own net_kwargs ({why}); "
                "re-save it with its method's file"
            )
    if net.model.map_augment is not None:  # EDM's augmentation conditioning: LMM never uses it
        net.model.map_augment.requires_grad_(False)
    return net, copy.deepcopy(net).eval().requires_grad_(False)


def build_adversary(args, shape, label_dim, device):
    """The discriminator D (its random heads and projections a function of the seed alone) and its RAdam."""
    torch.manual_seed(args.seed + 1)
    kind, backbones = args.disc, args.disc_backbones
    disc = build_disc(kind, shape[0], 0 if args.disc_uncond else label_dim, args.disc_res, backbones,
                      not args.disc_random_weights).to(device)  # fmt: skip
    return disc, torch.optim.RAdam(disc_params(disc), lr=args.lr_d, betas=(0.5, 0.9))  # LMM Table 6


def restore(ckpt, net, ema, opt, disc, opt_d, world, log, path):
    """--resume: the weights, optimisers and D of the checkpoint -> (step, nimg, first adversarial step)."""
    net.load_state_dict(ckpt["net"])
    ema.load_state_dict(ckpt["ema"])
    opt.load_state_dict(ckpt["opt"])
    if disc is not None and ckpt["state"].get("disc") is not None:
        load_disc_state(disc, ckpt["state"]["disc"])
        opt_d.load_state_dict(ckpt["state"]["disc_opt"])
    step, nimg = ckpt["step"], ckpt["state"]["nimg"]
    log.print(f"resumed from {path} at step {step} ({nimg / 1000:.1f} kimg)")
    if ckpt["state"].get("world", world) != world:  # seed_step seeds each rank from (seed, rank, world)
        log.print(
            f"note: saved with {ckpt['state']['world']} process(es), resumed with {world}: the per-rank "
            "noise streams (sigma draws, DiffAugment) change from here on; the data order does not"
        )
    return step, nimg, ckpt["state"].get("adv_step0")


def describe(log, args, n_pairs, shape, label_dim, net, init_sd, world, device, disc, real_about):
    """Rank 0's opening lines: the flags, the pairs and network, and the adversarial set-up."""
    log.print(json.dumps(vars(args)))
    log.print(
        f"{n_pairs} pairs {shape}{f', {label_dim} classes' if label_dim else ''}, "
        f"{sum(p.numel() for p in net.parameters())} parameters"
        f"{f' from --init {args.init}' if init_sd is not None else ''}, {world} process(es) on {device}"
    )
    if disc is None:
        log.print("adversarial loss off")
        return
    names = ",".join(args.disc_backbones or DISC_BACKBONES.get(args.disc, ()))
    names = f" on {names}" if names else ""
    sched = "G and D on every step" if args.g_period == 1 else f"G on 1 step in {args.g_period}, else D"
    log.print(
        f"adversarial loss from {args.adv_start:g} kimg: --disc {args.disc}{names}, "
        f"{sum(p.numel() for p in disc_params(disc))} trainable D parameters, {sched}; "
        f"real images for the discriminator: {real_about}"
    )


def draw_lines(pairs, chunk, sot, schedule, cond, args, device):
    """Rows `chunk` of the pairs and a noise level for each (LMM Eq. 3's sigma law, or SOT's levels)
    -> (x0, x1, labels or None, sigma)."""
    x0, x1, y = get_pairs(pairs, chunk, device, cond)
    return x0, x1, y, draw_sigma(len(chunk), args.sigma_dist, sot, schedule, args.P_mean, args.P_std, device)


def generator_step(ddp, net, ema, opt, draw, chunks, distance, critic, args):
    """N_theta's update on this rank's pairs, accumulated over the --batch-gpu chunks: LMM Eq. 3, and in the
    adversarial phase (critic = (D, W_L, D's classes)) Sec. 3's lambda_lines * L_lines + lambda_adapt * L_G
    -> (the step's record, each chunk's (x0, x1, labels, sigma) for a D step after it)."""
    batch_rank, rec, inputs = sum(len(c) for c in chunks), {"L_lines": 0.0}, []
    if critic is not None:
        disc, w_last, d_label_dim = critic
        for p in disc_params(disc):  # the generator step leaves D's gradients alone
            p.requires_grad_(False)
        rec.update(L_G=0.0, lambda_adapt=0.0)
    opt.zero_grad(set_to_none=True)
    for j, chunk in enumerate(chunks):
        x0, x1, y, sigma = draw(chunk)
        with _sync(ddp, j == len(chunks) - 1):
            d, x1_hat = lmm_loss(ddp, x0, x1, sigma, y, distance)
            loss = l_lines = d.mean()  # LMM Eq. 3
            if critic is not None:
                onehot = F.one_hot(y, d_label_dim).float() if d_label_dim else None
                l_g = g_hinge_loss(disc(x1_hat, onehot, augment=args.augment))
                lam = adaptive_weight(l_lines, l_g, w_last, args.adapt_clamp)  # LMM Eq. 5
                loss = args.lambda_lines * l_lines + lam * l_g  # LMM Sec. 3
                rec["L_G"] += l_g.item() / len(chunks)
                rec["lambda_adapt"] += lam.item() / len(chunks)
                inputs.append((x0, x1, y, sigma))
            (loss * len(chunk) / batch_rank).backward()
        rec["L_lines"] += l_lines.item() * len(chunk) / batch_rank
    for p in net.parameters():
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
    opt.step()
    ema_update(ema, net, args.ema)
    return rec, inputs


def discriminator_step(net, ddp_d, disc, opt_d, inputs, real_chunks, real, d_label_dim, device, args):
    """D's hinge update (CTM's form of LMM Eq. 5's adversarial term) on real images against N_theta's outputs
    on this step's pairs and noise levels (after N_theta's update when --g-period 1) -> the step's record."""
    for p in disc_params(disc):
        p.requires_grad_(True)
    opt_d.zero_grad(set_to_none=True)
    rec, n = dict(L_D=0.0, D_real=0.0, D_fake=0.0), len(inputs)
    for j, ((x0, x1, y, sigma), rchunk) in enumerate(zip(inputs, real_chunks, strict=True)):
        with torch.no_grad():
            fake = net(x1 + sigma.reshape(-1, 1, 1, 1) * x0, sigma, class_labels=y)
        x_real, ry = get_batch(*real, rchunk, device)
        with _sync(ddp_d, j == n - 1):
            oh_real = F.one_hot(ry, d_label_dim).float() if d_label_dim else None
            oh_fake = F.one_hot(y, d_label_dim).float() if d_label_dim else None
            d_real = ddp_d(x_real, oh_real, augment=args.augment)
            d_fake = ddp_d(fake, oh_fake, augment=args.augment)
            l_d = d_hinge_loss(d_real, d_fake)
            (l_d / n).backward()
        rec["L_D"] += l_d.item() / n
        rec["D_real"] += d_real.mean().item() / n
        rec["D_fake"] += d_fake.mean().item() / n
    opt_d.step()
    return rec


def save_snapshot(args, net_kwargs, models, step, nimg, adv_step0, world, grid, device):
    """Rank 0: the checkpoint (D and its optimiser in `state`) and grids of EMA samples at NFE 1 and 2."""
    net, ema, opt, disc, opt_d = models
    state = dict(nimg=nimg, adv_step0=adv_step0, disc=None, disc_opt=None, world=world)
    if disc is not None:
        state.update(disc=disc_state(disc), disc_opt=opt_d.state_dict())
    ckpt = dict(method=METHOD, version=VERSION, args=vars(args), net_kwargs=net_kwargs, net=net.state_dict(),
                ema=ema.state_dict(), opt=opt.state_dict(), step=step, kimg=nimg / 1000,
                state=state)  # fmt: skip
    save_checkpoint(ckpt, args.outdir, step)
    noise, labels = grid
    for nfe in (1, 2) if args.grid else ():
        x, _ = sample(ema, noise.to(device), nfe, None if labels is None else labels.to(device),
                      generator=torch.Generator().manual_seed(1))  # fmt: skip
        save_image_grid(x, os.path.join(args.outdir, f"grid-nfe{nfe}-{step:07d}.png"))


def train(args):
    rank, world, device = dist_setup()
    log = Logger(args.outdir, rank)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    batch_rank, batch_gpu = split_batch(args, world)
    ckpt = resume_checkpoint(args, METHOD)
    if not os.path.isfile(args.pairs):
        fail(f"pairs file not found: {args.pairs} (make it with gen_pairs.py)")
    try:
        pairs = load_pairs(args.pairs)
    except Exception as e:
        fail(f"cannot read {args.pairs} as an uncompressed .npz of pairs: {str(e).strip().splitlines()[0]}")
    shape, label_dim = check_pairs(pairs, args.pairs, args.cond)
    n_pairs, d_label_dim = len(pairs["noise"]), 0 if args.disc_uncond else label_dim
    if args.sot and (min(args.sot) < 0 or max(args.sot) >= args.sched_steps):
        fail(f"--sot {args.sot}: indices must lie in 0..{args.sched_steps - 1} (--sched-steps)")
    total = round(args.duration * 1e6)
    adv = args.adv_start >= 0 and args.adv_start * 1000 < total
    real = load_real_images(args, pairs, shape, label_dim, device) if adv else None
    schedule = dict(steps=args.sched_steps, sigma_min=args.sigma_min, sigma_max=args.sigma_max, rho=args.rho)
    net_kwargs, init_sd = run_net_kwargs(args, shape, label_dim, schedule, ckpt, log)
    net, ema = build_student(net_kwargs, init_sd, args, device)
    opt = torch.optim.RAdam(net.parameters(), lr=args.lr, betas=(0.9, 0.999),
                            **optimizer_kwargs(args, device, torch.optim.RAdam))  # LMM Table 6  # fmt: skip
    disc, opt_d = build_adversary(args, shape, label_dim, device) if adv else (None, None)
    lp = make_lpips(device, args.lpips_random_trunk) if args.loss == "lpips" else None
    step, nimg, adv_step0 = 0, 0, None
    if ckpt is not None:
        step, nimg, adv_step0 = restore(ckpt, net, ema, opt, disc, opt_d, world, log, args.resume)
    ddp, ddp_d = prepare_net(net, args, device), disc  # the call under the speed flags; never stored
    if world > 1:
        ids = [device] if device.type == "cuda" else None
        ddp = torch.nn.parallel.DistributedDataParallel(ddp, device_ids=ids)
        ddp_d = torch.nn.parallel.DistributedDataParallel(disc, device_ids=ids) if adv else None
    if rank == 0:
        claim_outdir(args.outdir, ckpt, args.overwrite)
        with open(os.path.join(args.outdir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        describe(log, args, n_pairs, shape, label_dim, net, init_sd, world, device, disc, real and real[2])
    n_real = len(real[0]) * (2 if args.xflip else 1) if adv else 0
    m = net.model  # W_L of the adaptive weight: the generator's last layer (DDPM++ aux_conv, ADM out_conv)
    w_last = (
        m.out_conv.weight if hasattr(m, "out_conv") else m.dec[f"{shape[-1]}x{shape[-1]}_aux_conv"].weight
    )
    grid = (torch.randn([args.grid, *shape], generator=torch.Generator().manual_seed(0)),
            torch.arange(args.grid) % label_dim if label_dim else None)  # fmt: skip
    stop = StopFlag()
    sums, counts, t_last, step_last = {}, {}, time.time(), step
    log.start(step, math.ceil(total / args.batch))
    while nimg < total:
        seed_step(args.seed, rank, world, step)
        in_adv = adv and nimg >= args.adv_start * 1000
        if in_adv and adv_step0 is None:
            adv_step0 = step  # stored in the checkpoint: the G/D phase of a resumed run is the same
        # CTM's schedule (g_learning_period): in the adversarial phase step k updates N_theta when
        # k % g_period == 0 and D otherwise; g_period 1: both on every step (N_theta first, then D)
        phase = (step - adv_step0) % args.g_period if in_adv else 0
        g_step, d_step = phase == 0, in_adv and (args.g_period == 1 or phase != 0)
        sot = args.sot if nimg >= args.sot_start * 1000 else None  # SOT as fine-tuning from --sot-start
        lpips_res = args.lpips_res if (in_adv or not adv) else args.lpips_res_pre  # App. A.4: 64 px pre-ADL
        distance = None if lp is None else (lambda a, b, r=lpips_res: lpips_distance(lp, a, b, r))
        draw = functools.partial(draw_lines, pairs, sot=sot, schedule=schedule, cond=label_dim > 0, args=args,
                                 device=device)  # fmt: skip
        mine = slice(rank * batch_rank, (rank + 1) * batch_rank)  # this rank's share of the global batch
        chunks = batch_indices(n_pairs, args.batch, step, args.seed)[mine].split(batch_gpu)
        rec, inputs = {}, []
        if g_step:
            critic = (disc, w_last, d_label_dim) if in_adv else None
            rec, inputs = generator_step(ddp, net, ema, opt, draw, chunks, distance, critic, args)
        elif d_step:  # a D-only step: fakes from the current N_theta on this step's pairs and noise levels
            inputs = [draw(chunk) for chunk in chunks]
        if d_step:
            real_chunks = batch_indices(n_real, args.batch, step, args.seed + 1)[mine].split(batch_gpu)
            rec.update(discriminator_step(net, ddp_d, disc, opt_d, inputs, real_chunks, real[:2], d_label_dim,
                                          device, args))  # fmt: skip
        for k, v in rec.items():
            sums[k], counts[k] = sums.get(k, 0.0) + v, counts.get(k, 0) + 1
        nimg, step = nimg + args.batch, step + 1
        done, stop_now = nimg >= total, stop.any(device, sum(rec.values()), step)
        if step % args.log_every == 0 or done or stop_now:
            metrics = {k: all_mean(v / counts[k], device) for k, v in sums.items()}  # per step that had it
            sec = (time.time() - t_last) / max(step - step_last, 1)
            log.log(step=step, kimg=nimg / 1000, **metrics, sec_per_step=sec)
            sums, counts, t_last, step_last = {}, {}, time.time(), step
        if step % args.snap_every == 0 or done or stop_now:
            if rank == 0:
                models = (net, ema, opt, disc, opt_d)
                save_snapshot(args, net_kwargs, models, step, nimg, adv_step0, world, grid, device)
            barrier()
        if stop_now:
            log.print(f"stopped by signal at step {step}; resume with --resume {args.outdir}")
            break
    dist_teardown()
    stop.exit()  # 143 after SIGTERM: the scheduler requeues the job


# --- generation ---


def generate(args):
    """--generate N images from --ckpt: uint8 NHWC npz (images, seeds, labels) and a PNG grid of the first 64.
    Image i uses seed --seed + i for its noise, label and eta: identical for any number of processes."""
    check_out(args.out, args.overwrite)
    from tqdm import tqdm

    rank, world, device = dist_setup()
    ckpt = load_checkpoint(args.ckpt)
    if ckpt.get("method") != METHOD:
        fail(
            f"--ckpt {args.ckpt} is a {ckpt.get('method')!r} checkpoint; use that method's file to sample it"
        )
    net = build_net(ckpt["net_kwargs"]).eval().requires_grad_(False)
    net.load_state_dict(ckpt["ema"])
    net = prepare_net(net.to(device), args, device)  # --precision, --compile
    k = ckpt["net_kwargs"]
    shape, label_dim = (k["img_channels"], k["img_resolution"], k["img_resolution"]), k["label_dim"]
    try:
        n = net.schedule["steps"]
        steps = check_steps(args.steps, n) if args.steps else nfe_steps(args.nfe, n)
    except ValueError as e:
        fail(str(e))
    seeds = list(range(args.seed, args.seed + args.generate))[rank::world]
    out_x, out_y = [], []
    for i in tqdm(range(0, len(seeds), args.gen_batch), disable=rank != 0, unit="batch"):
        noise, lab, gens = inputs_for_seeds(seeds[i : i + args.gen_batch], shape, label_dim)
        lab = None if lab is None else lab.to(device)
        x, nfe = sample(
            net, noise.to(device), len(steps), lab, steps=steps, cm_noise=args.cm_noise, generator=gens
        )
        out_x.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
        out_y.append(lab.cpu() if lab is not None else torch.zeros(len(x), dtype=torch.long))
    mine = (seeds, torch.cat(out_x).numpy() if out_x else None, torch.cat(out_y).numpy() if out_y else None)
    parts = [mine]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, mine)
    if rank == 0:
        parts = [p for p in parts if p[0]]
        order = np.argsort(np.concatenate([p[0] for p in parts]), kind="stable")
        images = np.concatenate([p[1] for p in parts])[order]
        arrays = dict(images=images, seeds=np.arange(args.seed, args.seed + args.generate))
        if label_dim:
            arrays["labels"] = np.concatenate([p[2] for p in parts])[order]
        tmp = f"{args.out}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, args.out)
        grid = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
        save_image_grid(grid, os.path.splitext(args.out)[0] + ".png")
        print(f"wrote {len(images)} images to {args.out} (steps {list(steps)}, NFE {len(steps)})", flush=True)
    dist_teardown()


# --- command line ---

# LMM Table 6 columns. Durations: 80k steps without the adversarial loss, then 20k/25k/30k with it, batch 512.
# Dropout is not in Table 6; these are EDM's values for the same networks.
PRESETS = {
    "cifar10": dict(
        lr=4e-4, channel_mult=[2, 2, 2], sched_steps=18, duration=51.2, adv_start=40960, dropout=0.13
    ),
    "afhq64": dict(
        lr=1e-4, channel_mult=[1, 2, 2, 2], sched_steps=40, duration=53.76, adv_start=40960, dropout=0.25
    ),
    "imagenet64": dict(  # ADM: 192 channels, 1,2,3,4, 3 blocks, attention at 32/16/8 with 6/9/12 heads
        arch="adm",
        model_channels=192,
        channel_mult=[1, 2, 3, 4],
        num_blocks=3,
        attn_res=[32, 16, 8],
        lr=8e-6,
        sched_steps=40,
        duration=56.32,
        adv_start=40960,
        dropout=0.10,
    ),
}
PRESET_NET = dict(arch="ddpmpp", model_channels=128, num_blocks=4, attn_res=[16])  # DDPM++ (Table 6)


def _ints(s):
    return [int(v) for v in s.split(",") if v]


def _floats(s):
    return [float(v) for v in s.split(",") if v]


def _kimg_or_off(s):
    return -1.0 if s == "off" else float(s)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="LMM (Matityahu & Fattal): train a Lines Matching Model on teacher pairs.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--pairs", default=None, help="pairs .npz from gen_pairs.py (noise, data, optional label)")
    p.add_argument(
        "--data",
        default=None,
        help="real images for the discriminator: cifar10 | FILE.npz | DIR (default: the dataset the pairs' "
        "meta names, i.e. the teacher's)",
    )
    p.add_argument("--data-dir", default="datasets", help="where --data cifar10 is looked for / downloaded")
    p.add_argument("--xflip", action="store_true", help="add mirrored copies of the real images")
    p.add_argument("--outdir", default="runs/lmm", help="checkpoints, grids, log.jsonl, args.json")
    p.add_argument("--preset", default="cifar10", choices=sorted(PRESETS), help="LMM Table 6 column")
    p.add_argument(
        "--cond", default="auto", choices=["auto", "on", "off"], help="use the pairs' class labels"
    )
    p.add_argument("--batch", type=int, default=512, help="global batch size (Table 6: 512)")
    p.add_argument("--batch-gpu", type=int, default=None, help="pairs per forward pass (accumulate the rest)")
    p.add_argument("--lr", type=float, default=None, help="generator RAdam lr (preset; CIFAR-10: 4e-4)")
    p.add_argument("--lr-d", type=float, default=2e-3, help="discriminator RAdam lr (Table 6: 2e-3)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay per step (Table 6: 0.999)")
    p.add_argument(
        "--duration", type=float, default=None, help="training length, Mimg (preset; CIFAR-10: 51.2)"
    )
    p.add_argument("--loss", default="lpips", choices=["lpips", "l2"], help="the distance of Eq. 3")
    p.add_argument("--lpips-res", type=int, default=224, help="LPIPS image size (App. A.4: 224)")
    p.add_argument(
        "--lpips-res-pre", type=int, default=64, help="LPIPS size before --adv-start (64; unused with it off)"
    )
    p.add_argument("--lpips-random-trunk", action="store_true", help="TESTS ONLY: LPIPS with a random VGG16")
    p.add_argument("--sigma-dist", default="rho", choices=["rho", "lognormal"], help="sigma law for Eq. 3")
    p.add_argument("--P-mean", type=float, default=-1.2, help="mean of ln(sigma) for --sigma-dist lognormal")
    p.add_argument("--P-std", type=float, default=1.2, help="std of ln(sigma) for --sigma-dist lognormal")
    p.add_argument(
        "--sot", type=_ints, default=[], help="Sampling-Optimised Training: train only at these step indices"
    )
    p.add_argument(
        "--sot-start",
        type=float,
        default=0.0,
        help="kimg where --sot starts (fine-tuning; the +SOT recipe: 40960)",
    )
    p.add_argument(
        "--sched-steps", type=int, default=None, help="EDM schedule length (preset; 18 / 40 at 64x64)"
    )
    p.add_argument("--sigma-min", type=float, default=0.002, help="smallest noise level (EDM: 0.002)")
    p.add_argument("--sigma-max", type=float, default=80.0, help="largest noise level (EDM: 80)")
    p.add_argument("--rho", type=float, default=7.0, help="schedule exponent (EDM: 7)")
    p.add_argument(
        "--adv-start", type=_kimg_or_off, default=None, help="kimg where Eq. 5 starts (preset); off"
    )
    p.add_argument(
        "--disc",
        default="ctm",
        choices=["ctm", "torchvision", "patch"],
        help="ctm: CTM's projected discriminator on timm networks (LMM App. A.4); torchvision: the same "
        "design on torchvision networks; patch: a small one trained from scratch (offline)",
    )
    p.add_argument(
        "--disc-backbones",
        type=lambda s: s.split(","),
        default=None,
        help="frozen ImageNet features (ctm: deit_base_distilled_patch16_224,tf_efficientnet_lite0 from "
        "timm; torchvision: efficientnet_b0,vit_b_16)",
    )
    p.add_argument("--disc-res", type=int, default=224, help="feature networks' input size (App. A.4: 224)")
    p.add_argument(
        "--disc-uncond",
        action="store_true",
        help="unconditional D heads for labelled pairs (CTM's public CIFAR-10 code; LMM App. A.4: cond.)",
    )
    p.add_argument("--disc-random-weights", action="store_true", help="TESTS ONLY: random feature networks")
    p.add_argument(
        "--g-period",
        type=int,
        default=2,
        help="adversarial phase: N_theta updates on 1 step in K, D on the other K-1 (CTM's CIFAR-10 command: "
        "2); 1: both on every step",
    )
    p.add_argument(
        "--augment",
        type=lambda s: tuple(s.split(",")) if s else (),
        default=("color", "translation", "cutout"),
        help="DiffAugment policy for real and fake images",
    )
    p.add_argument(
        "--lambda-lines", type=float, default=0.5, help="weight of L_lines with the adversarial loss"
    )
    p.add_argument(
        "--adapt-clamp", type=_floats, default=[0.01, 10.0], help="LO,HI clip of lambda_adapt (CTM: 0.01,10)"
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="TEACHER",
        help="start N_theta from this EDM-family checkpoint (edm_teacher, lmm; official EDM .pkl converted "
        "by tools/convert_edm.py) and take its architecture; default: random weights",
    )
    p.add_argument("--arch", default=None, choices=["ddpmpp", "adm"], help="generator network (preset)")
    p.add_argument("--model-channels", type=int, default=None, help="UNet base width (preset: 128; ADM 192)")
    p.add_argument(
        "--channel-mult", type=_ints, default=None, help="width multipliers per resolution (preset)"
    )
    p.add_argument("--num-blocks", type=int, default=None, help="residual blocks per resolution (preset)")
    p.add_argument("--attn-res", type=_ints, default=None, help="resolutions with self-attention (preset)")
    p.add_argument("--dropout", type=float, default=None, help="dropout (preset; EDM CIFAR-10: 0.13)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny UNet (CPU smoke runs)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order, sigma, augmentation")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    p.add_argument("--snap-every", type=int, default=2000, help="steps between checkpoints and image grids")
    p.add_argument("--grid", type=int, default=64, help="images per snapshot grid at NFE 1 and 2; 0: none")
    p.add_argument("--resume", default=None, help="checkpoint file or run folder (its latest.pt) to continue")
    p.add_argument("--overwrite", action="store_true", help="replace a run in --outdir or an existing --out")
    p.add_argument(
        "--generate", type=int, default=0, metavar="N", help="generate N images from --ckpt instead"
    )
    p.add_argument("--ckpt", default=None, help="lmm checkpoint (or run folder) for --generate")
    p.add_argument("--out", default="samples.npz", help="output .npz of --generate (a .png grid beside it)")
    p.add_argument("--nfe", type=int, default=1, help="--generate: evaluations (1-4: Table 7's step sets)")
    p.add_argument("--steps", type=_ints, default=None, help="--generate: explicit step indices, e.g. 0,3,5")
    p.add_argument("--cm-noise", action="store_true", help="--generate: noise sqrt(sigma^2 - sigma_min^2)")
    p.add_argument("--gen-batch", type=int, default=256, help="images per sampling batch in --generate")
    add_speed_args(p)
    args = p.parse_args(argv)
    check_numbers(p, args, ("batch", "batch_gpu", "duration", "atol", "rtol"), ("lr",))
    if args.generate:
        if not args.ckpt:
            p.error("--generate needs --ckpt")
    elif not args.pairs:
        p.error("--pairs is required for training (or use --generate N --ckpt FILE)")
    for k, v in {**PRESET_NET, **PRESETS[args.preset]}.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.tiny:
        args.model_channels, args.channel_mult, args.num_blocks, args.attn_res = 16, [1, 2], 1, [8]
    for name in (
        "batch",
        "duration",
        "log_every",
        "snap_every",
        "sched_steps",
        "lpips_res",
        "lpips_res_pre",
        "gen_batch",
    ):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if len(args.adapt_clamp) != 2 or not 0 <= args.adapt_clamp[0] <= args.adapt_clamp[1]:
        p.error("--adapt-clamp takes two numbers 0 <= LOW <= HIGH: LOW,HIGH (CTM: 0.01,10)")
    if args.g_period < 1:
        p.error("--g-period must be at least 1 (CTM: 2)")
    return args


def main(argv=None):
    args = parse_args(argv)
    generate(args) if args.generate else train(args)


# === shared below this line: identical in every file; the method is above ===


# --- shared: precision (identical in every method file) ---
# Speed flags. The default (--precision fp32, no --compile) calls the network itself and builds the optimizer
# as before: the papers' fp32 computation, bit for bit. Nothing compiled or wrapped is ever stored.


def add_speed_args(p, train=True):
    """The speed flags of a trainer (train=True) or of a sampling script (gen_pairs.py, evaluate.py)."""
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "tf32", "bf16"],
        help="fp32 (the papers'); tf32: TF32 matmuls/convs (Ampere+ GPUs); bf16: torch.autocast around the "
        "network (losses, EDM preconditioning, EMA and optimizer state stay fp32)",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the network's forward")
    p.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend (eager, aot_eager: quick checks without inductor's C++ build)",
    )
    p.add_argument(
        "--channels-last", action="store_true", help="feed the network channels-last (NHWC) images"
    )
    if train:
        p.add_argument(
            "--fused-adam", action="store_true", help="fused optimizer step where supported, else foreach"
        )


def optimizer_kwargs(args, device, cls=torch.optim.Adam):
    """{} (torch's default implementation) unless --fused-adam: fused where cls and device have it."""
    if not args.fused_adam:
        return {}
    fused = "fused" in inspect.signature(cls).parameters and device.type in ("cuda", "cpu")
    return dict(fused=True) if fused else dict(foreach=True)


class FastNet(nn.Module):
    """net as the training step or a sampler calls it under the speed flags: same parameters, same call
    signature, float32 output. Autocast wraps the whole forward, not only the UNet: the preconditioning
    (EDM's c_skip, c_out, c_in, c_noise; the flow nets' time scaling) is elementwise arithmetic on float32
    inputs, which autocast leaves in float32; convolutions, linears and attention matmuls run in bfloat16."""

    def __init__(self, net, args):
        super().__init__()
        self.net, self.precision, self.channels_last = net, args.precision, args.channels_last
        # the bound forward, compiled or not: no second (compiled) module is registered in this one
        self.fn = torch.compile(net.forward, backend=args.compile_backend) if args.compile else net.forward

    def __getattr__(self, name):  # the wrapped net's attributes (lmm's schedule, dansm's objective, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "net":
                raise
            return getattr(self.net, name)

    def forward(self, x, *a, **kw):
        if self.channels_last and x.dim() == 4:  # activations NHWC from the first conv on; weights stay
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.fn(x, *a, **kw)
        return out.float()


def prepare_net(net, args, device):
    """The module to call for --precision/--compile/--channels-last: net itself for plain fp32 (so today's
    computation exactly), else a FastNet around it. tf32 is a global switch of the CUDA backends."""
    if args.precision == "tf32" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.precision != "bf16" and not args.compile and not args.channels_last:
        return net
    return FastNet(net, args)


# --- end shared: precision ---


# --- shared: EDM preconditioning (identical in edm_teacher, aot_edm, lmm) ---


def edm_precond(sigma, sigma_data=0.5):
    """EDM Table 1 ("Ours" column): the preconditioning coefficients (c_skip, c_out, c_in, c_noise)."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, c_noise) (EDM Eq. 7), computed in float32, with F the DDPM++
    (arch="ddpmpp") or ADM (arch="adm") UNet. class_labels: int64 indices [N] or one-hot [N, label_dim]."""

    def __init__(
        self, img_resolution, img_channels, label_dim=0, sigma_data=0.5, arch="ddpmpp", **unet_kwargs
    ):
        super().__init__()
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.sigma_data = label_dim, sigma_data
        self.model = make_unet(
            arch, img_resolution, img_channels, img_channels, label_dim=label_dim, **unet_kwargs
        )

    def forward(self, x, sigma, class_labels=None, augment_labels=None):
        x = x.float()
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(x.shape[0], 1, 1, 1)
        c_skip, c_out, c_in, c_noise = edm_precond(sigma, self.sigma_data)
        f_x = self.model(c_in * x, c_noise.flatten(), self.one_hot(class_labels), augment_labels)
        return c_skip * x + c_out * f_x.float()

    def one_hot(self, labels):
        if not self.label_dim:
            return None
        if labels is None:
            raise ValueError(
                "this network is class-conditional: pass class labels (int64 [N] or one-hot);"
                " train it on labelled data with --cond and sample it with labels"
            )
        if not labels.is_floating_point():
            return F.one_hot(labels.long(), self.label_dim).float()
        return labels.float().reshape(-1, self.label_dim)


# --- end shared: EDM preconditioning ---


# --- shared: pairs reader (identical in gen_pairs, lmm, cfm_couplings) ---


def load_pairs(path):
    """Memory-map the arrays of an uncompressed .npz (noise, data, label): nothing is read into RAM until
    indexed. Returns a dict of np.memmap, with 'meta' decoded from JSON."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: {info.filename} is compressed; pairs files must be uncompressed")
            f.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])  # zip local file header
            f.seek(info.header_offset + 30 + name_len + extra_len)
            major, _ = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject:
                raise ValueError(f"{path}: {info.filename} holds Python objects; refusing to load it")
            key = info.filename[:-4]
            if shape == ():
                out[key] = np.frombuffer(f.read(dtype.itemsize), dtype)[0]
            else:
                order = "F" if fortran else "C"
                out[key] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape, order=order)
    if "meta" in out:
        out["meta"] = json.loads(str(out["meta"]))
    return out


def scan_pairs(pairs, path, rows=1 << 14):
    """None if the arrays are usable, else what is wrong: noise/data floating point, at least one pair, every
    value finite, labels non-negative integers. Reads the memory map in chunks of `rows` (RAM O(chunk))."""
    if len(pairs["noise"]) == 0:
        return f"{path} holds zero pairs"
    for key in ("noise", "data"):
        if pairs[key].dtype not in (np.float16, np.float32, np.float64):
            return f"{path}: '{key}' is {pairs[key].dtype}, not float16/32/64 (make pairs with gen_pairs.py)"
    lab = pairs.get("label")
    if lab is not None and not np.issubdtype(lab.dtype, np.integer):
        return f"{path}: 'label' is {lab.dtype}, not an integer class index"
    for lo in range(0, len(pairs["noise"]), rows):
        for key in ("noise", "data"):
            ok = np.isfinite(pairs[key][lo : lo + rows]).reshape(-1, pairs[key][0].size).all(1)
            if not ok.all():
                return f"{path}: '{key}' is not finite (NaN/inf) in pair {lo + int(np.argmin(ok))}"
        if lab is not None and (lab[lo : lo + rows] < 0).any():
            return f"{path}: negative labels near pair {lo}"
    return None


# --- end shared: pairs reader ---


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


# --- shared: runtime (identical in every method file) ---
# Distributed setup, per-step seeding, EMA, atomic checkpoints, data order and rank-0 logging.


def fail(msg):
    """Stop with a one-line message for the user (exit code 1), not a traceback."""
    raise SystemExit(f"error: {msg}")


def dist_setup():
    """(rank, world_size, device). torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; otherwise a single process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def dist_teardown():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_mean(value, device):
    """Mean of a float over ranks."""
    t = torch.tensor([float(value)], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(t)
        t /= torch.distributed.get_world_size()
    return t.item()


def seed_step(seed, rank, world_size, step):
    """Seed torch's global RNGs from (seed * world_size + rank, step): resume needs no stored RNG state."""
    state = np.random.SeedSequence([seed * world_size + rank, step]).generate_state(2)
    torch.manual_seed(int(state[0]) << 32 | int(state[1]))


def epoch_order(n, seed, epoch):
    """The data order of one epoch: a permutation of range(n) that depends only on (seed, epoch)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


def batch_indices(n, batch, step, seed):
    """Global data indices of training step `step`: consecutive slices of a stream of epoch permutations.
    Independent of the world size; rank r takes the r-th slice of the per-rank batch."""
    pos = step * batch + torch.arange(batch)
    epochs = pos // n
    out = torch.empty(batch, dtype=torch.long)
    for e in epochs.unique().tolist():
        sel = epochs == e
        out[sel] = epoch_order(n, seed, e)[pos[sel] % n]
    return out


def edm_ema_beta(batch, nimg, halflife_kimg, rampup_ratio):
    """EDM's EMA decay: half-life in images, ramped up as min(halflife, rampup_ratio * images seen)."""
    halflife = halflife_kimg * 1000
    if rampup_ratio is not None:
        halflife = min(halflife, nimg * rampup_ratio)
    return 0.5 ** (batch / max(halflife, 1e-8))


@torch.no_grad()
def ema_update(ema, net, beta):
    for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
        p_ema.copy_(p.detach().lerp(p_ema, beta))
    for b_ema, b in zip(ema.buffers(), net.buffers(), strict=True):
        b_ema.copy_(b)


def atomic_save(obj, path):
    """torch.save to a temporary file, then rename: a crash or a full disk never leaves a half-written file
    (the temporary file is removed; a kill's leftover is removed by the next claim_outdir)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def save_checkpoint(ckpt, outdir, step):
    """Write <outdir>/ckpt-<step>.pt and point <outdir>/latest.pt at it (both atomic)."""
    name = f"ckpt-{step:07d}.pt"
    atomic_save(ckpt, os.path.join(outdir, name))
    tmp = os.path.join(outdir, f"latest.pt.tmp{os.getpid()}")
    os.symlink(name, tmp)
    os.replace(tmp, os.path.join(outdir, "latest.pt"))


def intact(path):
    """None if `path` is a zip whose every member matches its CRC-32 (torch.save writes them), else why not.
    torch.load itself does not check them: flipped bytes would load as changed weights."""
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f"not a complete torch checkpoint ({str(e) or type(e).__name__})"
    return f"its member {bad} fails its CRC check (the file is corrupt)" if bad else None


def load_checkpoint(path):
    """Load one of our checkpoints safely (tensors and plain containers only), after checking its integrity.
    A directory means its latest.pt."""
    if os.path.isdir(path):
        path = os.path.join(path, "latest.pt")
    if not os.path.isfile(path):
        fail(f"checkpoint not found: {path}")
    problem = intact(path)
    if problem:
        folder = os.path.dirname(os.path.abspath(path))
        names = sorted(
            (n for n in os.listdir(folder) if n.startswith("ckpt-") and n.endswith(".pt")), reverse=True
        )
        good = next((os.path.join(folder, n) for n in names if intact(os.path.join(folder, n)) is None), None)
        fail(
            f"{path}: {problem}; "
            + (f"the newest intact checkpoint is {good}" if good else "no intact one here")
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign file: say which, do not unpickle it unsafely
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        fail(f"cannot read {path} as a weights-only torch checkpoint: {why}")


_LOCKS = {}  # path -> open file descriptor: the locks this process holds until it exits


def hold_lock(path):
    """An exclusive lock on `path` for the life of the process. A second run stops at once and names the
    holder; the kernel drops a killed run's lock (flock), so a stale lock file is simply taken over."""
    import fcntl
    import socket

    path = os.path.abspath(path)
    if path in _LOCKS:
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
        fail(f"{path} is locked by a running job ({holder}); wait for it or choose another output")
    info = f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}"
    os.ftruncate(fd, 0)
    os.pwrite(fd, info.encode(), 0)
    _LOCKS[path] = fd


def claim_outdir(outdir, ckpt=None, overwrite=False):
    """Rank 0, before the run writes anything: create and lock --outdir, remove temporary files a killed run
    left, refuse to write over an existing run unless it is resumed (ckpt) or --overwrite is given, and on
    resume cut log.jsonl back to the resumed step (no cut-off line, no repeated steps)."""
    import re

    os.makedirs(outdir, exist_ok=True)
    hold_lock(os.path.join(outdir, ".lock"))
    for name in os.listdir(outdir):
        if re.search(r"\.tmp\d+$", name):  # ours, from a killed run: we hold the lock
            os.remove(os.path.join(outdir, name))
    ckpts = sorted(n for n in os.listdir(outdir) if re.fullmatch(r"ckpt-\d+\.pt", n))
    log_path = os.path.join(outdir, "log.jsonl")
    if ckpt is None and ckpts:
        if not overwrite:
            fail(
                f"{outdir} holds a run at step {int(ckpts[-1][5:-3])}: pass --resume {outdir} to continue "
                "it, --overwrite to replace it, or choose another --outdir"
            )
        for name in [*ckpts, "latest.pt", "log.jsonl"]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(outdir, name))
    if ckpt is not None and os.path.isfile(log_path):
        keep = []
        with open(log_path) as f:
            for line in f:
                with contextlib.suppress(ValueError):  # a line cut off by a kill does not parse
                    if line.endswith("\n") and json.loads(line).get("step", 0) <= ckpt["step"]:
                        keep.append(line)
        with open(log_path + f".tmp{os.getpid()}", "w") as f:
            f.writelines(keep)
        os.replace(log_path + f".tmp{os.getpid()}", log_path)


def check_out(path, overwrite=False, nbytes=0):
    """Before the work: an output file must be new (or --overwrite), its folder writable, with room for it."""
    import tempfile

    if os.path.exists(path) and not overwrite:
        fail(f"{path} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        fail(f"cannot write to {folder} ({e.strerror}): the folder is missing or not writable; create it")
    free = shutil.disk_usage(folder).free
    if nbytes > free:
        fail(f"{path} needs about {nbytes / 2**30:.2f} GiB but {folder} has {free / 2**30:.2f} GiB free")


def split_batch(args, world):
    """--batch (global) over `world` processes, run in forward chunks of --batch-gpu -> (per-process batch,
    chunk size); a one-line error where they do not divide."""
    if args.batch % world:
        fail(f"--batch {args.batch} is the global batch and must be divisible by the {world} processes")
    batch_rank = args.batch // world
    batch_gpu = args.batch_gpu or batch_rank
    if batch_rank % batch_gpu:
        fail(
            f"--batch-gpu {batch_gpu} must divide the per-process batch {batch_rank} (= --batch / processes)"
        )
    return batch_rank, batch_gpu


def resume_checkpoint(args, method):
    """--resume's checkpoint (None without it); another method's checkpoint is a one-line error."""
    ckpt = load_checkpoint(args.resume) if args.resume else None
    if ckpt is not None and ckpt.get("method") != method:
        fail(f"--resume {args.resume} is a {ckpt.get('method')!r} checkpoint, not {method!r}")
    return ckpt


def resumed_net_kwargs(ckpt, net_kwargs, args, log, keys=()):
    """The checkpoint's net_kwargs, after checking that today's data has the shape and classes it had; a
    warning names the flags among `keys` that differ from the checkpoint's (the run will then not equal an
    unbroken one)."""
    shape_keys = ("img_channels", "img_resolution", "label_dim")
    theirs, ours = [ckpt["net_kwargs"].get(k) for k in shape_keys], [net_kwargs.get(k) for k in shape_keys]
    if theirs != ours:
        fail(
            f"--resume {args.resume} was trained on (channels, resolution, classes) = {tuple(theirs)} but "
            f"the data gives {tuple(ours)}: resume with the data it was trained on"
        )
    changed = {
        k: (ckpt["args"].get(k), v) for k, v in vars(args).items() if k in keys and ckpt["args"].get(k) != v
    }
    if changed:
        log.print(
            f"warning: resuming with changed settings {changed}; the run will not equal an unbroken one"
        )
    return ckpt["net_kwargs"]


def check_numbers(parser, args, positive=(), nonnegative=()):
    """Flags that must be > 0 (batch sizes, durations, tolerances) or >= 0 (learning rates), when given."""
    for names, ok, what in ((positive, lambda v: v > 0, "positive"), (nonnegative, lambda v: v >= 0, ">= 0")):
        for name in names:
            value = getattr(args, name, None)
            if value is not None and not ok(value):
                parser.error(f"--{name.replace('_', '-')} must be {what}, got {value}")
    if getattr(args, "generate", 0) < 0:
        parser.error(f"--generate N takes a number of images N > 0, got {args.generate}")


class Logger:
    """Rank 0 prints `k=v` lines, flushed, and appends the same record as JSON to <outdir>/log.jsonl. After
    start(step, total_steps), lines read `step=N/TOTAL ... eta=1h02m` (at this run's pace since start)."""

    def __init__(self, outdir, rank):
        self.rank, self.path = rank, os.path.join(outdir, "log.jsonl") if outdir else None
        self.total_steps, self._start = None, None

    def start(self, step, total_steps):
        self.total_steps, self._start = total_steps, (step, time.time())

    def print(self, *a):
        if self.rank == 0:
            print(*a, flush=True)

    def log(self, **rec):
        if self.rank != 0:
            return
        text = {k: f"{v:.5g}" if isinstance(v, float) else str(v) for k, v in rec.items()}
        if self.total_steps and "step" in rec:
            done, elapsed = rec["step"] - self._start[0], time.time() - self._start[1]
            if done > 0:
                eta = round(elapsed / done * max(self.total_steps - rec["step"], 0))
                rec["eta_s"] = eta
                text["eta"] = (
                    f"{eta // 3600}h{eta % 3600 // 60:02d}m"
                    if eta >= 3600
                    else f"{eta // 60}m{eta % 60:02d}s"
                )
            text["step"] = f"{rec['step']}/{self.total_steps}"
        print(" ".join(f"{k}={v}" for k, v in text.items()), flush=True)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(rec) + "\n")


class StopFlag:
    """SIGINT/SIGTERM ask for a checkpoint at the end of the current step (agreed on by all ranks); after it,
    exit() ends the process with 128 + the signal (143 for SIGTERM) so that a scheduler requeues the job."""

    def __init__(self):
        self.requested, self.signum = False, 0
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handler)

    def _handler(self, signum, frame):
        self.requested, self.signum = True, signum

    def any(self, device, loss=0.0, step=None):
        """True when any rank got a signal. Stops every rank (exit 1) when any rank's `loss` (a float or
        tensor: the step's loss, plus the gradient norm where there is one) is not finite: before the
        weights reach a checkpoint, so the newest checkpoint is the last good one."""
        bad = ~torch.isfinite(torch.as_tensor(loss, dtype=torch.float32, device=device)).all()
        t = torch.stack([torch.tensor(int(self.requested), device=device), bad.long()])
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(t)
        if t[1]:
            fail(
                f"non-finite loss or gradient at step {step}: stopped without saving it, so the newest "
                "checkpoint is the last good one; look for NaN/inf in the data or pairs, or lower --lr"
            )
        return bool(t[0])

    def exit(self):
        if self.signum:
            raise SystemExit(128 + self.signum)


def save_image_grid(images, path):
    """images: [N, C, H, W] floats in [-1, 1] -> a PNG grid. torchvision rounds (x + 1) / 2 * 255 + 0.5, which
    is EDM's quantisation x * 127.5 + 128."""
    from torchvision.utils import save_image

    save_image(
        (images.detach().float().cpu() + 1) / 2, path, nrow=math.ceil(math.sqrt(len(images))), padding=0
    )


# --- end shared: runtime ---


# --- shared: data (identical in every method file) ---
# --data cifar10 | shapes | FILE.npz | FILE.npy | DIR | FILE.zip -> uint8 images; --xflip as extra indices.
# CIFAR-10 and the synthetic set are held in memory (on the device while training); .npy, uncompressed .npz,
# image folders and zips (EDM's dataset format, ImageNet-64) are read per batch: memory O(batch).


def make_shapes(n=4096, res=16, seed=0):
    """A synthetic dataset for CPU smoke runs: one disc (label 0) or square (label 1) of random colour,
    size and position on a random background. Returns uint8 [n, res, res, 3] and int64 labels [n]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
    cy, cx = (rng.uniform(0.25, 0.75, (2, n, 1, 1)) * res).astype(np.float32)
    r = rng.uniform(0.12, 0.3, (n, 1, 1)).astype(np.float32) * res
    labels = rng.integers(0, 2, n)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2
    square = np.maximum(np.abs(yy - cy), np.abs(xx - cx)) <= r
    mask = np.where(labels[:, None, None] == 0, disc, square)[..., None]
    fg, bg = rng.integers(0, 256, (2, n, 1, 1, 3))
    return np.where(mask, fg, bg).astype(np.uint8), labels.astype(np.int64)


class LazyImages:
    """uint8 images [N, C, H, W] read on demand: `images[idx]` (a tensor, list, slice or int of indices) reads
    just those images from the file. It stays on the host (`.to` is a no-op); get_batch moves each batch."""

    device = torch.device("cpu")

    def __init__(self, source, n, hwc, read):
        self.source, self.n, self.hwc, self._read = source, n, hwc, read
        self.shape = torch.Size([n, hwc[2], hwc[0], hwc[1]])

    def __len__(self):
        return self.n

    def to(self, device):
        return self

    def __getitem__(self, idx):
        if isinstance(idx, int):
            return self[[idx]][0]
        idx = range(self.n)[idx] if isinstance(idx, slice) else idx
        x = np.empty((len(idx), *self.hwc), np.uint8)
        for j, i in enumerate(torch.as_tensor(idx, dtype=torch.long).reshape(-1).tolist()):
            img = self._read(i)
            if img.shape != self.hwc:
                fail(f"{self.source}: image {i} has shape {img.shape} among images of shape {self.hwc}")
            x[j] = img
        return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()  # NCHW memory, as the in-memory sets


def _array_reader(path, member=None):
    """A uint8 [N, H, W, C] array in a .npy file (or stored uncompressed in an .npz) -> (n, hwc, read(i))."""
    offset = 0
    if member is not None:  # the member's data offset inside the zip container of the .npz
        with zipfile.ZipFile(path) as z:
            info = z.getinfo(member)
        with open(path, "rb") as f:
            f.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(f.read(4), "<u2")
        offset = info.header_offset + 30 + int(name_len) + int(extra_len)
    with open(path, "rb") as f:
        f.seek(offset)
        version = np.lib.format.read_magic(f)
        header = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = header(f)
        offset = f.tell()
    if dtype != np.uint8 or len(shape) != 4 or fortran:
        fail(f"{path}: images must be a C-ordered uint8 [N, H, W, C] array; got {dtype} {shape}")
    size = int(np.prod(shape[1:]))
    fd = os.open(path, os.O_RDONLY)

    def read(i):  # one positioned read per image: nothing of the file is mapped or cached by us
        return np.frombuffer(os.pread(fd, size, offset + i * size), np.uint8).reshape(shape[1:])

    return shape[0], tuple(shape[1:]), read


def _decode(data, name):
    """One image file's bytes -> uint8 [H, W, C]; palette and alpha images become RGB, never index values."""
    import io

    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data))
        img = img if img.mode in ("L", "RGB") else img.convert("RGB")
        return np.atleast_3d(np.asarray(img))
    except Exception as e:
        fail(f"cannot read image {name} ({type(e).__name__}: {e})")


def _folder_reader(path):
    """An image folder or zip (png/jpg, sorted by relative path) with EDM's optional dataset.json labels."""
    is_zip = zipfile.is_zipfile(path) if os.path.isfile(path) else False
    if is_zip:
        with zipfile.ZipFile(path) as z:
            names = sorted(z.namelist())
    else:
        names = sorted(
            os.path.relpath(os.path.join(d, f), path).replace(os.sep, "/")
            for d, _, fs in os.walk(path)
            for f in fs
        )
    files = [f for f in names if f.lower().endswith((".png", ".jpg", ".jpeg"))]
    if not files:
        fail(f"no .png/.jpg images found in {path}")
    zf = zipfile.ZipFile(path) if is_zip else None

    def raw(name):
        if zf is not None:
            return zf.read(name)
        with open(os.path.join(path, name), "rb") as f:
            return f.read()

    labels = None
    if "dataset.json" in names:
        try:
            table = dict(json.loads(raw("dataset.json")).get("labels") or [])
        except (ValueError, TypeError, AttributeError) as e:
            fail(f"{path}/dataset.json is not EDM's {{'labels': [[file, label], ...]}} format: {e}")
        missing = [f for f in files if f not in table]
        if missing:
            fail(f"{path}/dataset.json has no label for {len(missing)} image(s), e.g. {missing[0]}")
        labels = np.asarray([table[f] for f in files], dtype=np.int64)
    hwc = _decode(raw(files[0]), files[0]).shape
    return len(files), hwc, lambda i: _decode(raw(files[i]), files[i]), labels


def load_images(spec, data_dir="datasets"):
    """--data -> (uint8 [N, C, H, W] images, a tensor or LazyImages read per batch; int64 labels or None)."""
    labels, lazy = None, None
    if spec == "cifar10":
        import torchvision

        try:
            ds = torchvision.datasets.CIFAR10(root=data_dir, train=True, download=True)
        except Exception as e:
            fail(
                f"CIFAR-10 is not in {data_dir}/cifar-10-batches-py and could not be downloaded "
                f"({type(e).__name__}). Put cifar-10-python.tar.gz in {data_dir}/ or pass --data FILE.npz"
            )
        images, labels = ds.data, np.asarray(ds.targets, dtype=np.int64)
    elif spec == "shapes":
        images, labels = make_shapes()
    elif spec.endswith((".npz", ".npy")):
        if not os.path.isfile(spec):
            fail(f"data file not found: {spec} (expected uint8 'images' [N, H, W, C] in an .npz, or an .npy)")
        if spec.endswith(".npy"):
            lazy = _array_reader(spec)
        else:
            with np.load(spec) as f:
                if "images" not in f:
                    fail(f"{spec} has no 'images' array (found {sorted(f.keys())}); expected uint8 NHWC")
                labels = f["labels"].astype(np.int64) if "labels" in f else None
                stored = f.zip.getinfo("images.npy").compress_type == zipfile.ZIP_STORED
                images = None if stored else f["images"]  # a compressed array is read whole
            if stored:
                lazy = _array_reader(spec, "images.npy")
    elif os.path.isdir(spec) or spec.endswith(".zip"):
        if not os.path.exists(spec):
            fail(f"data file not found: {spec} (expected a zip of png/jpg images, EDM's dataset format)")
        *lazy, labels = _folder_reader(spec)
    else:
        fail(f"--data {spec!r} is neither cifar10, shapes, an .npz/.npy file, a .zip nor a folder of images")
    shape = lazy[1] if lazy else images.shape[1:]
    n = lazy[0] if lazy else len(images)
    if (lazy is None and images.dtype != np.uint8) or len(shape) != 3 or shape[-1] not in (1, 3):
        fail(f"images in {spec} must be uint8 [N, H, W, C] with C in (1, 3); got shape {(n, *shape)}")
    if shape[0] != shape[1]:
        fail(f"images in {spec} must be square; got {shape[0]}x{shape[1]}")
    if n == 0:
        fail(f"{spec} holds no images")
    if labels is not None and labels.shape != (n,):
        fail(f"labels in {spec} must have shape [{n}]; got {labels.shape}")
    if labels is not None and labels.min() < 0:
        fail(f"labels in {spec} must be class indices 0, 1, ...; found {labels.min()}")
    if lazy:
        images = LazyImages(spec, lazy[0], lazy[1], lazy[2])
    else:
        images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    return images, None if labels is None else torch.from_numpy(labels)


def get_batch(images, labels, idx, device):
    """Data index i >= len(images) is the mirror image of i - len(images) (--xflip). -> floats in [-1, 1]."""
    n, idx = len(images), idx.to(images.device)
    y = images[idx % n].to(device).float() / 127.5 - 1
    flip = (idx >= n).to(device)
    y = torch.where(flip[:, None, None, None], y.flip(3), y)
    return y, None if labels is None else labels[idx % n].to(device)


# --- end shared: data ---


if __name__ == "__main__":
    main()

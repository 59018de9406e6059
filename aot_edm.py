"""AOT: EDM trained with Approximated Optimal Transport (Kim et al., "Improving Diffusion-Based Generative
Models via Approximated Optimal Transport", 2024).

AOT draws a round of N images and N standard-normal noises, solves the assignment problem between them
(Eq. 8: Hungarian algorithm, L2 cost) and trains EDM's denoiser on the assigned pairs, x = y + sigma eps' with
eps' the noise assigned to y, batch after batch until every pair was used once (Alg. 1). With classes it is
solved within each class (Alg. 2). The rest is EDM's: preconditioning, loss, sigma law, augmentation, Heun.

Convention (EDM): sigma in [0.002, 80]; sampling starts at x = 80 noise and ends at sigma = 0 (data). Every
process solves its own rounds of --aot-pairs pairs (the paper's policy): the pairs depend on the number of
processes. --overlap on solves round r + 1 in a background thread while round r trains: the same numbers.

Commands: a CPU smoke run; the paper's CIFAR-10 run (Sec. 5.1: NCSN++, batch 256 on 4 GPUs, N = 512 per GPU,
augmentation p = 0.12; --cond: batch 128, N = 2048); Table 1's best sampler (rho 90, 14 Heun steps = 27 NFE;
--generate runs in one process, gen_pairs.py and evaluate.py on many GPUs); Table 4's FID over rho x steps:
    python aot_edm.py --data shapes --outdir runs/aot-shapes --tiny --duration 0.05 --lr-rampup 0
    torchrun --standalone --nproc_per_node=4 aot_edm.py --data cifar10 --outdir runs/aot-cifar10
    python aot_edm.py --generate 50000 --ckpt runs/aot-cifar10 --nfe 27 --rho 90 --out aot.npz
    python aot_edm.py --sweep-rho 3,7,27,90 --sweep-steps 8,14,18 --ckpt runs/aot-cifar10
"""

import argparse
import contextlib
import copy
import fcntl
import json
import math
import os
import re
import signal
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import save_image

METHOD = "aot_edm"  # equals the file name
VERSION = 1


# --- AOT: the rounds of assigned pairs (Alg. 1-2, Eq. 8) ---


def aot_cost(eps, y):
    """AOT Sec. 4: W[i, j] = ||y_i - eps_j||, the L2 distance of the i-th image and the j-th noise [N, N]."""
    return torch.cdist(y.flatten(1).double(), eps.flatten(1).double())


def aot_assign(eps, y, labels=None):
    """AOT Eq. 8 -> perm: image i trains with noise eps[perm[i]]. With labels, Alg. 2: solved within each
    class on that class's positions, so the noises of a class are only permuted among themselves."""
    from scipy.optimize import linear_sum_assignment

    perm, labels = torch.arange(len(y)), None if labels is None else labels.cpu()
    for g in [perm.clone()] if labels is None else [(labels == k).nonzero()[:, 0] for k in labels.unique()]:
        _, cols = linear_sum_assignment(aot_cost(eps[g.to(y.device)], y[g.to(y.device)]).cpu().numpy())
        perm[g] = g[torch.as_tensor(cols, dtype=torch.long)]
    return perm


def seed_step(seed, rank, world, step):
    """Seed torch's RNGs from (seed, rank, step) alone: a resumed run needs no stored RNG state."""
    s0, s1 = np.random.SeedSequence([seed * world + rank, step]).generate_state(2)
    torch.manual_seed(int(s0) << 32 | int(s1))


def aot_round(args, images, labels, n_data, r, rank, world, device):
    """AOT Alg. 1 lines 3-5: this process's round r -> (augmented images y', labels, augment labels, noise).
    Rank k takes images kN ... (k + 1)N - 1 of the r-th slice of N * world of the epoch stream. The noise is
    drawn as edm_teacher draws a step's noise: with N = batch and no assignment each draw is edm_teacher's."""
    N, batch_rank = args.aot_pairs, args.batch // world
    idx = batch_indices(n_data, N * world, r, args.seed)[rank * N : (rank + 1) * N]
    y, lab = get_batch(images, labels, idx, device)
    aug = None
    if args.augment > 0:  # as EDM-AOT: the round is augmented, then its noise is assigned to it
        s = np.random.SeedSequence([args.seed, world, rank, r]).generate_state(1)[0]
        y, aug = edm_augment(y, args.augment, generator=torch.Generator().manual_seed(int(s)))
    seed_step(args.seed, rank, world, r * (N // batch_rank))
    torch.randn(batch_rank, 1, 1, 1, device=device)  # the first step's sigmas come first
    return y, lab, aug, torch.randn([N, *y.shape[1:]], device=device)


def aot_solve(eps, y, labels, args):
    """(perm, seconds) of a round's assignment (the identity with --assign 0)."""
    t0 = time.time()
    perm = aot_assign(eps, y, labels) if args.assign else torch.arange(len(y))
    return perm, time.time() - t0


# --- EDM: preconditioning, loss, sampler ---


def edm_precond(sigma, sigma_data=0.5):
    """EDM Table 1 ("Ours"): c_skip, c_out, c_in, c_noise."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    return c_skip, c_out, 1 / (sigma_data**2 + sigma**2).sqrt(), sigma.log() / 4


class EDMPrecond(nn.Module):
    """EDM Eq. 7, in float32: D(x; sigma) = c_skip x + c_out F(c_in x, c_noise), F the UNet of `arch`.
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
        labels = labels.reshape(-1, dim).to(x.device, torch.float32) if dim else None
        F_x = self.model(c_in * x, c_noise.flatten(), labels, augment_labels)
        return c_skip * x + c_out * F_x.float()


def edm_loss(net, y, sigma, n, labels=None, augment_labels=None, sigma_data=0.5):
    """EDM Eq. 2 with Table 1's weight, per element, for given sigma [N, 1, 1, 1] and standard normal n (AOT
    Alg. 1 line 13: the assigned noise): lambda(sigma) (D(y + sigma n; sigma) - y)^2, lambda(sigma) =
    (sigma^2 + sigma_data^2) / (sigma sigma_data)^2."""
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    D_yn = net(y + n * sigma, sigma.flatten(), class_labels=labels, augment_labels=augment_labels)
    return weight * (D_yn - y) ** 2


def karras_sigmas(N, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM Eq. 5: N levels from sigma_max to sigma_min in float64 (the last 0.002000000000000003), then 0."""
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    t = (a + torch.arange(N, dtype=torch.float64) / max(N - 1, 1) * (b - a)) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def sample(net, noise, nfe, labels=None, rho=7.0, sigma_min=0.002, sigma_max=80.0):
    """EDM Alg. 1, deterministic Heun on Eq. 5's levels (AOT sweeps rho, Table 4): noise [N, C, H, W] standard
    normal -> (images in [-1, 1], true NFE). nfe asks for (nfe + 1) // 2 steps, 2 steps - 1 network calls:
    the last step is Euler."""
    if not (nfe >= 1 and 0 < rho < math.inf and 0 < sigma_min < sigma_max < math.inf):  # a sampler keyword
        raise ValueError(f"sample needs nfe >= 1, 0 < rho < inf, 0 < sigma_min < sigma_max; got {nfe}, {rho}")
    sigmas = karras_sigmas(max(1, (nfe + 1) // 2), sigma_min, sigma_max, rho).to(noise.device)
    N, nfe, x = len(sigmas) - 1, 0, noise.double() * sigmas[0]
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        d = (x - net(x, t_cur, class_labels=labels).double()) / t_cur  # Eq. 4 with sigma(t) = t
        x_next, nfe = x + (t_next - t_cur) * d, nfe + 1
        if i < N - 1:  # Alg. 1 lines 9-11: the 2nd-order correction, except at sigma = 0
            d_next = (x_next - net(x_next, t_next, class_labels=labels).double()) / t_next
            x_next, nfe = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_next), nfe + 1
        x = x_next
    return x.float(), nfe


# --- EDM's augmentation (App. F.2): ADA's non-leaking geometric pipeline ---
# x-flip on a random half (EDM's multiplier 1e8); y-flip, isotropic scaling, rotation, anisotropy and
# fractional translation each with probability p. What was applied is a 9-dim augment label that conditions
# the network; sampling passes the zero label, so nothing leaks into samples. G_inv: output -> input pixel.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)  # fmt: skip


def augment_draw(n, p, generator=None):
    """EDM's draws for n images, in EDM's order -> dict of float32 [n] parameters, zero where not applied."""
    rand = lambda *s: torch.rand(s, generator=generator)  # noqa: E731
    randn = lambda *s: torch.randn(s, generator=generator)  # noqa: E731
    pick = lambda prob, w: torch.where(rand(*w.shape[-1:]) < prob, w, torch.zeros_like(w))  # noqa: E731
    a = dict(xflip=pick(1e8 * p, torch.randint(2, (n,), generator=generator).float()))
    a["yflip"] = pick(p, torch.randint(2, (n,), generator=generator).float())
    a["scale"] = pick(p, randn(n))  # log2 scale / 0.2
    a["rotate"] = pick(p, (rand(n) * 2 - 1) * math.pi)
    a["aniso"], r = randn(n), (rand(n) * 2 - 1) * math.pi
    a["aniso"], a["aniso_angle"] = pick(p, a["aniso"]), pick(0.5, r)  # log2 stretch / 0.2, on a turned axis
    t = randn(2, n)
    a["tx"], a["ty"] = torch.where(rand(1, n) < p, t, torch.zeros_like(t))  # units of 0.125 image size
    return a


def augment_labels(a):
    """The 9-dim augment label of EDM's networks (augment_dim = 9), [n, 9]."""
    rot, an, r = a["rotate"], a["aniso"], a["aniso_angle"]
    cols = [a["xflip"], a["yflip"], a["scale"], rot.cos() - 1, rot.sin(), an * r.cos(), an * r.sin()]
    return torch.stack([*cols, a["tx"], a["ty"]], dim=1)


def augment_matrix(a, H, W):
    """G_inv [n, 3, 3], composed as EDM: scaling, rotation, anisotropy, translation."""
    n = len(a["scale"])
    row = lambda x: torch.stack([torch.as_tensor(v).float().expand(n) for v in x], 1)  # noqa: E731
    mat = lambda *rows: torch.stack([row(x) for x in rows], 1)  # noqa: E731
    rot = lambda t: mat([t.cos(), -t.sin(), 0], [t.sin(), t.cos(), 0], [0, 0, 1])  # noqa: E731
    scale = lambda sx, sy: mat([sx, 0, 0], [0, sy, 0], [0, 0, 1])  # noqa: E731
    s, sa, r = (a["scale"] * 0.2).exp2(), (a["aniso"] * 0.2).exp2(), a["aniso_angle"]
    G = scale(1 / s, 1 / s) @ rot(a["rotate"]) @ rot(-r) @ scale(1 / sa, sa) @ rot(r)
    return G @ mat([1, 0, -a["tx"] * W * 0.125], [0, 1, -a["ty"] * H * 0.125], [0, 0, 1])


def augment_resample(x, G_inv):
    """Apply G_inv to x [n, C, H, W] as ADA: reflect padding, 2x upsampling with the Symlet-6 filter,
    bilinear sampling, filtered 2x downsampling."""
    (n, c, H, W), dev, k = x.shape, x.device, len(SYM6)
    hz, hpad, cx, cy = torch.tensor(SYM6, dtype=x.dtype, device=dev), k // 4, (W - 1) / 2, (H - 1) / 2
    G_inv = G_inv.to(dev)
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], device=dev).T
    m = (G_inv @ corners)[:, :2, :].permute(1, 0, 2).flatten(1)  # input positions of the corners
    m = torch.cat([-m, m]).amax(1) + torch.tensor([2 * hpad - cx, 2 * hpad - cy] * 2, device=dev)
    m = torch.minimum(m.clamp(min=0), torch.tensor([W - 1, H - 1] * 2, device=dev))
    mx0, my0, mx1, my1 = m.ceil().int().tolist()
    x = F.pad(x, [mx0, mx1, my0, my1], mode="reflect")
    shift = lambda tx, ty: torch.tensor([[1, 0, tx], [0, 1, ty], [0, 0, 1.0]], device=dev)  # noqa: E731
    scale = lambda sx, sy: torch.diag(torch.tensor([sx, sy, 1.0], device=dev))  # noqa: E731
    up = hz.flip(0).reshape(1, 1, 1, -1).repeat(c, 1, 1, 1)  # zeros between samples, then the filter
    x = torch.stack([x, torch.zeros_like(x)], 4).flatten(3)[..., :-1]
    x = F.conv2d(x, up, groups=c, padding=(0, (k + 1) // 2))
    x = torch.stack([x, torch.zeros_like(x)], 3).flatten(2, 3)[:, :, :-1]
    x = F.conv2d(x, up.transpose(2, 3), groups=c, padding=((k + 1) // 2, 0))
    G_inv = scale(2, 2) @ (shift((mx0 - mx1) / 2, (my0 - my1) / 2) @ G_inv) @ scale(0.5, 0.5)
    G_inv = shift(-0.5, -0.5) @ G_inv @ shift(0.5, 0.5)
    size = [n, c, (H + 2 * hpad) * 2, (W + 2 * hpad) * 2]
    G_inv = scale(2 / x.shape[3], 2 / x.shape[2]) @ G_inv @ scale(size[3] / 2, size[2] / 2)
    grid = F.affine_grid(G_inv[:, :2, :], size, align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    down = hz.reshape(1, 1, 1, -1).repeat(c, 1, 1, 1)  # filter, keep every other sample, crop the margin
    x = F.conv2d(x, down, groups=c, stride=(1, 2), padding=(0, (k - 1) // 2))[..., hpad:-hpad]
    x = F.conv2d(x, down.transpose(2, 3), groups=c, stride=(2, 1), padding=((k - 1) // 2, 0))
    return x[:, :, hpad:-hpad]


def edm_augment(y, p, generator=None):
    """EDM's augmentation of y [n, C, H, W] in [-1, 1] -> (augmented y, augment labels [n, 9])."""
    a = augment_draw(len(y), p, generator)
    G_inv = augment_matrix(a, y.shape[2], y.shape[3])
    y = torch.where(a["xflip"].bool().to(y.device)[:, None, None, None], y.flip(3), y)
    y = torch.where(a["yflip"].bool().to(y.device)[:, None, None, None], y.flip(2), y)
    moved = torch.stack([a[k] != 0 for k in ("scale", "rotate", "aniso", "tx", "ty")]).any(0)
    if moved.any():  # resample only the images a geometric transform was drawn for
        idx = moved.nonzero().flatten().to(y.device)
        y = y.index_copy(0, idx, augment_resample(y[idx], G_inv[moved]).to(y.dtype))
    return y, augment_labels(a).to(y.device)


# --- the interface of every method file ---


def build_net(net_kwargs):
    """The trained network: an EDM denoiser net(x, sigma, class_labels=None) -> D(x; sigma)."""
    return EDMPrecond(**net_kwargs)


def ode_start(net, noise):
    """x at t = 0 of the common clock: sigma_max noise."""
    return noise * 80.0


def ode_velocity(net, x, t, labels=None, sigma_min=0.002, sigma_max=80.0):
    """EDM Eq. 4 on the common clock t in [0, 1], sigma = sigma_max (1 - t): dx/dt = 80 (D - x) / sigma."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
    sigma = (sigma_max * (1 - t)).clamp(min=sigma_min)
    return (net(x, sigma, class_labels=labels) - x) * (sigma_max / sigma).reshape(-1, 1, 1, 1)


def noise_for_seeds(seeds, shape, label_dim=0):
    """EDM's per-image seeds: image i's noise, then its uniform class label, from a generator seeded with
    seeds[i] (image i does not depend on its batch or the number of processes)."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]) if gens else torch.empty(0, *shape)
    labels = torch.tensor([torch.randint(label_dim, [], generator=g) for g in gens]) if label_dim else None
    return noise, labels


# --- data and checkpoints ---


def fail(msg):  # one line for the user, exit code 1, no traceback
    raise SystemExit("error: " + " ".join(str(msg).split()))


def number(cast, lo, hi=math.inf, lo_open=False, hi_open=False, many=False):
    """argparse type: a finite number in range (many: a list of them, "2,2,2")."""

    def one(s):
        v = cast(s)
        if not ((lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi) and abs(v) < math.inf):
            span = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"{s} is not in {span}")
        return v

    return (lambda s: [one(x) for x in s.split(",")]) if many else one


def make_shapes(n=4096, res=16, seed=0):
    """The smoke-test set: a disc (label 0) or a square (1) of random colour, size and place on a random
    background -> uint8 [n, res, res, 3], int64 labels [n]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
    cy, cx = (rng.uniform(0.25, 0.75, (2, n, 1, 1)) * res).astype(np.float32)
    r = rng.uniform(0.12, 0.3, (n, 1, 1)).astype(np.float32) * res
    labels, fg, bg = rng.integers(0, 2, n), *rng.integers(0, 256, (2, n, 1, 1, 3))
    disc, square = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2, np.maximum(abs(yy - cy), abs(xx - cx)) <= r
    mask = np.where(labels[:, None, None] == 0, disc, square)[..., None]
    return np.where(mask, fg, bg).astype(np.uint8), labels


def data_meta(spec):
    """tools/prepare_data.py's FILE.json beside FILE.npy ({"kind": "latents", "vae": ...}), or {}."""
    with contextlib.suppress(OSError, ValueError):
        return dict(json.load(open(spec[:-4] + ".json"))) if spec.endswith(".npy") else {}
    return {}


def load_data(spec, data_dir="datasets"):
    """--data cifar10 | shapes | FILE.npy (tools/prepare_data.py's array, memory-mapped so RSS is O(batch);
    labels in FILE.labels.npy) | FILE.npz ('images', 'labels') -> uint8 [N, H, W, C] (prepared latents: float
    [N, C, H, W]), int64 labels or None."""
    labels = None
    if spec == "cifar10":
        import torchvision

        try:
            ds = torchvision.datasets.CIFAR10(root=data_dir, train=True, download=True)
        except Exception as e:
            fail(f"CIFAR-10 is not in {data_dir}/ and cannot be downloaded ({type(e).__name__}): put "
                 f"cifar-10-python.tar.gz in {data_dir}/")  # fmt: skip
        images, labels = ds.data, np.asarray(ds.targets)
    elif spec == "shapes":
        images, labels = make_shapes()
    elif spec.endswith((".npy", ".npz")) and os.path.isfile(spec):
        try:  # a truncated file or an .npy header that overstates N: one line
            if spec.endswith(".npy"):
                images, lab = np.load(spec, mmap_mode="r"), spec[:-4] + ".labels.npy"
                labels = np.load(lab) if os.path.isfile(lab) else None
            else:
                with np.load(spec) as f:
                    images, labels = f["images"], f.get("labels")
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
            fail(f"cannot read {spec} ({e}): expected uint8 images [N, H, W, C] (.npz: 'images', 'labels')")
    else:
        fail(f"--data {spec!r} not found: use cifar10, shapes, an .npy of tools/prepare_data.py or an .npz")
    n, *hwc = images.shape
    if data_meta(spec).get("kind") == "latents":  # tools/prepare_data.py --vae
        if images.dtype not in (np.float16, np.float32) or len(hwc) != 3 or hwc[1] != hwc[2] or not n:
            fail(f"{spec}: latents must be float [N, C, H, H]; got {images.dtype} {images.shape}")
    elif images.dtype != np.uint8 or len(hwc) != 3 or hwc[2] not in (1, 3) or hwc[0] != hwc[1] or not n:
        fail(f"{spec}: images must be square uint8 [N, H, W, C], C 1 or 3; got {images.dtype} {images.shape}")
    if labels is not None and (labels.dtype.kind not in "iu" or labels.shape != (n,) or labels.min() < 0
                               or labels.max() >= 2**16):  # fmt: skip
        fail(f"{spec}: labels must be integer class indices in [0, 65536) of shape [{n}]; got {labels.dtype} "
             f"{labels.shape}")  # fmt: skip
    return images, None if labels is None else torch.from_numpy(labels.astype(np.int64))


def get_batch(images, labels, idx, device):
    """Data index i >= N is the mirror image of i - N (--xflip copies) -> floats in [-1, 1] (latents as they
    are), labels. A memory-mapped array is read row by row (pread): mapped pages would stay resident."""
    i, row, latent = (idx % len(images)).numpy(), images[0].nbytes, images.dtype != np.uint8
    if isinstance(images, np.memmap):
        with open(images.filename, "rb") as f:
            x = b"".join(os.pread(f.fileno(), row, images.offset + int(j) * row) for j in i)
        x = np.frombuffer(x, images.dtype).reshape(len(i), *images.shape[1:])
    else:
        x = images[i]
    y = torch.from_numpy(np.array(x if latent else x.transpose(0, 3, 1, 2), order="C")).to(device).float()
    y = y if latent else y / 127.5 - 1
    y = torch.where((idx >= len(images)).to(device)[:, None, None, None], y.flip(3), y)
    return y, None if labels is None else labels[i].to(device)


def batch_indices(n, batch, step, seed):
    """Step `step`'s global data indices: consecutive slices of a stream of per-epoch permutations, each from
    (seed, epoch) alone, so that the order does not depend on the number of processes."""
    pos, out = step * batch + torch.arange(batch), torch.empty(batch, dtype=torch.long)
    for e in (pos // n).unique().tolist():
        order = torch.randperm(n, generator=torch.Generator().manual_seed((seed * 1_000_003 + e) % 2**64))
        out[pos // n == e] = order[pos[pos // n == e] % n]
    return out


def load_checkpoint(path):
    """A checkpoint of this file (a run folder: its latest.pt), CRC- and structure-checked, loaded without
    executing code, with the keys this file reads."""
    path = os.path.join(path, "latest.pt") if os.path.isdir(path) else path
    if not os.path.isfile(path):
        fail(f"checkpoint not found: {path}")
    try:
        with zipfile.ZipFile(path) as z:  # CRCs, and no member flagged a folder (torch would read garbage)
            folders = (i.filename for i in z.infolist() if i.is_dir() or i.external_attr & 0x10)
            crc, folder = z.testzip(), next(folders, None)
            bad = crc and f"its member {crc} fails its CRC check"
            bad = bad or folder and f"its member {folder} is damaged"
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        bad = f"not a complete torch checkpoint ({str(e) or type(e).__name__})"
    if bad:
        fail(f"{path} is corrupt: {bad}; resume from an intact ckpt-*.pt beside it")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign file: never unpickled unsafely
        why = (str(e).strip() or type(e).__name__).splitlines()[0]
        fail(f"cannot read {path} as a weights-only torch checkpoint: {why}")
    keys = ("method", "version", "net_kwargs", "net", "ema", "step")  # a resume also reads "opt", "state"
    if missing := [k for k in keys if not isinstance(ckpt, dict) or k not in ckpt]:
        fail(f"{path} is not a checkpoint of this project: it lacks {', '.join(missing)}")
    if ckpt["method"] != METHOD or ckpt["version"] not in range(1, VERSION + 1):
        fail(f"{path} is a {ckpt['method']!r} checkpoint of version {ckpt['version']!r}; this file reads "
             f"{METHOD!r} checkpoints up to version {VERSION}")  # fmt: skip
    return ckpt


def lock(path, name, flag, _held={}):  # noqa: B006 (locks held for the process's life)
    """A second job on `name` stops at once with one line naming the holder."""
    if (path := os.path.abspath(path)) not in _held:
        f = _held[path] = open(path, "a+")  # noqa: SIM115
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0), _held.pop(path)
            fail(f"{name} is locked by a running job ({f.read()}); wait for it or use another {flag}")
        f.truncate(0), f.write(f"pid {os.getpid()} on {os.uname().nodename}"), f.flush()


def claim_outdir(outdir, ckpt, overwrite, resume=None):
    """Rank 0: lock --outdir; never write over a run, or resume another run into its folder, without
    --overwrite; remove a killed run's temporary files; on resume cut log.jsonl back to the resumed step."""
    os.makedirs(outdir, exist_ok=True)
    lock(os.path.join(outdir, ".lock"), outdir, "--outdir")
    runs = sorted(n for n in os.listdir(outdir) if re.fullmatch(r"ckpt-\d+\.pt", n))
    src = resume and os.path.realpath(resume if os.path.isdir(resume) else os.path.dirname(resume) or ".")
    other = ckpt is not None and src not in (None, os.path.realpath(outdir))
    if runs and not overwrite and (ckpt is None or other):
        at = int(runs[-1][5:-3])
        fail(f"{outdir} holds another run (step {at}); resume {resume} into its own folder or pass "
             "--overwrite" if other else f"{outdir} holds a run at step {at}: pass --resume {outdir} to "
             "continue it, --overwrite to replace it, or choose another --outdir")  # fmt: skip
    new = ckpt is None or other  # a new run drops the old run's files (a log without a checkpoint too)
    for name in os.listdir(outdir):  # only names this file writes: its temporary files, and a replaced run's
        if re.fullmatch(r"ckpt-\d+\.pt\.tmp\d+|latest\.tmp|log\.jsonl\.tmp", name) or (
            new and re.fullmatch(r"ckpt-\d+\.pt|latest\.pt|log\.jsonl", name)
        ):
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


# --- training: EDM's training loop on AOT's rounds (Alg. 1), nanoGPT-style ---
# The log's solve_s is a round's solve per step; wait_s what training waited for it (with --overlap on, only
# a solve that outlasts a round); cost_before/after: the mean pair cost before and after the assignment.
LOG_KEYS = ("loss", "solve_s", "wait_s", "cost_before", "cost_after")


def train(args):
    ddp, cuda = "RANK" in os.environ, torch.cuda.is_available()  # torchrun: a process per GPU or CPU process
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if ddp:
        torch.cuda.set_device(device) if cuda else None
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if ddp else (0, 1)
    batch_rank = args.batch // world
    batch_gpu = args.batch_gpu or batch_rank
    if args.batch % world or batch_rank % batch_gpu:
        fail(f"--batch {args.batch} (global) must split into {world} processes and chunks of --batch-gpu")
    if args.aot_pairs % batch_rank:
        fail(f"--aot-pairs {args.aot_pairs} (pairs per process and round) must be a multiple of the "
             f"per-process batch {batch_rank}: a round is used in whole batches")  # fmt: skip
    ckpt = load_checkpoint(args.resume) if args.resume else None
    images, labels = load_data(args.data, args.data_dir)
    if args.cond and labels is None:
        fail(f"--cond needs class labels, but {args.data} has none")
    label_dim, meta = int(labels.max()) + 1 if args.cond else 0, data_meta(args.data)
    latent = meta.get("kind") == "latents"  # tools/prepare_data.py --vae: [N, C, H, W], assigned as they are
    res, C = (images.shape[2], images.shape[1]) if latent else (images.shape[1], images.shape[3])
    labels, n_data = labels if args.cond else None, len(images) * (2 if args.xflip == "copies" else 1)
    if args.aot_pairs < label_dim:
        fail(f"--aot-pairs {args.aot_pairs} is smaller than the {label_dim} classes: Alg. 2 solves per class")
    if args.aot_pairs * world > n_data:
        fail(f"a round of {args.aot_pairs} pairs x {world} processes exceeds the {n_data} training images")
    if res % 2 ** (len(args.channel_mult) - 1):
        fail(f"image size {res} is not divisible by 2^(levels - 1) of --channel-mult {args.channel_mult}")
    net_kwargs = dict(img_resolution=res, img_channels=C, label_dim=label_dim, augment_dim=args.augment_dim,
                      model_channels=args.model_channels, channel_mult=args.channel_mult, arch=args.arch,
                      num_blocks=args.num_blocks, attn_resolutions=args.attn_res,
                      dropout=args.dropout)  # fmt: skip
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    net_kwargs, step, nimg = net_kwargs if ckpt is None else ckpt["net_kwargs"], 0, 0
    try:  # a resumed run's own network, on data of its shape and classes; a wrong checkpoint is one line
        if [net_kwargs[k] for k in ("img_resolution", "img_channels", "label_dim")] != [res, C, label_dim]:
            fail(f"--resume {args.resume} was trained on other data: resume it with the data it had")
        net = build_net(net_kwargs).to(device).train()
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = torch.optim.Adam(net.parameters(), args.lr, betas=(0.9, 0.999), fused=cuda or None)
        if ckpt is not None:  # all a bit-exact resume needs
            net.load_state_dict(ckpt["net"]), ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["opt"])
            step, nimg = ckpt["step"], ckpt["state"]["nimg"]
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        fail(f"cannot rebuild the network of {args.resume}: {(str(e) or repr(e))[:300]}")
    per_round = args.aot_pairs // batch_rank
    if rank == 0:
        claim_outdir(args.outdir, ckpt, args.overwrite, args.resume)
        if ckpt is not None and ckpt["state"].get("world", world) != world:  # seed_step: (seed, rank, world)
            print(f"note: saved with {ckpt['state']['world']} process(es), resumed with {world}: the rounds "
                  "(pairs, augmentation) and the per-rank noise streams change from here on")  # fmt: skip
        n_par = sum(p.numel() for p in net.parameters())
        print(f"{len(images)} images {images.shape[1:]}, {n_par} parameters, {world} process(es) on "
              f"{device}, from step {step}; rounds of {args.aot_pairs} pairs per process ({per_round} steps)",
              flush=True)  # fmt: skip
    torch.backends.cudnn.benchmark = True  # as EDM; full fp32 unless --precision tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    model = torch.compile(net) if args.compile else net  # what is called; net and ema are what is stored
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, [device] if cuda else None)
    stop = []  # SIGINT/SIGTERM: a checkpoint at the end of the step, then exit 128 + signal (a requeue)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: stop.append(signum))
    total = round(args.duration * 1e6)
    total_steps, gpus = math.ceil(total / args.batch), [device.index or 0] if cuda else []
    pool, rnd, ahead = ThreadPoolExecutor(1) if args.overlap else None, None, None  # --overlap on: next solve
    grid_noise, grid_labels = noise_for_seeds(range(args.grid), (C, res, res), label_dim)
    sums, t_log, step_log = torch.zeros(5, dtype=torch.float64, device=device), time.time(), step
    t0, step0 = t_log, step
    while nimg < total:
        seed_step(args.seed, rank, world, step)  # the step's draws from (seed, rank, step): no RNG state
        # AOT Alg. 1 line 11, EDM Table 1: ln(sigma) ~ N(P_mean, P_std^2), drawn for the step as edm_loss does
        sigma = (torch.randn(batch_rank, 1, 1, 1, device=device) * args.P_std + args.P_mean).exp()
        r, j = divmod(step, per_round)
        if rnd is None or rnd[0] != r:  # AOT Alg. 1 lines 3-8: a new round (resumed mid-round: forked RNG)
            with torch.random.fork_rng(devices=gpus, enabled=j > 0):
                y, lab, aug, eps = aot_round(args, images, labels, n_data, r, rank, world, device)
            t_wait = time.time()
            perm, solve_s = ahead.result() if ahead else aot_solve(eps, y, lab, args)
            wait_s, ahead = time.time() - t_wait, None
            if pool and (r + 1) * per_round < total_steps:  # --overlap on: round r + 1 solved while r trains
                with torch.random.fork_rng(devices=gpus):
                    y_, lab_, _, eps_ = aot_round(args, images, labels, n_data, r + 1, rank, world, device)
                ahead = pool.submit(aot_solve, eps_, y_, lab_, args)
            eps_perm = eps[perm.to(device)]
            cost = [(y.double() - e.double()).flatten(1).norm(dim=1).mean().item() for e in (eps, eps_perm)]
            stats = [solve_s / per_round, wait_s / per_round, *cost]  # the solve per step of the round
            rnd = (r, y, lab, aug, eps_perm, torch.tensor(stats, dtype=torch.float64, device=device))
        for g in opt.param_groups:  # EDM: linear lr ramp-up over --lr-rampup Mimg
            g["lr"] = args.lr * (min(nimg / (args.lr_rampup * 1e6), 1) if args.lr_rampup > 0 else 1)
        opt.zero_grad(set_to_none=True)
        n_chunks = batch_rank // batch_gpu
        for c in range(n_chunks):  # AOT Alg. 1 lines 10-13: the step's assigned pairs, --batch-gpu at a time
            rows = slice(j * batch_rank + c * batch_gpu, j * batch_rank + (c + 1) * batch_gpu)
            y, lab, aug, eps = (None if v is None else v[rows] for v in rnd[1:5])
            sync = contextlib.nullcontext() if c == n_chunks - 1 or not ddp else model.no_sync()
            with sync, torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
                loss = edm_loss(model, y, sigma[c * batch_gpu : (c + 1) * batch_gpu], eps, lab, aug)
                loss.sum().mul(1 / batch_rank).backward()  # EDM: the sum over the batch / the per-rank batch
            sums[0] += loss.detach().mean() / n_chunks
        for p in (p for p in net.parameters() if p.grad is not None):  # EDM: non-finite entries replaced
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt.step()
        beta = 0.5 ** (args.batch / max(min(args.ema_halflife * 1000, nimg * args.ema_rampup), 1e-8))  # EDM
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
                p_ema.copy_(p.detach().lerp(p_ema, beta))
            for b_ema, b in zip(ema.buffers(), net.buffers(), strict=True):
                b_ema.copy_(b)
        sums[1:] += rnd[5]
        nimg, step = nimg + args.batch, step + 1
        flags = torch.stack([torch.tensor(float(bool(stop)), device=device), (~sums[0].isfinite()).float()])
        torch.distributed.all_reduce(flags) if ddp else None  # every rank stops together
        if flags[1]:
            fail(f"non-finite loss at step {step}: stopped before a checkpoint; lower --lr or check the data")
        done, stopping = nimg >= total, bool(flags[0])
        if step % args.log_every == 0 or done or stopping:
            torch.distributed.all_reduce(sums) if ddp else None
            eta = round((time.time() - t0) / (step - step0) * (total_steps - step))
            mean = dict(zip(LOG_KEYS, (sums / (step - step_log) / world).tolist(), strict=True))
            rec = dict(step=step, kimg=nimg / 1000, **mean, lr=opt.param_groups[0]["lr"],
                       sec_per_step=(time.time() - t_log) / (step - step_log))  # fmt: skip
            if rank == 0:
                text = " ".join(f"{k}={v:.5g}" if type(v) is float else f"{k}={v}" for k, v in rec.items())
                print(f"{text} of {total_steps} steps, eta {eta // 60} min", flush=True)
                with open(os.path.join(args.outdir, "log.jsonl"), "a") as f:
                    f.write(json.dumps(dict(rec, eta_s=eta)) + "\n")
            sums, t_log, step_log = sums.zero_(), time.time(), step
        if rank == 0 and (step % args.snap_every == 0 or done or stopping):  # all a bit-exact resume needs
            sd = dict(net=net.state_dict(), ema=ema.state_dict())
            if not all(v.isfinite().all() for d in sd.values() for v in d.values() if v.is_floating_point()):
                fail(f"non-finite weights at step {step}: not saved; the newest checkpoint is the last "
                     "good one")  # fmt: skip
            name = f"ckpt-{step:07d}.pt"
            ckpt = dict(method=METHOD, version=VERSION, args=vars(args), net_kwargs=net_kwargs, step=step,
                        **sd, opt=opt.state_dict(), kimg=nimg / 1000, state=dict(nimg=nimg, world=world),
                        data=meta)  # fmt: skip
            atomic_save(ckpt, os.path.join(args.outdir, name))
            os.symlink(name, os.path.join(args.outdir, "latest.tmp"))
            os.replace(os.path.join(args.outdir, "latest.tmp"), os.path.join(args.outdir, "latest.pt"))
            if args.grid and not latent:  # EMA samples of the grid seeds
                x, _ = sample(ema, grid_noise.to(device), args.nfe, grid_labels, rho=args.rho)
                path, nrow = os.path.join(args.outdir, f"grid-{step:07d}.png"), math.ceil(math.sqrt(len(x)))
                save_image((x.cpu() + 1) / 2, path, nrow=nrow, padding=0)
        if stopping:
            if rank == 0:
                print(f"stopped by signal at step {step}: resume with --resume {args.outdir}")
            break
    pool.shutdown() if pool else None
    if ddp:
        torch.distributed.barrier(), torch.distributed.destroy_process_group()
    if stop:
        raise SystemExit(128 + stop[0])


@torch.no_grad()
def generate(args):
    """--generate N: the images of seeds --seed ... --seed + N - 1 from --ckpt's EMA, in one process -> an
    .npz ('images' uint8 NHWC, 'seeds', 'labels'; latent data: 'latents' and the decoded images) and a PNG
    grid of the first 64 beside it, both written atomically."""
    from tqdm import tqdm

    png = os.path.splitext(args.out)[0] + ".png"
    lock(f"{args.out}.lock", args.out, "--out")
    if not args.overwrite and (taken := [p for p in (args.out, png) if os.path.exists(p)]):
        fail(f"{taken[0]} exists; pass --overwrite to replace it")
    ckpt = load_checkpoint(args.ckpt)
    k, meta = ckpt["net_kwargs"], ckpt.get("data", {})
    try:
        net = build_net(k).eval().requires_grad_(False)
        net.load_state_dict(ckpt["ema"])
        shape = (k["img_channels"], k["img_resolution"], k["img_resolution"])
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError) as e:
        fail(f"cannot build the network of {args.ckpt}: {(str(e) or repr(e))[:300]}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    model = torch.compile(net.to(device)) if args.compile else net.to(device)
    vae = load_vae(meta["vae"]).to(device) if (latent := meta.get("kind") == "latents") else None
    seeds, xs, ys, zs = range(args.seed, args.seed + args.generate), [], [], []
    for i in tqdm(range(0, len(seeds), args.gen_batch), unit="batch"):
        noise, lab = noise_for_seeds(seeds[i : i + args.gen_batch], shape, k["label_dim"])
        with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
            x, _ = sample(model, noise.to(device), args.nfe, lab, rho=args.rho)
        if not x.isfinite().all():
            fail(f"non-finite samples from {args.ckpt} (seeds {seeds[i]}...): nothing written")
        if latent:  # tools/prepare_data.py stored the VAE's latents times "scale"
            zs.append(x.cpu())
            x = vae.decode(x / meta["scale"]).sample.float()
        xs.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
        ys.append(lab)
    out = dict(images=torch.cat(xs).numpy(), seeds=np.arange(seeds.start, seeds.stop))
    out |= dict(labels=torch.cat(ys).numpy()) if k["label_dim"] else {}
    out |= dict(latents=torch.cat(zs).numpy()) if latent else {}  # the raw samples too
    with open(f"{args.out}.tmp{os.getpid()}", "wb") as f:
        np.savez(f, **out)
    os.replace(f"{args.out}.tmp{os.getpid()}", args.out)
    grid = torch.from_numpy(out["images"][:64]).permute(0, 3, 1, 2).float() / 255
    save_image(grid, f"{png}.tmp{os.getpid()}", "png", nrow=math.ceil(math.sqrt(len(grid))), padding=0)
    os.replace(f"{png}.tmp{os.getpid()}", png)
    print(f"wrote {len(seeds)} images to {args.out} (NFE {2 * ((args.nfe + 1) // 2) - 1}, rho {args.rho:g})")


def load_vae(name):
    """tools/prepare_data.py's diffusers AutoencoderKL: a folder or a model id (Hugging Face cache)."""
    from diffusers import AutoencoderKL
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return AutoencoderKL.from_pretrained(name, local_files_only=not os.path.isdir(name)).eval()
    except Exception as e:  # missing, unreadable or not a VAE: one line with the reason
        fail(f"cannot load the VAE {name} of this checkpoint's latents ({type(e).__name__}): put its "
             f"diffusers files at {name} or in {HF_HUB_CACHE}/models--{name.replace('/', '--')}")  # fmt: skip


def sweep_rho(args):
    """AOT Table 4: FID over --sweep-rho x --sweep-steps (NFE 2 steps - 1) for --ckpt through evaluate.py, the
    lowest of 3 seed ranges (AOT Sec. 5.1, as EDM); --eval-args: more evaluate.py flags."""
    import evaluate  # a tool, not a method file

    fid, nfes = {}, ",".join(str(2 * s - 1) for s in args.sweep_steps)
    for rho in args.sweep_rho:
        argv = ["--ckpt", args.ckpt, "--nfe", nfes, "--sampler-kw", f"rho={rho:g}", "--metrics", "fid"]
        for r in evaluate.main([*argv, "--fid-seeds", "3", *args.eval_args]):
            fid[rho, (r["nfe_requested"] + 1) // 2] = r.get("fid")
    rows = [[fid.get((rho, s)) for s in args.sweep_steps] for rho in args.sweep_rho]
    if int(os.environ.get("RANK", 0)) == 0:  # evaluate.py may run under torchrun
        for rho, row in zip(["FID: rho \\ steps", *args.sweep_rho], [args.sweep_steps, *rows], strict=True):
            print(f"{rho:<18}" + "".join(f"{math.nan if v is None else v:>10.4g}" for v in row))
    return rows


# --- command line ---

ARCH_WIDTHS = {"ddpmpp": (128, [2, 2, 2], 4, [16]), "ncsnpp": (128, [2, 2, 2], 4, [16]),  # EDM CIFAR-10
               "adm": (192, [1, 2, 3, 4], 3, [32, 16, 8])}  # EDM ImageNet-64  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="EDM-AOT: train, generate images, sweep rho.", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add, count, ints = p.add_argument, number(int, 1), number(int, 1, many=True)
    positive, ratio = number(float, 0, lo_open=True), number(float, 0)
    add("--data", help="cifar10 | shapes (synthetic) | FILE.npy (tools/prepare_data.py) | FILE.npz")
    add("--data-dir", default="datasets", help="where --data cifar10 is looked for / downloaded")
    add("--outdir", default="runs/aot", help="checkpoints, grids, log.jsonl")
    add("--cond", action="store_true", help="class-conditional: Alg. 2, the assignment within each class")
    add("--xflip", default="off", choices=["off", "copies"], help="copies: add every image's mirror image")
    add("--aot-pairs", type=count, help="N pairs per process and round (Sec. 5.1: 512; 2048 with --cond)")
    add("--assign", type=int, default=1, choices=[0, 1], help="0: rounds without the assignment (EDM)")
    add("--overlap", default="on", choices=["on", "off"], help="solve round r + 1 while round r trains")
    add("--batch", type=number(int, 1, 2**20), help="global batch per step (Sec. 5.1: 256; --cond 128)")
    add("--batch-gpu", type=count, help="images per forward pass (accumulating to the per-process batch)")
    add("--lr", type=positive, default=1e-3, help="Adam learning rate (EDM CIFAR-10: 1e-3)")
    add("--lr-rampup", type=ratio, default=10, help="linear lr warm-up, Mimg (EDM: 10)")
    add("--duration", type=positive, default=200, help="training length, Mimg (EDM CIFAR-10: 200)")
    add("--ema-halflife", type=ratio, default=500, help="EMA half-life, kimg (EDM: 500)")
    add("--ema-rampup", type=ratio, default=0.05, help="EMA half-life at most this ratio of the images seen")
    add("--dropout", type=number(float, 0, 1, hi_open=True), default=0.13, help="dropout rate (EDM: 0.13)")
    add("--P-mean", type=number(float, -math.inf), default=-1.2, help="training ln(sigma) mean (EDM: -1.2)")
    add("--P-std", type=positive, default=1.2, help="training ln(sigma) std (EDM: 1.2)")
    add("--augment", type=number(float, 0, 1), metavar="P", help="EDM's augmentation (0.12; latents 0)")
    add("--arch", choices=list(ARCH_WIDTHS), help="NCSN++ (EDM-AOT's; cifar10's default), DDPM++ (else), ADM")
    add("--model-channels", type=count, help="UNet base width (DDPM++/NCSN++ 128, ADM 192)")
    add("--channel-mult", type=ints, help="width multiplier per level (2,2,2; ADM 1,2,3,4)")
    add("--num-blocks", type=count, help="residual blocks per resolution (4; ADM 3)")
    add("--attn-res", type=number(int, 0, many=True), help="attention resolutions (16; ADM 32,16,8; 0: none)")
    add("--tiny", action="store_true", help="a tiny UNet for CPU smoke runs")
    add("--seed", type=number(int, 0, 2**63 - 1), default=0, help="weights, data, rounds; image i: seed + i")
    add("--log-every", type=count, default=100, help="steps between log lines")
    add("--snap-every", type=count, default=5000, help="steps between checkpoints and image grids")
    add("--grid", type=number(int, 0), default=64, help="images in each snapshot grid (seeds 0..N-1)")
    add("--resume", help="run folder (its latest.pt) or checkpoint to continue")
    add("--overwrite", action="store_true", help="replace a run in --outdir or an existing --out")
    add("--generate", type=number(int, 0), default=0, metavar="N", help="generate N images from --ckpt")
    add("--ckpt", help="--generate / --sweep-rho: a checkpoint of this file, or its run folder")
    add("--out", default="samples.npz", help="--generate's .npz (a .png grid beside it)")
    add("--nfe", type=count, default=35, help="network evaluations per image, grids too (35 = 18 Heun steps)")
    add("--rho", type=positive, default=7.0, help="the sampler's schedule exponent (EDM: 7; AOT's best: 90)")
    add("--gen-batch", type=count, default=256, help="images per sampling batch")
    rhos, table4 = number(float, 0, lo_open=True, many=True), [3, 5, 9, 16, 27, 47, 81, 140, 243, 421]
    add("--sweep-rho", type=rhos, nargs="?", const=table4, metavar="RHOS", help="Table 4: FID, rho x steps")
    add("--sweep-steps", type=ints, default=[8, 14, 18], help="Heun steps of the sweep (Table 4)")
    add("--eval-args", type=str.split, default=[], help="more evaluate.py flags, e.g. '--ref-stats s.npz'")
    add("--precision", default="fp32", choices=["fp32", "tf32", "bf16"], help="fp32 (EDM's), TF32, bf16")
    add("--compile", action="store_true", help="torch.compile the network")
    args = p.parse_args(argv)
    if args.augment is None:  # EDM's 0.12; latents (tools/prepare_data.py --vae) are augmented only if asked
        args.augment = 0.0 if data_meta(args.data or "").get("kind") == "latents" else 0.12
    args.augment_dim = 9 if args.augment > 0 else 0  # the network's augment label (EDM's 9 dimensions)
    if not (args.ckpt if (sampling := args.generate or args.sweep_rho) else args.data):
        p.error("--generate and --sweep-rho need --ckpt" if sampling else "--data is required for training")
    args.overlap, args.batch = args.overlap == "on", args.batch or (128 if args.cond else 256)  # AOT Sec. 5.1
    args.aot_pairs = args.aot_pairs or (2048 if args.cond else 512)
    args.arch = args.arch or ("ncsnpp" if args.data == "cifar10" else "ddpmpp")  # EDM-AOT trains NCSN++
    widths = [16, [1, 2], 1, [8]] if args.tiny else ARCH_WIDTHS[args.arch]
    for name, v in zip(("model_channels", "channel_mult", "num_blocks", "attn_res"), widths, strict=True):
        setattr(args, name, v if getattr(args, name) is None or args.tiny else getattr(args, name))
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        sweep_rho(args) if args.sweep_rho else generate(args) if args.generate else train(args)
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

"""DANSM: distance-aware noise-sample matching for rectified flow ("Lengthening Inter-Path Distance").

Rectified flow (RFM) regresses the straight velocity z - x of paths x_t = (1 - t) x + t z between a training
image x and a noise z (Eq. 1-2). Where two paths pass close to each other their targets conflict and training
slows down. DANSM lengthens the inter-path distances (Eq. 3-5, the closest approach of two paths over t) by a
surrogate (Eq. 11, Alg. 1): shorten the paths. Before training, a pool of --match-size images and as many
fresh noises is matched greedily: for each image in order, the nearest unused noise. Every noise of the pool
is used exactly once, so the noise marginal stays exactly N(0, I). The matched pool is then consumed by the
training batches (the pool may be larger or smaller than a batch). --matcher hungarian is Immiscible
Diffusion's optimal assignment on the same pool, --matcher none the RFM baseline. --objective dm applies the
same matching to epsilon-prediction diffusion with DDIM sampling (Sec. 5.8).

Convention (the paper's Eq. 1): t = 0 is the data x, t = 1 the noise z; x_t = (1 - t) x + t z, the network
sees (x_t, 1000 t) and predicts z - x; sampling integrates Euler from t = 1 down to t = 0. `ode_velocity`
converts to the project's common clock (noise at 0).

Inter-path metrics (Sec. 3.1, App. A.1): `inter_path_distance` (Eq. 4-5, closed-form t* clipped to [0, 1])
and `path_stats` (length, d_avg, d_min, t*_avg, t*_min of Tables 2-3), computed for all pairs of a set of
paths from Gram matrices. `--report` prints Table 2 for a dataset, and with --ckpt Table 3's "preferable
paths" (each image's noise found by running the model's ODE from the image to t = 1).

Distributed policy: pool p (its image indices and noise) is a function of (seed, p); rank 0 matches it and
broadcasts the assignment; each rank trains on its slice of the global batch: the pairs are the same for any
number of processes.

Commands
  CPU smoke run on a synthetic dataset (tiny net, pools of 256):
    python dansm.py --data shapes --tiny --batch 64 --match-size 256 --duration 0.02 --outdir runs/dansm
  The paper's CIFAR-10 RFM run (batch 250, match-size 10,000) on 4 GPUs:
    torchrun --standalone --nproc_per_node=4 dansm.py --data cifar10 --outdir runs/dansm-cifar10
  Table 2 for a dataset, then Table 3 with a trained model:
    python dansm.py --report --data cifar10 --match-sizes 10,100,1000,10000,100000 --paths 2000
    python dansm.py --report --data cifar10 --paths 2000 --ckpt runs/dansm-cifar10
  Generate 50,000 images with 10 Euler steps:
    python dansm.py --generate 50000 --ckpt runs/dansm-cifar10 --nfe 10 --out dansm10.npz
"""

import argparse
import contextlib
import copy
import inspect
import json
import math
import os
import shutil
import signal
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --- method: DANSM (rectified flow with distance-aware noise-sample matching) ---
METHOD = "dansm"
VERSION = 1
MATCHERS = ("greedy", "hungarian", "none")


class FlowNet(nn.Module):
    """The shared UNet as v(x_t, t) (rfm: predicts z - x, sees 1000 t) or eps(x_t, t) (dm: predicts z, sees
    the integer timestep). class_labels: int64 [N] or one-hot [N, label_dim]."""

    def __init__(self, img_resolution, img_channels, label_dim=0, objective="rfm", time_scale=1000.0,
                 arch="ddpmpp", **unet):  # fmt: skip
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.objective, self.time_scale = objective, time_scale
        self.model = make_unet(arch, img_resolution, img_channels, img_channels, label_dim=label_dim, **unet)

    def forward(self, x, t, class_labels=None):
        x = x.float()
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        onehot = None
        if self.label_dim:
            if class_labels is None:
                raise ValueError(
                    "this network is class-conditional: pass class labels (int64 [N] or one-hot);"
                    " train it on labelled data with --cond and sample it with labels"
                )
            onehot = (
                class_labels.float().reshape(-1, self.label_dim)
                if class_labels.is_floating_point()
                else F.one_hot(class_labels.long(), self.label_dim).float()
            )
        return self.model(x, self.time_scale * t, onehot).float()


def rfm_loss(net, x, z, t, labels=None):
    """DANSM Eq. 2 per sample [N]: ||(z - x) - v(x_t, t)||^2 at x_t = (1 - t) x + t z (Eq. 1)."""
    tb = t.reshape(-1, *[1] * (x.ndim - 1))
    return ((z - x) - net((1 - tb) * x + tb * z, t, labels)).square().flatten(1).mean(1)


DM_STEPS = 1000  # DDPM's linear beta schedule (Ho et al.), beta from 1e-4 to 0.02 over 1000 steps


def dm_alpha_bar(device=None):
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, DM_STEPS, dtype=torch.float64, device=device), 0)


def dm_loss(net, x, z, t_index, labels=None):
    """Epsilon prediction (Sec. 5.8): ||z - eps(sqrt(ab) x + sqrt(1 - ab) z, t)||^2 per sample [N]."""
    ab = dm_alpha_bar(x.device)[t_index].float().reshape(-1, *[1] * (x.ndim - 1))
    return (z - net(ab.sqrt() * x + (1 - ab).sqrt() * z, t_index.float(), labels)).square().flatten(1).mean(1)


# --- matching (Alg. 1, Eq. 11) ---


def greedy_match(x, z, chunk=1024):
    """DANSM Alg. 1 -> perm: image i takes noise z[perm[i]]. For each image in order, the nearest noise not
    yet taken (squared L2, the same argmin as the path length). Vectorised and exact: a chunk of images takes
    its argmins at once up to the first image whose choice an earlier image of the chunk already took; the
    rest retry against the updated set. Distances are built chunk by chunk ([chunk, n] at a time), so a pool
    of 100,000 CIFAR-10 images needs its two tensors (2 x 1.2 GB) plus 0.4 GB."""
    n = len(x)
    xf, zf = x.flatten(1), z.flatten(1)
    z2 = zf.square().sum(1)
    used = torch.zeros(n, dtype=torch.bool, device=x.device)
    perm = torch.empty(n, dtype=torch.long, device=x.device)
    for lo in range(0, n, chunk):
        d = z2[None, :] - 2 * xf[lo : lo + chunk] @ zf.T  # ||x - z||^2 - ||x||^2: same argmin per row
        rows = torch.arange(lo, min(lo + chunk, n), device=x.device)
        while len(rows):
            pick = d[rows - lo].masked_fill(used[None, :], math.inf).argmin(1)
            _, inverse = torch.unique(pick, return_inverse=True)
            pos = torch.arange(len(pick), device=x.device)
            first = torch.full((len(pick),), len(pick), device=x.device).scatter_reduce(
                0, inverse, pos, "amin"
            )
            clash = pos[first[inverse] < pos]  # images whose noise an earlier image of this round took
            k = int(clash.min()) if len(clash) else len(pick)
            perm[rows[:k]], used[pick[:k]] = pick[:k], True
            rows = rows[k:]
    return perm


def hungarian_match(x, z):
    """Immiscible Diffusion's matcher: the optimal assignment for Eq. 11 (sum of path lengths) by scipy's
    Hungarian solver on the whole pool, on the CPU, O(n^3)."""
    from scipy.optimize import linear_sum_assignment

    c = torch.cdist(x.flatten(1).double(), z.flatten(1).double()).cpu().numpy()
    return torch.as_tensor(linear_sum_assignment(c)[1], dtype=torch.long, device=x.device)


def match(x, z, matcher, chunk=1024, labels=None):
    """perm for a pool: image i trains with z[perm[i]]. With labels (class-conditional training) each class is
    matched among the noises at its own positions, so labels stay independent of the noise (as AOT's Alg. 2;
    the paper is unconditional)."""
    if matcher not in MATCHERS:
        raise ValueError(f"unknown matcher {matcher!r}; expected one of {MATCHERS}")
    perm = torch.arange(len(x), device=x.device)
    if matcher == "none":
        return perm
    groups = (
        [perm.clone()] if labels is None else [torch.nonzero(labels == k).flatten() for k in labels.unique()]
    )
    for g in groups:
        sub = greedy_match(x[g], z[g], chunk) if matcher == "greedy" else hungarian_match(x[g], z[g])
        perm[g] = g[sub]
    return perm


def path_length(x, z):
    """||z_i - x_i|| per path [N], float64."""
    return (z.double() - x.double()).flatten(1).norm(dim=1)


# --- inter-path metrics (Sec. 3.1, App. A.1) ---


def inter_path_distance(x1, z1, x2, z2):
    """DANSM Eq. 3-5 for paths r_k = (1 - t) x_k + t z_k, batched over the leading dim -> (dist, t*).
    V = x2 - x1, U = z2 - z1: the gap (1 - t) V + t U is closest at t_hat = V.(V - U) / |V - U|^2, clipped
    to [0, 1] (Eq. 4); parallel paths (U = V) are equally far everywhere (t* = 0)."""
    v, u = (x2 - x1).flatten(1).double(), (z2 - z1).flatten(1).double()
    w = v - u
    denom = w.square().sum(1)
    t_hat = torch.where(denom > 0, (v * w).sum(1) / denom.clamp_min(1e-300), torch.zeros_like(denom))
    t = t_hat.clamp(0, 1)
    return ((1 - t)[:, None] * v + t[:, None] * u).norm(dim=1), t


def path_rows(x, z, rows, chunk=1024):
    """Per-path terms of Tables 2-3 for the paths `rows` of a set of n paths (x, z), each against all n - 1
    others: length; the mean inter-path distance and its t* (d_avg, t_avg); the distance to the nearest other
    path and its t* (d_min, t_min). From the Gram matrices of x and z (float64), in row chunks. -> dict of
    float64 [len(rows)]."""
    xf, zf = x.flatten(1).double(), z.flatten(1).double()
    n = len(xf)
    xx, zz, xz = xf.square().sum(1), zf.square().sum(1), (xf * zf).sum(1)
    out = {k: [] for k in ("d_avg", "t_avg", "d_min", "t_min")}
    for lo in range(0, len(rows), chunk):
        r = rows[lo : lo + chunk].to(xf.device)
        gxx, gzz = xf[r] @ xf.T, zf[r] @ zf.T
        gxz, gzx = xf[r] @ zf.T, zf[r] @ xf.T  # x_i.z_j and z_i.x_j
        vv = xx[r, None] + xx[None] - 2 * gxx  # |x_j - x_i|^2
        uu = zz[r, None] + zz[None] - 2 * gzz
        vu = xz[None] - gzx - gxz + xz[r, None]  # (x_j - x_i).(z_j - z_i)
        ww = (vv - 2 * vu + uu).clamp_min(0)
        t = torch.where(ww > 0, (vv - vu) / ww.clamp_min(1e-300), torch.zeros_like(ww)).clamp(0, 1)  # Eq. 4
        d = ((1 - t) ** 2 * vv + 2 * t * (1 - t) * vu + t**2 * uu).clamp_min(0).sqrt()  # Eq. 5
        self_pair = torch.arange(len(r)), r
        d[self_pair], t[self_pair] = 0.0, 0.0
        out["d_avg"].append(d.sum(1) / (n - 1))
        out["t_avg"].append(t.sum(1) / (n - 1))
        d[self_pair] = math.inf
        k = d.argmin(1)
        out["d_min"].append(d.gather(1, k[:, None])[:, 0])
        out["t_min"].append(t.gather(1, k[:, None])[:, 0])
    rows_dev = rows.to(xf.device)
    return dict(length=path_length(x[rows_dev], z[rows_dev]), **{k: torch.cat(v) for k, v in out.items()})


def path_stats(x, z, chunk=1024):
    """Tables 2-3 for a set of n paths: mean path length; d_avg and t*_avg, the mean over all pairs i != j of
    the inter-path distance and its t*; d_min and t*_min, the mean over paths of the distance to the nearest
    other path and its t*."""
    return {k: v.mean().item() for k, v in path_rows(x, z, torch.arange(len(x)), chunk).items()}


# --- sampling (t from 1 = noise down to 0 = data) ---


@torch.no_grad()
def euler_sample(net, z, steps, labels=None):
    """RFM: x <- x - h v(x, t) from t = 1 to 0 in `steps` Euler steps."""
    x, h = z, 1.0 / steps
    for i in range(steps):
        x = x - h * net(x, 1.0 - i * h, labels)
    return x


def ddim_timesteps(steps, spacing="public"):
    """The DDIM timesteps (0-based indices into the 1000-step schedule, first to last) of `steps` steps.
    public: the DANSM code's (framework_ddim/diffusion_sampling.py, sample_batch: skip = 1000 // steps,
    reversed(range(0, 1000, skip)), as ermongroup's DDIM), which evaluates one more timestep than asked when
    1000 is not a multiple of steps (3 steps: 999, 666, 333, 0) and starts below 999 when it is (10 steps:
    900, ..., 0); `sample` reports the true count. even: `steps` indices rounded from linspace(999, 0)."""
    if spacing == "public":
        return list(reversed(range(0, DM_STEPS, DM_STEPS // steps)))
    if spacing == "even":
        return torch.linspace(DM_STEPS - 1, 0, steps, dtype=torch.float64).round().long().tolist()
    raise ValueError(f"unknown DDIM spacing {spacing!r}: use public or even")


@torch.no_grad()
def ddim_sample(net, z, steps, labels=None, spacing="public"):
    """DM: deterministic DDIM (eta = 0) on `ddim_timesteps(steps, spacing)`, ending at alpha_bar = 1 (the
    public code's alphas_cumprod[0] = 1 after its last timestep)."""
    ab = dm_alpha_bar(z.device)
    ts = torch.tensor(ddim_timesteps(steps, spacing), device=z.device)
    x = z
    for j, t in enumerate(ts):
        eps = net(x, t.float(), labels)
        x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        a_next = ab[ts[j + 1]] if j + 1 < len(ts) else torch.ones((), dtype=ab.dtype, device=z.device)
        x = (a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps).float()
    return x


@torch.no_grad()
def dopri5_sample(net, z, labels=None, atol=1e-5, rtol=1e-5, stats=None):
    """RFM: torchdiffeq's adaptive dopri5 from t = 1 down to 0 (atol = rtol = 1e-5, the flow papers' setting)
    -> (x, function evaluations); `stats` receives the attempted and accepted step counts."""
    from torchdiffeq import odeint

    if not (atol > 0 and rtol > 0):  # zero tolerances never accept a step: the solve would not end
        raise ValueError(f"dopri5 needs atol > 0 and rtol > 0, got atol={atol}, rtol={rtol}")

    count = dict(nfe=0, steps=0, accepted=0)

    class Field:  # torchdiffeq calls f(t, x) and looks its step callbacks up on the function object
        def __call__(self, t, x):
            count["nfe"] += 1
            return net(x, t, labels).to(x.dtype)

        def callback_step(self, t0, y0, dt):
            count["steps"] += 1

        def callback_accept_step(self, t0, y0, dt):
            count["accepted"] += 1

    x = z if z.dtype == torch.float64 else z.float()
    t = torch.tensor([1.0, 0.0], dtype=x.dtype, device=x.device)
    x = odeint(Field(), x, t, method="dopri5", atol=atol, rtol=rtol)[-1]
    if stats is not None:
        steps, accepted = count["steps"], count["accepted"]
        stats.update(nfe_torchdiffeq=count["nfe"], solver_steps=steps, accepted_steps=accepted,
                     rejected_steps=steps - accepted)  # fmt: skip
    return x, count["nfe"]


def build_net(net_kwargs):
    """The trained network, FlowNet (net.objective tells `sample` which sampler applies)."""
    return FlowNet(**net_kwargs)


def sample(net, noise, nfe, labels=None, solver="euler", atol=1e-5, rtol=1e-5, stats=None, spacing="public"):
    """Interface: noise -> (images, NFE): rfm: nfe Euler steps from t = 1, or (solver dopri5) torchdiffeq's
    adaptive solve with its function evaluations as the NFE (nfe ignored); dm: DDIM asked for nfe steps on the
    public code's timesteps (`spacing`, see ddim_timesteps), the true number of evaluations returned."""
    dm = getattr(net, "objective", "rfm") == "dm"
    if solver not in ("euler", "dopri5") or (dm and solver != "euler"):
        raise ValueError(f"solver {solver!r}: rfm takes euler or dopri5, dm (DDIM) only the default")
    if solver == "dopri5":
        return dopri5_sample(net, noise, labels, atol, rtol, stats)
    if nfe < 1:
        raise ValueError(f"need at least one step, got NFE {nfe}")
    if dm:
        used = len(ddim_timesteps(nfe, spacing))
        if stats is not None:
            stats.update(solver_steps=used)
        return ddim_sample(net, noise, nfe, labels, spacing), used
    if stats is not None:
        stats.update(solver_steps=nfe)
    return euler_sample(net, noise, nfe, labels), nfe


def inputs_for_seeds(seeds, shape, label_dim=0):
    """Image i's noise, then its class label, from a generator seeded with seeds[i] (as every method file)."""
    noise, labels = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        noise.append(torch.randn(shape, generator=g))
        if label_dim:
            labels.append(torch.randint(label_dim, [], generator=g))
    return torch.stack(noise), (torch.tensor(labels, dtype=torch.long) if label_dim else None)


def ode_velocity(net, x, t, labels=None):
    """dx/dt on the common clock (t = 0 noise, 1 data): this file's time is s = 1 - t, so -v(x, 1 - t)."""
    if getattr(net, "objective", "rfm") == "dm":
        raise ValueError("ode_velocity is defined for the rfm objective only")
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    return -net(x, 1 - t, labels)


def predict_x1(x, t, v):
    """The image the current velocity points at, x - t v (t in this file's convention, as the net got it)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.ndim - 1))
    return x - t * v


def generator_for(seed, *keys):
    """A CPU generator that depends only on (seed, keys): the same stream on every rank and device."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# --- training ---


class Pools:
    """The stream of matched pairs: pool p holds --match-size images from the epoch stream (batch_indices with
    batch = match_size) and as many fresh noises, both functions of (seed, p) only, matched once on rank 0.
    Step s trains on stream positions [s * batch, (s + 1) * batch), which may span several pools or a part of
    one."""

    def __init__(self, args, images, labels, n_data, shape, device, rank, world):
        self.args, self.images, self.labels, self.n_data = args, images, labels, n_data
        self.shape, self.device, self.rank, self.world = shape, device, rank, world
        self.cache = {}

    def pool(self, p):
        a = self.args
        if p not in self.cache:
            idx = batch_indices(self.n_data, a.match_size, p, a.seed)
            x, y = get_batch(self.images, self.labels, idx, self.device)
            z = torch.randn([a.match_size, *self.shape], generator=generator_for(a.seed, p, 1)).to(
                self.device
            )
            t0 = time.time()
            perm = (
                match(x, z, a.matcher, a.match_chunk, y)
                if self.rank == 0
                else torch.empty_like(idx).to(self.device)
            )
            if self.world > 1:  # rank 0's matching for everyone
                torch.distributed.broadcast(perm, 0)
            match_s = time.time() - t0
            zp = z[perm]  # Alg. 1: image i gets the noise chosen for it
            stats = dict(
                len_before=path_length(x, z).mean().item(), len_after=path_length(x, zp).mean().item()
            )
            self.cache = {k: v for k, v in self.cache.items() if k >= p - 1}
            self.cache[p] = (x, y, zp, stats, match_s)
        return self.cache[p]

    def step(self, step):
        """This rank's (x, z, labels) of a training step, its pools' statistics and matching seconds (each
        pool's matching time spread over the steps that use it)."""
        a, ms = self.args, self.args.match_size
        lo, hi = step * a.batch, (step + 1) * a.batch
        parts, pool_stats, match_s = [], [], 0.0
        for p in range(lo // ms, (hi - 1) // ms + 1):
            x, y, z, st, t = self.pool(p)
            s = slice(max(lo - p * ms, 0), min(hi - p * ms, ms))
            parts.append((x[s], y[s] if y is not None else None, z[s]))
            pool_stats.append(st)
            match_s += t * (s.stop - s.start) / ms  # the pool's matching time, shared by the rows it feeds
        stats = {k: sum(st[k] for st in pool_stats) / len(pool_stats) for k in pool_stats[0]}
        x = torch.cat([q[0] for q in parts])
        z = torch.cat([q[2] for q in parts])
        y = torch.cat([q[1] for q in parts]) if parts[0][1] is not None else None
        br = a.batch // self.world
        r = slice(self.rank * br, (self.rank + 1) * br)
        return x[r], z[r], None if y is None else y[r], stats, match_s


def ema_beta(mu, n, warmup=True):
    """The EMA decay of update n (1 for the first): mu, or with warm-up min(mu, (1 + n) / (10 + n)), as the
    public code's EMA (models/ncsn/ema.py, ExponentialMovingAverage.update with use_num_updates, from
    score-sde), so early checkpoints are averages over the steps so far rather than mostly the initial net."""
    return min(mu, (1 + n) / (10 + n)) if warmup else mu


def _sync(module, sync):
    """DDP: skip the gradient all-reduce on accumulation chunks that are not the last."""
    return contextlib.nullcontext() if sync or not hasattr(module, "no_sync") else module.no_sync()


def training_step(ddp, net, opt, batch, batch_gpu, args):
    """One optimiser step on this rank's matched (x, z, t, labels), accumulated over --batch-gpu chunks -> its
    mean loss (DANSM Eq. 2 for rfm, Sec. 5.8's epsilon loss for dm), with the gradient-norm clip."""
    x, z, t, y = batch
    opt.zero_grad(set_to_none=True)
    loss_sum, chunks = 0.0, list(range(0, len(t), batch_gpu))
    loss_fn = rfm_loss if args.objective == "rfm" else dm_loss
    for j, c in enumerate(chunks):
        sl = slice(c, c + batch_gpu)
        with _sync(ddp, j == len(chunks) - 1):
            loss = loss_fn(ddp, x[sl], z[sl], t[sl], None if y is None else y[sl]).mean()
            (loss * batch_gpu / len(t)).backward()
        loss_sum += loss.item() * batch_gpu / len(t)
    if args.grad_clip:
        torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
    opt.step()
    return loss_sum


def save_snapshot(args, net_kwargs, net, ema, opt, step, nimg, grid_noise, grid_labels, device):
    """Rank 0: the checkpoint (the pools are rebuilt from their seeds on resume) and a grid of EMA samples."""
    ckpt = dict(method=METHOD, version=VERSION, args=vars(args), net_kwargs=net_kwargs, net=net.state_dict(),
                ema=ema.state_dict(), opt=opt.state_dict(), step=step, kimg=nimg / 1000,
                state=dict(nimg=nimg))  # fmt: skip
    save_checkpoint(ckpt, args.outdir, step)
    if args.grid:
        labels = None if grid_labels is None else grid_labels.to(device)
        x, _ = sample(ema, grid_noise.to(device), args.grid_nfe, labels, spacing=args.ddim_spacing)
        save_image_grid(x, os.path.join(args.outdir, f"grid-{step:07d}.png"))


def run_net_kwargs(args, shape, label_dim, ckpt, log):
    """The network this run trains -> net_kwargs: from the flags (the RFM velocity net sees 1000 t, the DM
    eps-net the integer timestep), or the resumed run's."""
    res = shape[-1]
    if res % 2 ** (len(args.channel_mult) - 1):
        fail(f"image size {res} is not divisible by 2^{len(args.channel_mult) - 1} (--channel-mult)")
    net_kwargs = dict(img_resolution=res, img_channels=shape[0], label_dim=label_dim,
                      objective=args.objective, time_scale=1000.0 if args.objective == "rfm" else 1.0,
                      arch=args.arch, model_channels=args.model_channels,
                      channel_mult=list(args.channel_mult), num_blocks=args.num_blocks,
                      attn_resolutions=list(args.attn_res), dropout=args.dropout)  # fmt: skip
    if ckpt is not None:
        keys = ("data", "xflip", "batch", "seed", "match_size", "matcher", "objective", "lr", "ema_warmup")
        net_kwargs = resumed_net_kwargs(ckpt, net_kwargs, args, log, keys)
    return net_kwargs


def train(args):
    rank, world, device = dist_setup()
    log = Logger(args.outdir, rank)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    batch_rank, batch_gpu = split_batch(args, world)
    ckpt = resume_checkpoint(args, METHOD)
    images, labels = load_images(args.data, args.data_dir)
    if args.cond and labels is None:
        fail(f"--cond needs class labels, but {args.data} has none")
    n_data = len(images) * (2 if args.xflip else 1)
    if args.matcher == "none":  # the RFM baseline: nothing to match, pools of one batch
        args.match_size = args.batch
    if args.match_size > n_data:
        fail(f"--match-size {args.match_size} exceeds the {n_data} training images")
    label_dim = int(labels.max()) + 1 if args.cond else 0
    shape = tuple(images.shape[1:])
    net_kwargs = run_net_kwargs(args, shape, label_dim, ckpt, log)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    net = build_net(net_kwargs).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, **optimizer_kwargs(args, device))
    step = nimg = 0
    if ckpt is not None:
        net.load_state_dict(ckpt["net"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        step, nimg = ckpt["step"], ckpt["state"]["nimg"]
        log.print(f"resumed from {args.resume} at step {step} ({nimg / 1000:.1f} kimg)")
    ddp = prepare_net(net, args, device)  # the call under the speed flags; net and ema are what is stored
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            ddp, device_ids=[device] if device.type == "cuda" else None
        )
    if rank == 0:
        claim_outdir(args.outdir, ckpt, args.overwrite)
        with open(os.path.join(args.outdir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        log.print(json.dumps(vars(args)))
        log.print(
            f"{n_data} images {shape}, {sum(p.numel() for p in net.parameters())} parameters, "
            f"{world} process(es) on {device}; {args.objective}, matcher {args.matcher}, "
            f"pools of {args.match_size}"
        )
    images = images.to(device)
    labels = labels.to(device) if label_dim else None
    pools = Pools(args, images, labels, n_data, shape, device, rank, world)
    total_steps = math.ceil(args.duration * 1e6 / args.batch)
    grid_noise = torch.randn([args.grid, *shape], generator=torch.Generator().manual_seed(0))
    grid_labels = torch.arange(args.grid) % label_dim if label_dim else None
    stop = StopFlag()
    sums, t_last, step_last = {}, time.time(), step
    log.start(step, total_steps)
    while step < total_steps:
        seed_step(args.seed, rank, world, step)  # dropout
        x, z, y, stats, match_s = pools.step(step)
        g = generator_for(args.seed, step, 3)  # t of the global batch: independent of the world size
        lo, hi = rank * batch_rank, (rank + 1) * batch_rank
        if args.objective == "rfm":
            t = torch.rand(args.batch, generator=g)[lo:hi].to(device)
        else:
            t = torch.randint(DM_STEPS, (args.batch,), generator=g)[lo:hi].to(device)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, (step + 1) / args.warmup) if args.warmup else args.lr
        loss_sum = training_step(ddp, net, opt, (x, z, t, y), batch_gpu, args)
        ema_update(ema, net, ema_beta(args.ema, step + 1, args.ema_warmup))
        for k, v in dict(loss=loss_sum, match_s=match_s, **stats).items():
            sums[k] = sums.get(k, 0.0) + v
        nimg, step = nimg + args.batch, step + 1
        done, stop_now = step >= total_steps, stop.any(device, loss_sum, step)
        if step % args.log_every == 0 or done or stop_now:
            n = max(step - step_last, 1)
            metrics = {k: all_mean(v / n, device) for k, v in sums.items()}
            sec = (time.time() - t_last) / n
            log.log(
                step=step, kimg=nimg / 1000, **metrics, match_frac=metrics["match_s"] / sec, sec_per_step=sec
            )
            sums, t_last, step_last = {}, time.time(), step
        if step % args.snap_every == 0 or done or stop_now:
            if rank == 0:
                save_snapshot(args, net_kwargs, net, ema, opt, step, nimg, grid_noise, grid_labels, device)
            barrier()
        if stop_now:
            log.print(f"stopped by signal at step {step}; resume with --resume {args.outdir}")
            break
    dist_teardown()
    stop.exit()  # 143 after SIGTERM: the scheduler requeues the job


# --- the report (Tables 2 and 3) and generation ---


@torch.no_grad()
def invert(net, x, steps=100, labels=None):
    """The model's own noise for images x: Euler on its ODE from t = 0 (data) up to t = 1 (Table 3)."""
    h = 1.0 / steps
    for i in range(steps):
        x = x + h * net(x, i * h, labels)
    return x


def report_set(images, n_data, size, matcher, keep, seed, device, chunk=1024):
    """Table 2's paths for one match-size: independent pools of `size` consecutive positions of the epoch
    stream (pool p: batch_indices(n_data, size, p), noise from (seed, p), matched as in training), as many as
    cover every data index at least once (a pool larger than the data spans several epochs and holds an index
    several times, as the public code's pool of noises outlives an epoch). Each data index of `keep` then
    takes one of its occurrences, chosen uniformly, so no index appears twice and no position of a greedy
    pool (the first images choose first) is favoured. -> (x, z) in the order of `keep`, number of pools."""
    n_pools = math.ceil(n_data / size)
    idx = torch.cat([batch_indices(n_data, size, p, seed) for p in range(n_pools)])
    order = torch.randperm(len(idx), generator=generator_for(seed, size, 4))
    first = torch.full((n_data,), len(idx), dtype=torch.long)
    first.scatter_reduce_(0, idx[order], torch.arange(len(idx)), "amin")
    chosen = order[first[keep]]  # the stream position that represents each kept index
    x, _ = get_batch(images, None, keep, device)
    z = torch.empty_like(x)
    for p in range(n_pools):
        mine = torch.nonzero((chosen >= p * size) & (chosen < (p + 1) * size)).flatten()
        if not len(mine):
            continue
        xp, _ = get_batch(images, None, idx[p * size : (p + 1) * size], device)
        zp = torch.randn([size, *x.shape[1:]], generator=generator_for(seed, p, 1)).to(device)
        zp = zp[match(xp, zp, matcher, chunk)]  # Alg. 1 on the whole pool
        z[mine.to(device)] = zp[(chosen[mine] - p * size).to(device)]
    return x, z, n_pools


def summarize(per_path, n_ref):
    """Means of the per-path terms of P sampled paths of a set of n_ref, each with its standard error:
    s/sqrt(P) for the length (a per-path quantity); s sqrt(1/P + 3/n_ref) for the pair statistics, whose
    mean over a whole set is a U-statistic (variance about 4 s^2 / n_ref) plus sampling P of its rows."""
    out = {}
    for k, v in per_path.items():
        p = len(v)
        s = v.std().item() if p > 1 else 0.0
        out[k] = v.mean().item()
        out[f"{k}_se"] = s / math.sqrt(p) if k == "length" else s * math.sqrt(1 / p + 3 / n_ref)
    return out


def report(args):
    """Table 2 (random paths vs each match-size) and, with --ckpt, Table 3's preferable paths. Every row is a
    set of --ref-paths paths (default: one per data index, the paper's "50K CIFAR-10 images"), the same data
    indices in every row; the metrics are averaged over --paths of them, each against the whole set."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images, _ = load_images(args.data, args.data_dir)
    n_data = len(images) * (2 if args.xflip else 1)
    n_ref = min(args.ref_paths or n_data, n_data)
    if args.ref_paths and args.ref_paths > n_data:
        fail(f"--ref-paths {args.ref_paths} exceeds the {n_data} data indices of {args.data}")
    g = generator_for(args.seed, 5)
    keep = torch.randperm(n_data, generator=g)[:n_ref].sort().values  # the data indices of every row
    sampled = torch.randperm(n_ref, generator=g)[: min(args.paths, n_ref)].sort().values
    rows = []
    for ms in [0, *args.match_sizes]:  # 0: random pairing (the RFM baseline), one pool of the whole data
        size, matcher = (ms, "greedy") if ms else (n_data, "none")
        x, z, n_pools = report_set(images, n_data, size, matcher, keep, args.seed, device, args.match_chunk)
        stats = summarize(path_rows(x, z, sampled, args.match_chunk), n_ref)
        rows.append(dict(paths=f"ms {ms}" if ms else "random", pools=n_pools, pool_size=size, **stats))
    if args.ckpt:
        ckpt = load_checkpoint(args.ckpt)
        if ckpt.get("method") != METHOD:
            fail(f"--ckpt {args.ckpt} is a {ckpt.get('method')!r} checkpoint, not {METHOD!r}")
        net = build_net(ckpt["net_kwargs"]).eval().requires_grad_(False).to(device)
        net.load_state_dict(ckpt["ema"])
        if net.objective != "rfm" or net.label_dim:
            fail("preferable paths need an unconditional rfm checkpoint")
        x, _ = get_batch(images, None, keep, device)
        z = torch.cat([invert(net, x[i : i + 256], args.invert_steps) for i in range(0, len(x), 256)])
        stats = summarize(path_rows(x, z, sampled, args.match_chunk), n_ref)
        rows.append(dict(paths="preferable", pools=0, pool_size=0, **stats))
    print(
        f"{args.data}: {n_data} data indices{' (with x-flips)' if args.xflip else ''}; each row is a set of "
        f"{n_ref} paths (one per data index), its metrics averaged over {len(sampled)} of them, each against "
        f"all {n_ref}; +- one standard error (d_min falls as the set grows: compare rows of equal sets)"
    )
    keys = ("length", "d_avg", "t_avg", "d_min", "t_min")
    print(f"{'paths':>12} {'pools':>13} " + " ".join(f"{k.replace('t_', 't*_'):>16}" for k in keys))
    for r in rows:
        pools = f"{r['pools']} x {r['pool_size']}" if r["pools"] else "-"
        cells = [f"{r[k]:8.4f} +-{r[k + '_se']:<6.2g}" for k in keys]
        print(f"{r['paths']:>12} {pools:>13} " + " ".join(cells))
    if args.out_json:
        tmp = f"{args.out_json}.tmp{os.getpid()}"
        with open(tmp, "w") as f:
            meta = dict(data=args.data, data_indices=n_data, ref_paths=n_ref, paths=len(sampled))
            json.dump(dict(**meta, rows=rows), f, indent=2)
        os.replace(tmp, args.out_json)
    return rows


def generate(args):
    """--generate N images from --ckpt (image i from seed --seed + i, any number of processes)."""
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
    seeds = list(range(args.seed, args.seed + args.generate))[rank::world]
    out_x, out_y, nfe = [], [], 0
    for i in tqdm(range(0, len(seeds), args.gen_batch), disable=rank != 0, unit="batch"):
        noise, lab = inputs_for_seeds(seeds[i : i + args.gen_batch], shape, label_dim)
        lab = None if lab is None else lab.to(device)
        x, nfe = sample(net, noise.to(device), args.nfe, lab, spacing=args.ddim_spacing)
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
        print(f"wrote {len(images)} images to {args.out} (NFE {nfe})", flush=True)
    dist_teardown()


# --- command line ---


def _ints(s):
    return [int(v) for v in s.split(",") if v]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="DANSM: rectified flow with distance-aware noise-sample matching; inter-path metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=None, help="training images: cifar10 | shapes | FILE.npz | DIR")
    p.add_argument("--data-dir", default="datasets", help="where --data cifar10 is looked for / downloaded")
    p.add_argument(
        "--xflip",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="mirrored images as extra data indices (public code: random flips, config data.random_flip)",
    )
    p.add_argument("--cond", action="store_true", help="class-conditional (labels from the data)")
    p.add_argument("--outdir", default="runs/dansm", help="checkpoints, grids, log.jsonl, args.json")
    p.add_argument(
        "--objective", default="rfm", choices=["rfm", "dm"], help="rectified flow or Sec. 5.8's DM"
    )
    p.add_argument(
        "--matcher", default="greedy", choices=MATCHERS, help="Alg. 1 | Immiscible's | RFM baseline"
    )
    p.add_argument(
        "--match-size",
        type=int,
        default=10000,
        help="images (and noises) per matched pool (the paper: 10,000)",
    )
    p.add_argument("--match-chunk", type=int, default=1024, help="distance-matrix rows per chunk (memory)")
    p.add_argument("--batch", type=int, default=250, help="global batch (the paper's CIFAR-10 RFM: 250)")
    p.add_argument(
        "--batch-gpu", type=int, default=None, help="samples per forward pass (accumulate the rest)"
    )
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (public code: --lr 1e-4)")
    p.add_argument(
        "--warmup", type=int, default=0, help="linear lr warm-up steps (public code: none; 0: off)"
    )
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay per step (public README: 0.9999)")
    p.add_argument(
        "--ema-warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="EMA decay min(--ema, (1 + n) / (10 + n)) at update n, as the public code (score-sde's EMA)",
    )
    p.add_argument(
        "--duration", type=float, default=100.0, help="training length, Mimg (2000 CIFAR-10 epochs)"
    )
    p.add_argument(
        "--arch", default="ddpmpp", choices=["ddpmpp", "adm"], help="the UNet: the shared DDPM++ or ADM"
    )
    p.add_argument("--model-channels", type=int, default=128, help="UNet base width (DDPM++: 128)")
    p.add_argument("--channel-mult", type=_ints, default=[2, 2, 2], help="width multipliers per resolution")
    p.add_argument("--num-blocks", type=int, default=4, help="residual blocks per resolution")
    p.add_argument("--attn-res", type=_ints, default=[16], help="resolutions with self-attention")
    p.add_argument("--dropout", type=float, default=0.15, help="dropout (public CIFAR-10 RFM config: 0.15)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny UNet (CPU smoke runs)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order, pools, t")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    p.add_argument("--snap-every", type=int, default=5000, help="steps between checkpoints and image grids")
    p.add_argument("--grid", type=int, default=64, help="images per snapshot grid; 0: none")
    p.add_argument("--grid-nfe", type=int, default=10, help="sampling steps of the snapshot grids")
    p.add_argument("--resume", default=None, help="checkpoint file or run folder (its latest.pt) to continue")
    p.add_argument("--overwrite", action="store_true", help="replace a run in --outdir or an existing --out")
    p.add_argument("--report", action="store_true", help="print Table 2 (and 3 with --ckpt) for --data")
    p.add_argument("--match-sizes", type=_ints, default=[10, 100, 1000, 10000], help="--report: match-sizes")
    p.add_argument(
        "--paths", type=int, default=2000, help="--report: paths sampled per row (each against the whole set)"
    )
    p.add_argument(
        "--ref-paths", type=int, default=0, help="--report: paths per row's set (0: one per data index)"
    )
    p.add_argument("--invert-steps", type=int, default=100, help="--report --ckpt: Euler steps data -> noise")
    p.add_argument("--out-json", default=None, help="--report: also write the table as JSON")
    p.add_argument(
        "--generate", type=int, default=0, metavar="N", help="generate N images from --ckpt instead"
    )
    p.add_argument("--ckpt", default=None, help="dansm checkpoint (or run folder) for --generate / --report")
    p.add_argument("--out", default="samples.npz", help="output .npz of --generate (a .png grid beside it)")
    p.add_argument("--nfe", type=int, default=10, help="--generate: Euler (rfm) or DDIM (dm) steps")
    p.add_argument(
        "--ddim-spacing",
        default="public",
        choices=["public", "even"],
        help="dm: DDIM timesteps, the public code's reversed(range(0, 1000, 1000 // steps)) or even",
    )
    p.add_argument("--gen-batch", type=int, default=256, help="images per sampling batch in --generate")
    add_speed_args(p)
    args = p.parse_args(argv)
    check_numbers(p, args, ("batch", "batch_gpu", "duration", "atol", "rtol"), ("lr",))
    if args.generate and not args.ckpt:
        p.error("--generate needs --ckpt")
    if not args.generate and not args.data:
        p.error("--data is required for training and --report")
    if args.tiny:
        args.model_channels, args.channel_mult, args.num_blocks, args.attn_res = 16, [1, 2], 1, [8]
    if args.match_size < 1 or any(m < 1 for m in args.match_sizes):
        p.error("--match-size and --match-sizes must be at least 1")
    for name in ("batch", "duration", "log_every", "snap_every", "gen_batch", "paths", "nfe", "match_chunk"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        return report(args)
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

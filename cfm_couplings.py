"""CFM couplings: conditional flow matching with independent, minibatch-OT, Sinkhorn and reflow couplings.

A velocity field v_theta(x, t) regresses the constant velocity x1 - x0 of the straight path x_t = t x1 +
(1 - t) x0 from a noise x0 to an image x1 (LOOM Eq. 3; Lipman et al. 2023, Tong et al. 2024). --coupling picks
which x0 goes with which x1: independent (I-CFM), ot (the exact minibatch plan, a permutation of the noise;
--ot-replace draws the pairs i.i.d. from it as torchcfm), sinkhorn (pairs drawn from the entropic plan) or
pairs (gen_pairs.py's fixed pairs: reflow). --cond couples within each class (AOT Alg. 2). Step s's data,
flips and noise depend on (seed, s) alone; rank 0 solves the coupling and broadcasts it. t = 0 is the noise
x0 ~ N(0, I), t = 1 the data in [-1, 1]; samplers euler, midpoint, dopri5 (torchdiffeq). --generate runs on
one device (many GPUs: gen_pairs.py, evaluate.py). LOOM Table 1's rows: docs/cfm_couplings.md.
    python cfm_couplings.py --data shapes --coupling ot --tiny --batch 64 --duration 0.02 --outdir runs/ot
    torchrun --standalone --nproc_per_node=4 cfm_couplings.py --data cifar10 --coupling ot --ot-replace \
        --xflip random --outdir runs/otcfm
    python cfm_couplings.py --generate 50000 --ckpt runs/otcfm --solver dopri5 --out samples.npz
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
import struct
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
import torchdiffeq
import torchvision
from scipy.optimize import linear_sum_assignment
from torch import nn

METHOD = "cfm_couplings"  # equals the file name
VERSION = 1
COUPLINGS = ("independent", "ot", "sinkhorn", "pairs")
SINKHORN_REG = 1e-3  # eps / mean cost: ~0.7 of the plan's mass on the optimal permutation at CIFAR-10 scale


# --- CFM: the path and loss, the velocity net, the ODE samplers ---


def cfm_loss(net, x0, x1, t, labels=None, sigma_min=0.0, eps=None):
    """LOOM Eq. 3 per sample [N]: v_theta at x_t = t x1 + (1 - t) x0 + sigma_min eps regresses x1 - x0."""
    tb = t.reshape(-1, *[1] * (x1.ndim - 1))  # any data shape (images, toy vectors)
    xt = tb * x1 + (1 - tb) * x0
    if sigma_min:
        xt = xt + sigma_min * eps
    return (net(xt, t, labels) - (x1 - x0)).square().flatten(1).mean(1)


class VelocityNet(nn.Module):  # v_theta(x, t, class_labels=None): the UNet of `arch` on (x, time_scale * t)
    def __init__(self, img_resolution, img_channels, label_dim=0, time_scale=1000.0, arch="ddpmpp", **unet):
        super().__init__()
        self.label_dim, self.time_scale = label_dim, time_scale
        self.model = make_unet(arch, img_resolution, img_channels, img_channels, label_dim=label_dim, **unet)

    def forward(self, x, t, class_labels=None):  # labels: int64 [N] or one-hot
        x, dim, y = x.float(), self.label_dim, class_labels
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        if dim and y is None:
            raise ValueError("this network is class-conditional: pass class labels (int64 [N] or one-hot)")
        if dim:  # one-hot, as the UNet takes class labels
            y = (y if y.is_floating_point() else F.one_hot(y.long(), dim)).float().reshape(-1, dim)
        return self.model(x, self.time_scale * t, y if dim else None).float()


@torch.no_grad()
def sample(net, noise, nfe, labels=None, solver="euler", atol=1e-5, rtol=1e-5, stats=None):
    """LOOM Eq. 1-2: dx/dt = v(x, t) from the noise at t = 0 to t = 1 -> (images, NFE). euler: nfe steps of h;
    midpoint: nfe / 2 steps x <- x + h v(x + h/2 v(x, t), t + h/2); dopri5: torchdiffeq's, as torchcfm's and
    LOOM's code, nfe ignored, its function evaluations returned: the batch is one ODE (one error norm), so
    they depend on the batch. stats gets the solver's steps (dopri5: attempted, 6 NFE each, LOOM's log)."""
    if solver == "dopri5":
        if not (atol > 0 and rtol > 0):  # zero tolerances never accept a step
            raise ValueError(f"dopri5 needs atol > 0 and rtol > 0, got atol={atol}, rtol={rtol}")
        calls, steps, f = [], [], lambda t, x: calls.append(t) or net(x, t, labels).to(x.dtype)
        f.callback_step = lambda t0, y0, dt: steps.append(t0)  # torchdiffeq calls it at each attempted step
        x = noise if noise.dtype == torch.float64 else noise.float()
        t = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
        x = torchdiffeq.odeint(f, x, t, method="dopri5", atol=atol, rtol=rtol)[-1]
        stats.update(nfe_torchdiffeq=len(calls), solver_steps=len(steps)) if stats is not None else None
        return x, len(calls)
    if solver not in ("euler", "midpoint") or nfe < 1 or (solver == "midpoint" and nfe % 2):
        raise ValueError(f"solver {solver!r} with NFE {nfe}: use euler (NFE >= 1), midpoint (even) or dopri5")
    x, n, mid = noise, nfe if solver == "euler" else nfe // 2, solver == "midpoint"
    stats.update(solver_steps=n) if stats is not None else None
    for i in range(n):
        h, t = 1.0 / n, i * (1.0 / n)
        x = x + h * (net(x + 0.5 * h * net(x, t, labels), t + 0.5 * h, labels) if mid else net(x, t, labels))
    return x, nfe


# --- the couplings of one minibatch of noises x0 and images x1 ---


def pair_cost(x0, x1, cost="sqeuclidean", dtype=torch.float64):
    """LOOM Eq. 7's c(x, z), [n1, n0] (rows images, columns noises): ||x1_j - x0_i||^2 (sqeuclidean, the
    command line's default) or ||x1_j - x0_i|| (l2)."""
    c = torch.cdist(x1.flatten(1).to(dtype), x0.flatten(1).to(dtype))
    return c if cost == "l2" else c.square()


def ot_permutation(x0, x1, cost="sqeuclidean"):
    """Exact minibatch OT (LOOM Eq. 7 on one minibatch) -> perm, x0[perm[j]] the noise of x1[j]: images keep
    their place and labels, every noise is used once. float32 costs as torchcfm's (float64: 2-3x slower)."""
    _, cols = linear_sum_assignment(pair_cost(x0, x1, cost, torch.float32).cpu().numpy())
    return torch.as_tensor(cols, dtype=torch.long, device=x0.device)


def path_cost(x0, x1, cost="sqeuclidean"):  # c(x1_j, x0_j) per pair [N], the diagonal of pair_cost, float64
    d = (x1.double() - x0.double()).flatten(1).square().sum(1)
    return d.sqrt() if cost == "l2" else d


class SinkhornError(RuntimeError):  # the entropic plan degenerated or did not converge (never replaced)
    pass


def sinkhorn_log_plan(c, reg=SINKHORN_REG, max_iter=2000, tol=1e-4):
    """log P of the entropic plan (Cuturi 2013) between uniform marginals: P minimises <P, C> - eps H(P),
    eps = reg * mean(C) (one sharpness at any image size). Log-domain potentials f (rows), g (columns), eps
    annealed from the mean cost (eps-scaling), so that a sharp plan converges in a few hundred iterations
    where POT's ot.sinkhorn(method="sinkhorn_log"), without the annealing, needs thousands."""
    (n, m), scale = c.shape, c.mean().item()
    eps, f, g, err = reg * scale, c.new_zeros(n), c.new_zeros(m), math.nan
    if not (eps > 0 and math.isfinite(eps)):
        raise SinkhornError(f"Sinkhorn eps = reg {reg:g} x mean cost {scale:.4g} = {eps:g}: use reg > 0")
    if not torch.isfinite(c / eps).all():
        raise SinkhornError(f"C / eps overflows at eps = {eps:g} (underflow of eps): use a larger reg")
    for it in range(max_iter):
        e = max(eps, scale * 0.5 ** (it // 10))  # halve eps every 10 iterations, warm-started
        f = e * (-math.log(n) - torch.logsumexp((g[None, :] - c) / e, dim=1))
        g = e * (-math.log(m) - torch.logsumexp((f[:, None] - c) / e, dim=0))  # columns sum to 1/m exactly
        if e == eps and (it % 10 == 9 or it == max_iter - 1):
            log_p = (f[:, None] + g[None, :] - c) / eps
            err = (torch.logsumexp(log_p, dim=1).exp() - 1 / n).abs().sum().item()  # row-marginal L1 error
            if not math.isfinite(err):
                raise SinkhornError(f"Sinkhorn potentials are not finite at eps = {eps:g} (underflow)")
            if err < tol:
                return log_p
    raise SinkhornError(f"Sinkhorn did not converge: row-marginal error {err:.3g} > {tol:g} after {max_iter} "
                        f"iterations at reg {reg:g}; raise --sinkhorn-reg or --sinkhorn-iters")  # fmt: skip


def sinkhorn_pairs(log_p, replace=False, generator=None):
    """Pairs drawn from a plan -> (i0 noises, i1 images). replace=False: every image once in random order, its
    noise drawn from its row among the noises not yet taken (Gumbel-max): both marginals exact, but not the
    plan's law (TV 0.123 from it at CIFAR-10 scale). replace=True: torchcfm's n i.i.d. draws (TV 0.016)."""
    log_p = log_p.cpu()
    n, m = log_p.shape
    if replace:
        flat = torch.multinomial(log_p.flatten().softmax(0), n, replacement=True, generator=generator)
        return flat % m, flat // m
    u = torch.rand(n, m, dtype=log_p.dtype, generator=generator).clamp_(1e-300, 1 - 1e-16)
    scores = log_p - torch.log(-torch.log(u))  # log p + Gumbel noise
    i0, taken = torch.empty(n, dtype=torch.long), torch.zeros(m, dtype=torch.bool)
    for j in torch.randperm(n, generator=generator).tolist():
        k = int(torch.argmax(scores[j].masked_fill(taken, -math.inf)))
        i0[j], taken[k] = k, True
    return i0, torch.arange(n)


def couple(x0, x1, labels, coupling, cost="sqeuclidean", reg=SINKHORN_REG, replace=False, iters=2000,
           generator=None):  # fmt: skip
    """The coupling of one minibatch -> (i0, i1): train on (x0[i0], x1[i1], labels[i1]). With labels it is
    solved within each class (AOT Alg. 2): each class keeps its own noises. independent / pairs: the identity.
    ot with replace: torchcfm's draw, n of the optimal pairs uniformly with replacement (~63% distinct)."""
    i0, i1 = torch.arange(len(x1)), torch.arange(len(x1))
    if coupling in ("independent", "pairs"):
        return i0, i1
    y = None if labels is None else labels.cpu()
    for g in [torch.arange(len(x1))] if y is None else [torch.nonzero(y == k).flatten() for k in y.unique()]:
        gd = g.to(x0.device)
        if coupling == "ot":
            perm, n = ot_permutation(x0[gd], x1[gd], cost).cpu(), len(g)
            b = torch.randint(n, (n,), generator=generator) if replace else torch.arange(n)
            a = perm[b]
        elif coupling == "sinkhorn":
            a, b = sinkhorn_pairs(sinkhorn_log_plan(pair_cost(x0[gd], x1[gd], cost), reg, iters), replace,
                                  generator)  # fmt: skip
        else:
            raise ValueError(f"unknown coupling {coupling!r}; expected one of {COUPLINGS}")
        i0[g], i1[g] = g[a], g[b]
    return i0, i1


# --- the interface of every method file; training data and pairs ---


def build_net(net_kwargs):  # the trained network: a velocity field net(x, t, class_labels=None), t = 0 noise
    return VelocityNet(**net_kwargs)


def ode_start(net, noise):  # x at t = 0 of the common clock: the noise itself
    return noise


def ode_velocity(net, x, t, labels=None):  # dx/dt on the common clock: this file's own, v_theta
    return net(x, t, labels)


def noise_for_seeds(seeds, shape, label_dim=0):  # image i's noise, then its label, from seeds[i] (all files)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]) if gens else torch.empty(0, *shape)
    labels = torch.tensor([torch.randint(label_dim, [], generator=g) for g in gens]) if label_dim else None
    return noise, labels


def generator_for(seed, *keys):  # a CPU generator from (seed, keys) alone: the same on every rank and device
    s0, s1 = np.random.SeedSequence([seed, *keys]).generate_state(2)
    return torch.Generator().manual_seed(int(s0) << 32 | int(s1))


def batch_indices(n, batch, step, seed):
    """Step `step`'s global data indices: consecutive slices of a stream of per-epoch permutations, each from
    (seed, epoch) alone, so that the order does not depend on the number of processes."""
    pos, out = step * batch + torch.arange(batch), torch.empty(batch, dtype=torch.long)
    for e in (pos // n).unique().tolist():
        order = torch.randperm(n, generator=torch.Generator().manual_seed((seed * 1_000_003 + e) % 2**64))
        out[pos // n == e] = order[pos[pos // n == e] % n]
    return out


def coupled_batch(args, step, images, labels, pairs, n, shape, device, rank=0, world=1):
    """Step `step`'s global minibatch, coupled -> (x0, x1, labels, stats). Its data indices, --xflip random
    coins (index i + N: image i mirrored) and noise depend on (seed, step) alone; rank 0 solves the coupling
    and broadcasts it. Reflow pairs are used as made."""
    idx = batch_indices(n, args.batch, step, args.seed)
    if pairs is not None:
        i = idx.numpy()
        x0, x1 = (torch.from_numpy(np.asarray(pairs[k][i], np.float32)).to(device) for k in ("noise", "data"))
        y = torch.from_numpy(np.asarray(pairs["label"][i], np.int64)).to(device) if args.cond else None
    else:
        if args.xflip == "random":  # torchcfm's RandomHorizontalFlip on each visit
            idx = idx + n * (torch.rand(args.batch, generator=generator_for(args.seed, step, 5)) < 0.5)
        x1, y = get_batch(images, labels, idx, device)
        x0 = torch.randn([args.batch, *shape], generator=generator_for(args.seed, step, 1)).to(device)
    t0, both = time.time(), torch.empty(2, args.batch, dtype=torch.long)
    if rank == 0:
        both = torch.stack(couple(x0, x1, y, args.coupling, args.cost, args.sinkhorn_reg, args.ot_replace,
                                  args.sinkhorn_iters, generator_for(args.seed, step, 2)))  # fmt: skip
    if world > 1:
        torch.distributed.broadcast(both := both.to(device), 0)
    i0, i1 = both.to(device)
    stats = dict(cost_before=path_cost(x0, x1, args.cost).mean().item(), solve_s=time.time() - t0,
                 changed=(i0 != i1).float().mean().item(),
                 cost_after=path_cost(x0[i0], x1[i1], args.cost).mean().item())  # fmt: skip
    return x0[i0], x1[i1], None if y is None else y[i1], stats


def fail(msg):
    raise SystemExit(f"error: {msg}")  # one line for the user, exit code 1, no traceback


def data_meta(spec):  # tools/prepare_data.py's FILE.json beside FILE.npy ({"kind": "latents", ...}), or {}
    with contextlib.suppress(OSError, ValueError):
        return dict(json.load(open(spec[:-4] + ".json"))) if spec.endswith(".npy") else {}
    return {}


def load_data(spec):
    """--data cifar10 (in datasets/) | shapes | FILE.npy (tools/prepare_data.py's, memory-mapped; labels in
    FILE.labels.npy) | FILE.npz ('images', 'labels') -> uint8 [N, H, W, C] (latents: float [N, C, H, W]),
    int64 labels or None."""
    labels = None
    try:
        if spec == "shapes":  # the smoke-test set: a disc (label 0) or a square (1) of random colour and size
            n, res, rng = 4096, 16, np.random.default_rng(0)
            yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
            cy, cx = (rng.uniform(0.25, 0.75, (2, n, 1, 1)) * res).astype(np.float32)
            r = rng.uniform(0.12, 0.3, (n, 1, 1)).astype(np.float32) * res
            labels, fg, bg = rng.integers(0, 2, n), *rng.integers(0, 256, (2, n, 1, 1, 3))
            disc, square = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2, np.maximum(abs(yy - cy), abs(xx - cx))
            images = np.where(np.where(labels[:, None, None] == 0, disc, square <= r)[..., None], fg, bg)
            images = images.astype(np.uint8)
        elif spec == "cifar10":
            ds = torchvision.datasets.CIFAR10(root="datasets", train=True, download=True)
            images, labels = ds.data, np.asarray(ds.targets)
        elif spec.endswith(".npy"):
            images, lab = np.load(spec, mmap_mode="r"), spec[:-4] + ".labels.npy"
            labels = np.load(lab) if os.path.isfile(lab) else None
        else:
            with np.load(spec) as f:
                images, labels = f["images"], f.get("labels")
    except Exception as e:  # missing, truncated, a header that overstates N, no download: one line
        fail(f"--data {spec}: {type(e).__name__} {e}; use cifar10 (cifar-10-python.tar.gz in datasets/), "
             "shapes, an .npy of tools/prepare_data.py or an .npz of 'images' (and 'labels')")  # fmt: skip
    n, *hwc = images.shape
    if data_meta(spec).get("kind") == "latents":  # tools/prepare_data.py --vae
        if images.dtype not in (np.float16, np.float32) or len(hwc) != 3 or hwc[1] != hwc[2] or not n:
            fail(f"{spec}: latents must be float [N, C, H, H]; got {images.dtype} {images.shape}")
    elif images.dtype != np.uint8 or len(hwc) != 3 or hwc[2] not in (1, 3) or hwc[0] != hwc[1] or not n:
        fail(f"{spec}: images must be square uint8 [N, H, W, C], C 1 or 3; got {images.dtype} {images.shape}")
    if labels is not None and not (labels.shape == (n,) and labels.dtype.kind in "iu" and labels.min() >= 0
                                   and labels.max() < 2**16):  # fmt: skip
        fail(f"{spec}: labels must be integers in [0, 2^16), shape [{n}]; got {labels.dtype} {labels.shape}")
    return images, None if labels is None else torch.from_numpy(labels.astype(np.int64))


def get_batch(images, labels, idx, device):
    """Data index i >= N is the mirror image of i - N (--xflip) -> floats in [-1, 1] (latents as they are),
    labels. A memory-mapped array is read row by row (pread): mapped pages would stay resident."""
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


def load_pairs(path):
    """gen_pairs.py's uncompressed .npz -> its arrays memory-mapped (RAM O(batch)), 'meta' decoded (JSON)."""
    pairs = {}
    with zipfile.ZipFile(path) as z, open(path, "rb") as f:
        for info in (i for i in z.infolist() if i.filename.endswith(".npy")):  # mapped where they lie
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{info.filename} is compressed; pairs files must be uncompressed")
            f.seek(info.header_offset + 26)  # the local header: 30 bytes, a name and an extra field
            f.seek(info.header_offset + 30 + sum(struct.unpack("<HH", f.read(4))))
            major, _ = np.lib.format.read_magic(f)
            shape, fortran, dtype = getattr(np.lib.format, f"read_array_header_{major}_0")(f)
            if dtype.hasobject:
                raise ValueError(f"{info.filename} holds Python objects")
            arr = np.memmap(path, dtype, "r", f.tell(), shape, "F" if fortran else "C") if shape else None
            pairs[info.filename[:-4]] = arr if shape else np.frombuffer(f.read(dtype.itemsize), dtype)[0]
    return dict(pairs, meta=json.loads(str(pairs.get("meta", "{}"))))


def check_pairs(pairs, path, cond):
    """A pairs file's problem as one line before training (non-finite values stop it at its first step)
    -> (shape [C, H, W], classes: 0 unless cond)."""
    x0, x1, lab = pairs.get("noise"), pairs.get("data"), pairs.get("label")
    C = (1, 3, 4) if (pairs["meta"].get("data") or {}).get("kind") == "latents" else (1, 3)  # SD latents: 4
    shapes = [getattr(v, "shape", ()) for v in (x0, x1)]  # both [N, C, H, H]
    if len(shapes[0]) != 4 or shapes[0] != shapes[1] or shapes[0][1] not in C or shapes[0][2] != shapes[0][3]:
        fail(f"{path}: 'noise' and 'data' must both be [N, C, H, W] with C in {C} and H = W; got {shapes}")
    if not len(x0) or x0.dtype.kind != "f" or x1.dtype.kind != "f":
        fail(f"{path}: 'noise' and 'data' must be float16/32/64 with at least one pair")
    if lab is not None and (lab.shape != (len(x0),) or lab.dtype.kind not in "iu" or lab.min() < 0):
        fail(f"{path}: 'label' must be class indices >= 0 of shape [{len(x0)}], got {lab.dtype} {lab.shape}")
    if cond and lab is None:
        fail(f"--cond, but {path} has no 'label' array (its generator was unconditional)")
    label_dim = int(pairs["meta"].get("label_dim") or int(np.max(lab)) + 1) if cond else 0
    if cond and int(np.max(lab)) >= label_dim:
        fail(f"{path}: labels reach {int(np.max(lab))}, beyond its {label_dim} classes")
    return shapes[0][1:], label_dim


# --- checkpoints and run folders ---


def load_checkpoint(path, methods=(METHOD,)):
    """A checkpoint of `methods` (a run folder: its latest.pt), CRC- and structure-checked, loaded without
    executing code, with the keys this file reads; anything else is one line."""
    path = os.path.join(path, "latest.pt") if os.path.isdir(path) else path
    try:
        with zipfile.ZipFile(path) as z:  # torch.load checks no CRC: flipped bits would load changed weights
            bad = z.testzip()  # and a member marked "directory" would load as uninitialised memory
            bad = bad or next((i.filename for i in z.infolist() if i.is_dir() or i.external_attr & 16), None)
        if bad:
            fail(f"{path} is corrupt: its member {bad} is damaged; use an intact ckpt-*.pt beside it")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, cut off or foreign (never unpickled unsafely): one line
        fail(f"cannot load {path}: {e!r:.300}; use an intact ckpt-*.pt beside it")
    if (kind := ckpt.get("method") if isinstance(ckpt, dict) else type(ckpt).__name__) not in methods:
        fail(f"{path} is a {kind!r} checkpoint, not {' or '.join(map(repr, methods))}")
    if missing := [k for k in ("net_kwargs", "net", "ema", "step") if k not in ckpt]:
        fail(f"{path} has no {', '.join(missing)}: not a whole checkpoint")
    if ckpt.get("version") not in range(VERSION + 1):
        fail(f"{path} is a version {ckpt.get('version')!r} checkpoint; this code reads versions <= {VERSION}")
    return ckpt


@contextlib.contextmanager
def fits(path):  # a net built or loaded from a file: a wrong shape or an unknown arch is one line
    try:
        yield
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        fail(f"cannot build the network of {path}: {type(e).__name__} {str(e).strip().splitlines()[0][:200]}")


def claim_outdir(outdir, ckpt, overwrite, resume=None, _held={}):  # noqa: B006 (locks held for the process's life)
    """Rank 0: lock --outdir; write over a run only if it is the one resumed or --overwrite; remove a killed
    run's temporary files; on resume cut log.jsonl back to the checkpoint."""
    os.makedirs(outdir, exist_ok=True)
    if (lock := os.path.abspath(os.path.join(outdir, ".lock"))) not in _held:
        try:
            fcntl.flock(_held.setdefault(lock, open(lock, "a")), fcntl.LOCK_EX | fcntl.LOCK_NB)  # noqa: SIM115
        except OSError:
            _held.pop(lock)
            fail(f"{outdir} is locked by a running job; wait for it or use another --outdir")
    runs = sorted(n for n in os.listdir(outdir) if re.fullmatch(r"ckpt-\d+\.pt", n))
    src = resume and os.path.realpath(os.path.join(resume, "latest.pt") if os.path.isdir(resume) else resume)
    ours = ckpt is not None and os.path.dirname(src) == os.path.realpath(outdir)  # this folder's own run
    if runs and not ours and not overwrite:
        n = int(runs[-1][5:-3])
        fail(f"{outdir} holds another run (step {n}); resume {resume} into its own folder or pass --overwrite"
             if resume else f"{outdir} holds a run at step {n}: pass --resume {outdir} to continue it, "
             "--overwrite to replace it, or choose another --outdir")  # fmt: skip
    replaced = [] if ours else [*runs, "latest.pt", "log.jsonl"]  # a new run starts from an empty folder
    for name in os.listdir(outdir):  # only what this file writes: a killed run's temporaries, a replaced run
        if re.fullmatch(r"(ckpt-\d+\.pt|log\.jsonl)\.tmp", name) or name in replaced:
            os.remove(os.path.join(outdir, name))
    if ours and os.path.isfile(log := os.path.join(outdir, "log.jsonl")):  # cut back to the ckpt
        with open(log) as f:  # lines cut off by a kill are dropped
            keep = [s for s in f if (m := re.match(r'{"step": (\d+),.*}\n', s)) and int(m[1]) <= ckpt["step"]]
        with open(log + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(log + ".tmp", log)


# --- training: torchcfm's and LOOM's loop, nanoGPT-style ---


def train(args):
    ddp, cuda = "RANK" in os.environ, torch.cuda.is_available()  # torchrun: a process per GPU or CPU (gloo)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if ddp:
        torch.cuda.set_device(device) if cuda else None
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if ddp else (0, 1)
    batch_rank, batch_gpu = args.batch // world, args.batch_gpu or args.batch // world
    if args.batch % world or batch_rank % batch_gpu:
        fail(f"--batch {args.batch} must split into {world} process(es) x a multiple of --batch-gpu")
    ckpt, images, labels, pairs = load_checkpoint(args.resume) if args.resume else None, None, None, None
    if args.coupling == "pairs":  # reflow: the generator's (noise, image, label) rows
        try:
            pairs = load_pairs(args.pairs)
        except (ValueError, OSError, zipfile.BadZipFile, struct.error) as e:
            fail(f"cannot read {args.pairs} as an uncompressed .npz of pairs (gen_pairs.py's): {e}")
        (C, res, _), label_dim = check_pairs(pairs, args.pairs, args.cond)
        meta, n_data = pairs["meta"].get("data") or {}, len(pairs["noise"])  # a latent teacher's pairs
    else:
        images, labels = load_data(args.data)
        if args.cond and labels is None:
            fail(f"--cond needs class labels, but {args.data} has none")
        label_dim, meta = int(labels.max()) + 1 if args.cond else 0, data_meta(args.data)
        hwc = meta.get("kind") != "latents"  # images [N, H, W, C]; tools/prepare_data.py --vae: [N, C, H, W]
        res, C = (images.shape[1], images.shape[3]) if hwc else (images.shape[2], images.shape[1])
        labels, n_data = labels if args.cond else None, len(images) * (2 if args.xflip == "copies" else 1)
    latent = meta.get("kind") == "latents"  # latents (or a latent teacher's pairs): no image grids
    if args.batch > n_data or res % 2 ** (len(args.channel_mult) - 1):
        fail(f"--batch {args.batch} exceeds the {n_data} samples, or --channel-mult does not divide {res}")
    net_kwargs = dict(img_resolution=res, img_channels=C, label_dim=label_dim, time_scale=1.0, arch=args.arch,
                      model_channels=args.model_channels, channel_mult=args.channel_mult,
                      num_blocks=args.num_blocks, attn_resolutions=args.attn_res,
                      dropout=args.dropout)  # fmt: skip
    init = load_checkpoint(args.init, ("cfm_couplings", "loom_cfm")) if args.init and ckpt is None else None
    step = nimg = 0
    with fits(args.resume or args.init or f"--arch {args.arch}"):
        if init is not None:  # e.g. 2-Rect-Flow from the 1-RF weights: their architecture, this run's dropout
            net_kwargs = dict(init["net_kwargs"], dropout=args.dropout)
        k = net_kwargs = ckpt["net_kwargs"] if ckpt is not None else net_kwargs
        if (k["img_resolution"], k["img_channels"], k["label_dim"]) != (res, C, label_dim):
            fail(f"{args.resume or args.init} was trained on other data ({k['img_resolution']}^2 x "
                 f"{k['img_channels']}, {k['label_dim']} classes): use its data and --cond")  # fmt: skip
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        net = build_net(net_kwargs).to(device).train()
        if init is not None:
            net.load_state_dict(init["ema"] if init.get("ema") is not None else init["net"])
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = torch.optim.Adam(net.parameters(), lr=args.lr)
        if ckpt is not None:
            net.load_state_dict(ckpt["net"]), ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["opt"])
            step, nimg = ckpt["step"], ckpt["state"]["nimg"]
    if rank == 0:
        claim_outdir(args.outdir, ckpt, args.overwrite, args.resume)  # the flags are in every checkpoint
        print(f"{n_data} samples {(C, res, res)}, {label_dim} classes, {world} process(es) on {device}, "
              f"coupling {args.coupling}, from step {step}", flush=True)  # fmt: skip
        if ckpt is not None and (saved := ckpt["state"].get("world", world)) != world:  # the dropout seed
            print(f"note: saved with {saved} process(es), resumed with {world}: the per-rank dropout streams "
                  "change from here on; the data order, couplings, t and noise do not")  # fmt: skip
    torch.backends.cudnn.benchmark = True  # full fp32 unless --precision tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    model = torch.compile(net) if args.compile else net  # what is called; net and ema are what is stored
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, [device] if device.type == "cuda" else None)
    stop = []  # SIGINT/SIGTERM: a checkpoint at the end of the step, then exit 128 + signal (a requeue)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: stop.append(signum))
    total_steps, sums, t_log, step_log = math.ceil(args.duration * 1e6 / args.batch), {}, time.time(), step
    grid_noise, grid_labels = noise_for_seeds(range(args.grid), (C, res, res), label_dim)
    while step < total_steps:
        torch.manual_seed(generator_for(args.seed * world + rank, step).initial_seed())  # dropout: no state
        x0, x1, y, rec = coupled_batch(args, step, images, labels, pairs, n_data, (C, res, res), device, rank,
                                       world)  # fmt: skip
        mine = slice(rank * batch_rank, (rank + 1) * batch_rank)  # this rank's rows of the global minibatch
        x0, x1, y, g = x0[mine], x1[mine], None if y is None else y[mine], generator_for(args.seed, step, 3)
        t = torch.rand(args.batch, generator=g)[mine].to(device)  # t, eps of the global batch: any world size
        eps = torch.randn([args.batch, C, res, res], generator=g)[mine].to(device) if args.sigma_min else None
        ramp = round(args.lr_rampup * 1e6)  # lr x min(images, ramp) / ramp from 0: torchcfm's, LOOM's warm-up
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, nimg / ramp) if ramp else args.lr
        opt.zero_grad(set_to_none=True)
        loss_sum, chunks = 0.0, list(range(0, batch_rank, batch_gpu))
        for j, lo in enumerate(chunks):  # --batch-gpu samples per forward pass
            sl = slice(lo, lo + batch_gpu)
            sync = contextlib.nullcontext() if j == len(chunks) - 1 or not ddp else model.no_sync()
            with sync, torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
                loss = cfm_loss(model, x0[sl], x1[sl], t[sl], None if y is None else y[sl], args.sigma_min,
                                None if eps is None else eps[sl]).mean()  # LOOM Eq. 3  # fmt: skip
                (loss * batch_gpu / batch_rank).backward()
            loss_sum += loss.item() * batch_gpu / batch_rank
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip or math.inf).item()
        opt.step()
        for p_ema, p in zip(ema.state_dict().values(), net.state_dict().values(), strict=True):
            p_ema.copy_(p.lerp(p_ema, args.ema_decay))  # EMA, a decay per step (torchcfm, LOOM); buffers stay
        rec.update(loss=loss_sum, grad_norm=grad_norm, lr=opt.param_groups[0]["lr"])
        sums, nimg, step = {k: sums.get(k, 0.0) + v for k, v in rec.items()}, nimg + args.batch, step + 1
        flags = torch.tensor([bool(stop), not math.isfinite(loss_sum + grad_norm)], device=device).float()
        torch.distributed.all_reduce(flags) if ddp else None  # every rank stops together
        if flags[1]:
            fail(f"non-finite loss or gradient at step {step}: stopped before a checkpoint; lower --lr or "
                 "look for NaN/inf in the data or pairs")  # fmt: skip
        done, stopping = step >= total_steps, bool(flags[0])
        if step % args.log_every == 0 or done or stopping:
            mean = torch.tensor(list(sums.values()), dtype=torch.float64, device=device) / (step - step_log)
            torch.distributed.all_reduce(mean) if ddp else None  # the mean over ranks
            rec = dict(step=step, kimg=nimg / 1000, **dict(zip(sums, (mean / world).tolist(), strict=True)),
                       sec_per_step=(time.time() - t_log) / (step - step_log))  # fmt: skip
            if rank == 0:
                print(" ".join(f"{k}={v:.5g}" if type(v) is float else f"{k}={v}" for k, v in rec.items()))
                with open(os.path.join(args.outdir, "log.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
            sums, t_log, step_log = {}, time.time(), step
        if step % args.snap_every == 0 or done or stopping:  # all a bit-exact resume needs; rank 0 saves
            weights = [*net.state_dict().values(), *ema.state_dict().values()]  # the same on every rank
            if not all(w.isfinite().all() for w in weights if w.is_floating_point()):
                fail(f"non-finite weights at step {step}: not saved; the newest checkpoint is the last good")
            if rank == 0:
                path = os.path.join(args.outdir, name := f"ckpt-{step:07d}.pt")
                ckpt = dict(method=METHOD, version=VERSION, args=vars(args), net_kwargs=net_kwargs, step=step,
                            net=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(),
                            state=dict(nimg=nimg, world=world), kimg=nimg / 1000, data=meta)  # fmt: skip
                with open(path + ".tmp", "wb") as f:  # through a Python file: a full disk is an OSError
                    torch.save(ckpt, f)
                os.replace(path + ".tmp", path)  # atomic: a kill never leaves a half-written checkpoint
                os.symlink(name, path + ".tmp")
                os.replace(path + ".tmp", os.path.join(args.outdir, "latest.pt"))
            if rank == 0 and args.grid and not latent:  # EMA samples of the grid seeds
                lab = None if grid_labels is None else grid_labels.to(device)
                x = sample(ema, grid_noise.to(device), args.nfe, lab, args.solver)[0].cpu()
                path, nrow = os.path.join(args.outdir, f"grid-{step:07d}.png"), math.ceil(math.sqrt(len(x)))
                torchvision.utils.save_image((x + 1) / 2, path, nrow=nrow, padding=0)
            torch.distributed.barrier() if ddp else None
        if stopping:
            print(f"stopped at step {step}: continue with --resume {args.outdir}") if rank == 0 else None
            break
    if ddp:
        torch.distributed.barrier(), torch.distributed.destroy_process_group()
    if stop:
        raise SystemExit(128 + stop[0])


@torch.no_grad()
def generate(args):
    """--generate N: the images of seeds --seed ... --seed + N - 1 from --ckpt's EMA on one device -> an .npz
    ('images' uint8 NHWC, 'seeds', 'labels'; latent data: 'latents' and the decoded images) written
    atomically, and a PNG grid of the first 64 beside it."""
    from tqdm import tqdm

    png = os.path.splitext(args.out)[0] + ".png"
    with open(f"{args.out}.lock", "a") as lock:  # held while it runs: another job on this --out stops at once
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fail(f"{args.out} is being written by a running job; wait for it or use another --out")
        if not args.overwrite and (old := [p for p in (args.out, png) if os.path.exists(p)]):
            fail(f"{old[0]} exists; pass --overwrite to replace it")
        ckpt = load_checkpoint(args.ckpt)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        with fits(args.ckpt):
            k, meta = ckpt["net_kwargs"], ckpt.get("data") or {}
            net = build_net(k).eval().requires_grad_(False).to(device)
            net.load_state_dict(ckpt["ema"])
        latent = meta.get("kind") == "latents"  # decoded by the VAE it was encoded with
        vae = load_vae(meta["vae"]).to(device) if latent else None
        shape, xs, ys, zs = (k["img_channels"], k["img_resolution"], k["img_resolution"]), [], [], []
        seeds = range(args.seed, args.seed + args.generate)
        for i in tqdm(range(0, args.generate, args.gen_batch), unit="batch"):
            noise, lab = noise_for_seeds(seeds[i : i + args.gen_batch], shape, k["label_dim"])
            lab = lab if lab is None else lab.to(device)
            x, nfe = sample(net, noise.to(device), args.nfe, lab, args.solver)
            if not x.isfinite().all():
                fail(f"--ckpt {args.ckpt} gives non-finite samples (NaN/inf weights?); nothing written")
            zs.append(x.cpu())
            x = vae.decode(x / meta["scale"]).sample.float() if latent else x  # latents were stored x scale
            xs.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
            ys.append(lab)
        out = dict(images=torch.cat(xs).numpy(), seeds=np.arange(args.seed, args.seed + args.generate))
        out.update(labels=torch.cat(ys).cpu().numpy()) if k["label_dim"] else None
        out.update(latents=torch.cat(zs).numpy()) if latent else None  # the raw samples too
        with open(f"{args.out}.tmp{os.getpid()}", "wb") as f:
            np.savez(f, **out)
        os.replace(f"{args.out}.tmp{os.getpid()}", args.out)
        grid = torch.from_numpy(out["images"][:64]).permute(0, 3, 1, 2).float() / 255
        torchvision.utils.save_image(grid, png, nrow=math.ceil(math.sqrt(len(grid))), padding=0)
        print(f"wrote {args.generate} images to {args.out} and {png} ({args.solver}: NFE {nfe} per batch)")


def load_vae(name):  # tools/prepare_data.py's diffusers AutoencoderKL: a folder or a model id (HF cache)
    from diffusers import AutoencoderKL
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return AutoencoderKL.from_pretrained(name, local_files_only=not os.path.isdir(name)).eval()
    except Exception as e:  # missing, unreadable or not a VAE: one line with the reason
        fail(f"cannot load the VAE {name} of this checkpoint's latents ({type(e).__name__}): put its "
             f"diffusers files at {name} or in {HF_HUB_CACHE}/models--{name.replace('/', '--')}")  # fmt: skip


# --- command line ---

# LOOM's official reflow config (cifar10_ot_cached_reflow.yaml): Adam 2e-5, 5k warm-up steps, batch 1024 (256
# x 4 GPUs), sigma 1e-7, EMA 0.9999, clip 1, no flips, 200 epochs of the 1M pairs.
PRESETS = {"loom-reflow": dict(coupling="pairs", lr=2e-5, lr_rampup=5.12, batch=1024, sigma_min=1e-7,
                               ema_decay=0.9999, grad_clip=1.0, xflip="off", duration=200.0)}  # fmt: skip


def number(cast, lo, hi=math.inf, lo_open=False, hi_open=False):  # argparse type: a finite number in range
    def parse(s):
        v = cast(s)
        if not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and (v < hi if hi_open else v <= hi)):
            raise argparse.ArgumentTypeError(f"{s} is not in {'[('[lo_open]}{lo}, {hi}{'])'[hi_open]}")
        return v

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Flow matching: independent / OT / Sinkhorn / reflow couplings.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                                allow_abbrev=False)  # fmt: skip
    add, ints = p.add_argument, lambda s: [number(int, 1)(v) for v in s.split(",") if v]
    count, batch, pos = number(int, 1), number(int, 1, 2**20), number(float, 0, lo_open=True)
    add("--preset", choices=sorted(PRESETS), help="a paper's settings as defaults (flags given win)")
    add("--coupling", default="ot", choices=COUPLINGS, help="how noise is paired with data")
    add("--data", help="cifar10 (in datasets/) | shapes | FILE.npy (tools/prepare_data.py) | FILE.npz")
    add("--pairs", help="--coupling pairs: a gen_pairs.py .npz (noise, data, label)")
    add("--outdir", default="runs/cfm", help="checkpoints (with the flags), grids, log.jsonl")
    add("--cond", action="store_true", help="class-conditional: labels to the net, coupled within each class")
    add("--xflip", default="off", choices=["off", "random", "copies"], help="random: each visit (torchcfm)")
    add("--cost", default="sqeuclidean", choices=["sqeuclidean", "l2"], help="transport cost (torchcfm's)")
    add("--ot-replace", action="store_true", help="draw the pairs i.i.d. from the plan (torchcfm)")
    add("--sinkhorn-reg", type=pos, default=SINKHORN_REG, help="entropic eps / mean cost. Without --ot-"
        "replace both marginals stay exact, but the pairs leave the plan (TV 0.123, not 0.016)")  # fmt: skip
    add("--sinkhorn-iters", type=count, default=2000, help="Sinkhorn iterations before it raises")
    add("--sigma-min", type=number(float, 0), default=0.0, help="path noise sigma, LOOM Eq. 3 (torchcfm: 0)")
    add("--arch", choices=["ddpmpp", "adm", "adm-cfm"], help="UNet (adm-cfm: torchcfm's; cifar10's default)")
    add("--batch", type=batch, default=128, help="global batch per optimizer step (torchcfm, LOOM: 128)")
    add("--batch-gpu", type=batch, help="samples per forward pass (accumulating to the per-process batch)")
    add("--lr", type=pos, default=2e-4, help="Adam learning rate (torchcfm: 2e-4)")
    add("--lr-rampup", type=number(float, 0), default=0.64, help="lr warm-up, Mimg (torchcfm: 5k x 128)")
    add("--grad-clip", type=number(float, 0), default=1.0, help="gradient-norm clip (0: off)")
    add("--ema-decay", type=number(float, 0, 1), default=0.9999, help="EMA decay per step (torchcfm: 0.9999)")
    add("--duration", type=pos, default=51.2, help="training length, Mimg (torchcfm: 400k steps x 128)")
    add("--init", help="start from this flow checkpoint's EMA weights, in its architecture (reflow)")
    add("--model-channels", type=count, default=128, help="UNet base width (torchcfm: 128)")
    add("--channel-mult", type=ints, default=[1, 2, 2, 2], help="width multipliers (torchcfm: 1,2,2,2)")
    add("--num-blocks", type=count, default=2, help="residual blocks per resolution (torchcfm: 2)")
    add("--attn-res", type=ints, default=[16], help="resolutions with self-attention (torchcfm: 16)")
    add("--dropout", type=number(float, 0, 1, hi_open=True), default=0.1, help="dropout (torchcfm: 0.1)")
    add("--tiny", action="store_true", help="a tiny UNet for CPU smoke runs")
    add("--seed", type=number(int, 0, 2**63 - 1), default=0, help="init, data, noise, t; 1st --generate seed")
    add("--log-every", type=count, default=100, help="steps between log lines")
    add("--snap-every", type=count, default=5000, help="steps between checkpoints and image grids")
    add("--grid", type=number(int, 0), default=64, help="images in each snapshot grid (seeds 0..N-1)")
    add("--resume", help="run folder (its latest.pt) or checkpoint to continue")
    add("--overwrite", action="store_true", help="replace a run in --outdir or an existing --out")
    add("--generate", type=number(int, 0), default=0, metavar="N", help="generate N images from --ckpt")
    add("--ckpt", help="--generate: a checkpoint of this file, or its run folder")
    add("--out", default="samples.npz", help="--generate's .npz (a .png grid beside it)")
    add("--solver", default="euler", choices=["euler", "midpoint", "dopri5"], help="ODE solver (grids too)")
    add("--nfe", type=count, default=100, help="network evaluations of euler / midpoint (grids too)")
    add("--gen-batch", type=batch, default=256, help="images per sampling batch (one dopri5 ODE: its NFE)")
    add("--precision", default="fp32", choices=["fp32", "tf32", "bf16"], help="training: fp32 (the papers')")
    add("--compile", action="store_true", help="training: torch.compile the network")
    if (preset := p.parse_known_args(argv)[0].preset) is not None:
        p.set_defaults(**PRESETS[preset])
    args = p.parse_args(argv)
    pairs = args.coupling == "pairs"
    if args.generate and not args.ckpt:
        p.error("--generate N needs --ckpt")
    if not args.generate and (not args.pairs if pairs else not args.data):
        p.error(f"--coupling {args.coupling} needs " + ("--pairs FILE.npz" if pairs else "--data"))
    if not args.generate and (pairs and args.xflip != "off" or not pairs and args.pairs):
        p.error("--xflip has no meaning for reflow pairs; --pairs is only read by --coupling pairs")
    if not args.channel_mult or (args.solver == "midpoint" and args.nfe % 2):
        p.error("--channel-mult needs at least one level, --solver midpoint an even --nfe")
    args.arch = args.arch or ("adm-cfm" if args.data == "cifar10" else "ddpmpp")
    if args.tiny:  # adm-cfm's GroupNorms have 32 groups
        args.channel_mult, args.num_blocks, args.attn_res = [1, 2], 1, [8]
        args.model_channels = 32 if args.arch == "adm-cfm" else 16
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        generate(args) if args.generate else train(args)
    except OSError as e:  # a full disk, a read-only folder, a name too long: one line
        fail(f"{e.filename or (args.out if args.generate else args.outdir)}: {e.strerror or e}")
    except KeyboardInterrupt:  # Ctrl-C during --generate (training saves and exits itself)
        raise SystemExit(130) from None
    except SinkhornError as e:  # the last checkpoint is the newest good state
        fail(f"{e}; continue from the last checkpoint with --resume {args.outdir}")


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

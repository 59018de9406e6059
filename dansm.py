"""DANSM: distance-aware noise-sample matching for rectified flow (Xu et al., "Easing Training Process of
Rectified Flow Models via Lengthening Inter-Path Distance", ICLR 2025).

Rectified flow (RFM) regresses the velocity z - x of the straight paths x_t = (1 - t) x + t z between images x
and noises z (Eq. 1-2). Where two paths pass close (Eq. 3-5) their targets conflict; DANSM lengthens these
inter-path distances by shortening the paths (Eq. 11): a pool of --match-size images and as many fresh noises
is matched greedily, each image in order taking the nearest unused noise (Alg. 1), so the noise marginal stays
N(0, I); the batches consume the matched pools. --matcher hungarian is Immiscible Diffusion's assignment,
--matcher none plain RFM, --objective dm Sec. 5.8's diffusion model (Table 4). --report prints Table 2 and,
with --ckpt, Table 3's preferable paths. Convention (Eq. 1): t = 0 data, t = 1 noise; the network sees
(x_t, 999 t) and predicts z - x; Euler runs from t = 1 to 0 on the public code's grid (docs/dansm.md).

CPU smoke run; the paper's CIFAR-10 run (Table 1); Tables 2-3 (50K paths per row, no flips, as the paper);
50,000 images in one process (gen_pairs.py and evaluate.py sample on many GPUs):
    python dansm.py --data shapes --tiny --batch 64 --match-size 256 --duration 0.02 --outdir runs/dansm
    torchrun --standalone --nproc_per_node=4 dansm.py --data cifar10 --outdir runs/dansm-cifar10
    python dansm.py --report --data cifar10 --xflip off --match-sizes 10,100,1000,10000,100000 --paths 2000
    python dansm.py --report --data cifar10 --xflip off --paths 2000 --ckpt runs/dansm-cifar10
    python dansm.py --generate 50000 --ckpt runs/dansm-cifar10 --nfe 10 --out dansm10.npz
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

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.utils import save_image

METHOD = "dansm"  # equals the file name
VERSION = 1
MATCHERS = ("greedy", "hungarian", "none")


# --- DANSM: the flow, the matching, the inter-path metrics, the samplers ---


def rfm_loss(net, x, z, t):
    """DANSM Eq. 2 per sample [N]: ||(z - x) - v(x_t, t)||^2 at x_t = (1 - t) x + t z (Eq. 1)."""
    tb = t.reshape(-1, *[1] * (x.ndim - 1))
    return ((z - x) - net((1 - tb) * x + tb * z, t)).square().flatten(1).mean(1)


def dm_alpha_bar(device=None):  # Sec. 5.8: DDPM's linear beta schedule, 1e-4 to 0.02 over 1000 steps
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64, device=device), 0)


def dm_loss(net, x, z, t_index):
    """Sec. 5.8's epsilon prediction per sample [N]: ||z - eps(sqrt(ab) x + sqrt(1 - ab) z, t)||^2."""
    ab = dm_alpha_bar(x.device)[t_index].float().reshape(-1, *[1] * (x.ndim - 1))
    return (z - net(ab.sqrt() * x + (1 - ab).sqrt() * z, t_index.float())).square().flatten(1).mean(1)


def greedy_match(x, z, chunk=1024):
    """DANSM Alg. 1 -> perm: image i takes z[perm[i]], for each image in order the nearest noise not yet
    taken. Exact and vectorised: a chunk of images takes its argmins at once up to the first image whose
    noise an earlier one took; the rest retry. [chunk, n] distances at a time (memory)."""
    n, xf, zf = len(x), x.flatten(1), z.flatten(1)
    z2, used = zf.square().sum(1), torch.zeros(n, dtype=torch.bool, device=x.device)
    perm = torch.empty(n, dtype=torch.long, device=x.device)
    for lo in range(0, n, chunk):
        d = z2[None, :] - 2 * xf[lo : lo + chunk] @ zf.T  # ||x - z||^2 - ||x||^2: the same argmin per row
        rows = torch.arange(lo, min(lo + chunk, n), device=x.device)
        while len(rows):
            pick = d[rows - lo].masked_fill(used[None, :], math.inf).argmin(1)
            _, inverse = torch.unique(pick, return_inverse=True)
            pos = torch.arange(len(pick), device=x.device)
            first = torch.full_like(pos, len(pick)).scatter_reduce(0, inverse, pos, "amin")
            clash = pos[first[inverse] < pos]  # images whose noise an earlier image of this round took
            k = int(clash.min()) if len(clash) else len(pick)
            perm[rows[:k]], used[pick[:k]], rows = pick[:k], True, rows[k:]
    return perm


def hungarian_match(x, z):
    """Immiscible Diffusion's matcher (Sec. 5.6): scipy's optimal assignment (CPU, O(n^3)) for the public
    code's cost, the mean squared distance (hungarian_algo_manager.py)."""
    from scipy.optimize import linear_sum_assignment

    c = torch.cdist(x.flatten(1).double(), z.flatten(1).double()).square() / x[0].numel()
    return torch.as_tensor(linear_sum_assignment(c.cpu().numpy())[1], dtype=torch.long, device=x.device)


def match(x, z, matcher, chunk=1024):  # perm for a pool: image i trains with z[perm[i]]
    if matcher == "none":
        return torch.arange(len(x), device=x.device)
    return greedy_match(x, z, chunk) if matcher == "greedy" else hungarian_match(x, z)


def path_length(x, z):  # ||z_i - x_i|| per path [N], float64
    return (z.double() - x.double()).flatten(1).norm(dim=1)


def path_rows(x, z, rows, chunk=1024):
    """Per-path terms of Tables 2-3 for the paths `rows` of a set (x, z), each against all others: length,
    d_avg and t_avg (the mean inter-path distance and its t*), d_min and t_min (the nearest other path's, Sec.
    3.2's minimal distance). Eq. 3-5 from Gram matrices in float64 -> dict of float64 [len(rows)]."""
    xf, zf = x.flatten(1).double(), z.flatten(1).double()
    n, xx, zz, xz = len(xf), xf.square().sum(1), zf.square().sum(1), (xf * zf).sum(1)
    out = {k: [] for k in ("d_avg", "t_avg", "d_min", "t_min")}
    for lo in range(0, len(rows), chunk):
        r = rows[lo : lo + chunk].to(xf.device)
        vv = xx[r, None] + xx[None] - 2 * xf[r] @ xf.T  # |V|^2, V = x_j - x_i
        uu = zz[r, None] + zz[None] - 2 * zf[r] @ zf.T  # |U|^2, U = z_j - z_i
        vu = xz[None] - zf[r] @ xf.T - xf[r] @ zf.T + xz[r, None]  # V.U
        ww = (vv - 2 * vu + uu).clamp_min(0)  # Eq. 4: t* = V.(V - U) / |V - U|^2 in [0, 1]; U = V: 0
        t = torch.where(ww > 0, (vv - vu) / ww.clamp_min(1e-300), torch.zeros_like(ww)).clamp(0, 1)
        d = ((1 - t) ** 2 * vv + 2 * t * (1 - t) * vu + t**2 * uu).clamp_min(0).sqrt()  # Eq. 5
        me = torch.arange(len(r)), r
        d[me], t[me] = 0.0, 0.0
        out["d_avg"].append(d.sum(1) / (n - 1)), out["t_avg"].append(t.sum(1) / (n - 1))
        d[me] = math.inf
        k = d.argmin(1)[:, None]
        out["d_min"].append(d.gather(1, k)[:, 0]), out["t_min"].append(t.gather(1, k)[:, 0])
    r = rows.to(xf.device)
    return dict(length=path_length(x[r], z[r]), **{k: torch.cat(v) for k, v in out.items()})


@torch.no_grad()
def euler_sample(net, z, steps, t_min=0.0):
    """RFM: x <- x - h v(x, t_i), h = 1 / steps, on the public code's grid (rectified_flow_sampling.py:
    s_i = t_min + i (1 - t_min) / steps at s = 1 - t), from t = 1 - t_min towards 0."""
    x, h = z, 1.0 / steps
    for i in range(steps):
        x = x - h * net(x, 1 - t_min - i * h * (1 - t_min))
    return x


def ddim_timesteps(steps):
    """The public code's DDIM timesteps (framework_ddim/diffusion_sampling.py, as ermongroup's DDIM):
    reversed(range(0, 1000, 1000 // steps)); one more than asked where 1000 % steps (3: 999, 666, 333, 0)."""
    return list(reversed(range(0, 1000, 1000 // steps)))


@torch.no_grad()
def ddim_sample(net, z, steps):
    """DM: deterministic DDIM (eta = 0), ending at alpha_bar = 1 (the public code's after its last step)."""
    ab, x, ts = dm_alpha_bar(z.device), z, torch.tensor(ddim_timesteps(steps), device=z.device)
    for j, t in enumerate(ts):
        eps = net(x, t.float())
        x0 = (x - (1 - ab[t]).sqrt() * eps) / ab[t].sqrt()
        a_next = ab[ts[j + 1]] if j + 1 < len(ts) else torch.ones((), dtype=ab.dtype, device=z.device)
        x = (a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps).float()
    return x


# --- the interface of every method file ---


class FlowNet(nn.Module):
    """The UNet as v(x_t, t) (rfm: predicts z - x, sees time_scale t; t_min: its sampling grid's) or
    eps(x_t, t) (dm: predicts z, sees the integer timestep). Unconditional, as the paper's runs (label_dim:
    0; older checkpoints store it)."""

    def __init__(self, img_resolution, img_channels, label_dim=0, objective="rfm", time_scale=1000.0,
                 t_min=0.0, arch="ddpmpp", **unet):  # fmt: skip
        super().__init__()
        self.img_resolution, self.img_channels, self.objective = img_resolution, img_channels, objective
        self.time_scale, self.t_min = time_scale, t_min
        self.model = make_unet(arch, img_resolution, img_channels, img_channels, **unet)

    def forward(self, x, t, class_labels=None):  # class_labels: the interface's; always None here
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        return self.model(x.float(), self.time_scale * t).float()


def build_net(net_kwargs):
    return FlowNet(**net_kwargs)


def sample(net, noise, nfe, labels=None):
    """noise [N, C, H, W] standard normal -> (images, true NFE): rfm: nfe Euler steps on the net's grid; dm:
    DDIM on the public code's timesteps for nfe steps (ddim_timesteps: maybe one more)."""
    if nfe < 1:
        raise ValueError(f"need at least one step, got NFE {nfe}")
    if getattr(net, "objective", "rfm") == "dm":
        return ddim_sample(net, noise, nfe), len(ddim_timesteps(nfe))
    return euler_sample(net, noise, nfe, getattr(net, "t_min", 0.0)), nfe


def ode_start(net, noise):  # x at t = 0 of the common clock (noise at 0): the noise itself
    return noise


def ode_velocity(net, x, t, labels=None):  # dx/dt on the common clock (0 noise, 1 data): -v(x, 1 - t)
    if getattr(net, "objective", "rfm") == "dm":
        raise ValueError("ode_velocity is defined for the rfm objective only")
    return -net(x, 1 - torch.as_tensor(t, dtype=torch.float32, device=x.device))


def noise_for_seeds(seeds, shape):  # image i's noise from a generator seeded with seeds[i]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def generator_for(seed, *keys):  # a CPU generator from (seed, keys) alone: the same on any rank and device
    s = np.random.SeedSequence([seed, *keys]).generate_state(2)
    return torch.Generator().manual_seed(int(s[0]) << 32 | int(s[1]))


# --- data and checkpoints ---


def fail(msg):
    raise SystemExit(f"error: {msg}")  # one line for the user, exit code 1, no traceback


def why(e):  # an exception's first line, for fail()
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def make_shapes(n=4096, res=16, seed=0):
    """The smoke-test set: a disc or a square of random colour, size and place -> uint8 [n, res, res, 3]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
    cy, cx = (rng.uniform(0.25, 0.75, (2, n, 1, 1)) * res).astype(np.float32)
    r = rng.uniform(0.12, 0.3, (n, 1, 1)).astype(np.float32) * res
    kind, fg, bg = rng.integers(0, 2, n), *rng.integers(0, 256, (2, n, 1, 1, 3))
    disc, square = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2, np.maximum(abs(yy - cy), abs(xx - cx)) <= r
    return np.where(np.where(kind[:, None, None] == 0, disc, square)[..., None], fg, bg).astype(np.uint8)


def data_meta(spec):  # tools/prepare_data.py's FILE.json beside FILE.npy ({"kind": "latents", ...}), or {}
    with contextlib.suppress(OSError, ValueError):
        return dict(json.load(open(spec[:-4] + ".json"))) if spec.endswith(".npy") else {}
    return {}


def load_data(spec, data_dir="datasets"):
    """--data cifar10 | shapes | FILE.npy (tools/prepare_data.py's, memory-mapped: RSS O(batch)) | FILE.npz
    ('images') -> uint8 [N, H, W, C] (latents: float [N, C, H, W]). Labels are not read (unconditional)."""
    if spec == "cifar10":
        import torchvision

        try:
            images = torchvision.datasets.CIFAR10(root=data_dir, train=True, download=True).data
        except Exception as e:
            fail(f"CIFAR-10 is not in {data_dir}/ and cannot be downloaded ({type(e).__name__}): put "
                 f"cifar-10-python.tar.gz in {data_dir}/")  # fmt: skip
    elif spec == "shapes":
        images = make_shapes()
    elif spec.endswith((".npy", ".npz")) and os.path.isfile(spec):
        try:  # truncated, or an .npy header promising more rows than the file holds: one line
            if spec.endswith(".npy"):
                images = np.load(spec, mmap_mode="r")
            else:
                with np.load(spec) as f:
                    images = f["images"]
        except (ValueError, KeyError, OSError, EOFError, zipfile.BadZipFile) as e:
            fail(f"cannot read {spec} ({why(e)}): expected uint8 images [N, H, W, C] (.npz: 'images')")
    else:
        fail(f"--data {spec!r} not found: use cifar10, shapes, an .npy of tools/prepare_data.py or an .npz")
    n, *hwc = images.shape
    if data_meta(spec).get("kind") == "latents":  # tools/prepare_data.py --vae
        if images.dtype not in (np.float16, np.float32) or len(hwc) != 3 or hwc[1] != hwc[2] or not n:
            fail(f"{spec}: latents must be float [N, C, H, H]; got {images.dtype} {images.shape}")
    elif images.dtype != np.uint8 or len(hwc) != 3 or hwc[2] not in (1, 3) or hwc[0] != hwc[1] or not n:
        fail(f"{spec}: images must be square uint8 [N, H, W, C], C 1 or 3; got {images.dtype} {images.shape}")
    return images


def get_batch(images, idx, device):
    """Data index i >= N is the mirror image of i - N (--xflip copies) -> floats in [-1, 1] (latents as they
    are). A memory-mapped array is read row by row (pread): mapped pages would stay resident."""
    i, row, latent = (idx % len(images)).numpy(), images[0].nbytes, images.dtype != np.uint8
    if isinstance(images, np.memmap):
        with open(images.filename, "rb") as f:
            x = b"".join(os.pread(f.fileno(), row, images.offset + int(j) * row) for j in i)
        x = np.frombuffer(x, images.dtype).reshape(len(i), *images.shape[1:])
    else:
        x = images[i]
    y = torch.from_numpy(np.array(x if latent else x.transpose(0, 3, 1, 2), order="C")).to(device).float()
    y = y if latent else y / 127.5 - 1
    return torch.where((idx >= len(images)).to(device)[:, None, None, None], y.flip(3), y)


def load_checkpoint(path, resume=False):
    """One of our checkpoints (a run folder: its latest.pt), CRC and zip structure checked, loaded without
    executing code -> the entries this file reads (to resume: the optimizer and run state too)."""
    path = os.path.join(path, "latest.pt") if os.path.isdir(path) else path
    try:  # a flipped "directory" bit passes the CRC check but loads uninitialised memory: refuse it too
        with zipfile.ZipFile(path) as z:
            dirs = [i.filename for i in z.infolist() if i.is_dir() or i.external_attr & 0x10]
            bad = z.testzip() or next(iter(dirs), None)
        ckpt = {} if bad else torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, cut off or foreign: never unpickled unsafely
        fail(f"cannot read {path} as a weights-only checkpoint: {why(e)}")
    if bad:
        fail(f"{path} is corrupt: its member {bad} is damaged; resume from an intact ckpt-*.pt beside it")
    keys = ("method", "version", "net_kwargs", "net", "ema", "step") + (("opt", "state") if resume else ())
    if not isinstance(ckpt, dict) or ckpt.get("method") != METHOD:
        fail(f"{path} is not a {METHOD}.py checkpoint (a dict with method {METHOD!r})")
    if missing := [k for k in keys if k not in ckpt or k == "net_kwargs" and not isinstance(ckpt[k], dict)]:
        fail(f"{path} lacks {', '.join(missing)}")
    if not isinstance(ckpt["version"], int) or ckpt["version"] > VERSION:
        fail(f"{path} is a version {ckpt['version']} checkpoint; this file reads versions <= {VERSION}")
    return {k: ckpt[k] for k in (*keys, "data") if k in ckpt}


def restore(ckpt, path):  # a checkpoint's EMA network for sampling; one line if it does not build or load
    try:
        net = build_net(ckpt["net_kwargs"])
        net.load_state_dict(ckpt["ema"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        fail(f"{path}: its network does not build or load ({why(e)})")
    return net.eval().requires_grad_(False)


def claim_outdir(outdir, ckpt, src, overwrite, _held={}):  # noqa: B006 (locks held for the process's life)
    """Rank 0: lock --outdir (a second job stops at once); write over a run only when resuming it (src: the
    checkpoint's folder) or with --overwrite; remove our temporary files; on resume cut log.jsonl back."""
    os.makedirs(outdir, exist_ok=True)
    if (lock := os.path.abspath(os.path.join(outdir, ".lock"))) not in _held:
        f = _held[lock] = open(lock, "a+")  # noqa: SIM115
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0), _held.pop(lock)
            fail(f"{outdir} is locked by a running job ({f.read()}); wait for it or use another --outdir")
        f.truncate(0), f.write(f"pid {os.getpid()} on {os.uname().nodename}"), f.flush()
    runs = sorted(n for n in os.listdir(outdir) if re.fullmatch(r"ckpt-\d+\.pt", n))
    new = ckpt is None or src != os.path.realpath(outdir)  # a new run, or one resumed from another folder
    if runs and new and not overwrite:
        how = f"resume {src} into its own folder" if ckpt else f"continue it with --resume {outdir}"
        fail(f"{outdir} holds another run (step {int(runs[-1][5:-3])}); {how} or pass --overwrite")
    for name in os.listdir(outdir):  # only names this file writes: never a user's notes.tmp2024
        if re.fullmatch(r"(ckpt-\d+\.pt|log\.jsonl)\.tmp\d*|latest\.tmp", name) or (
                new and (name in runs or name in ("latest.pt", "log.jsonl"))):  # fmt: skip
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


# --- training: the public code's RFM loop on the stream of matched pools, nanoGPT-style ---


def train(args):
    ddp, cuda = "RANK" in os.environ, torch.cuda.is_available()  # under torchrun: one process per GPU or CPU
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if ddp:
        torch.cuda.set_device(device) if cuda else None
        torch.distributed.init_process_group("nccl" if cuda else "gloo")
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if ddp else (0, 1)
    batch_rank = args.batch // world
    batch_gpu = args.batch_gpu or batch_rank
    if args.batch % world or batch_rank % batch_gpu:
        fail(f"--batch {args.batch} (global) must split into {world} processes and chunks of --batch-gpu")
    ckpt = load_checkpoint(args.resume, resume=True) if args.resume else None
    images, meta = load_data(args.data, args.data_dir), data_meta(args.data)
    latent = meta.get("kind") == "latents"  # tools/prepare_data.py --vae: [N, C, H, W] floats
    res, C = (images.shape[2], images.shape[1]) if latent else (images.shape[1], images.shape[3])
    if res % 2 ** (len(args.channel_mult) - 1):
        fail(f"image size {res} is not divisible by 2^(levels - 1) of --channel-mult {args.channel_mult}")
    rfm = args.objective == "rfm"
    net_kwargs = ckpt["net_kwargs"] if ckpt else dict(
        img_resolution=res, img_channels=C, objective=args.objective, arch=args.arch,
        time_scale=args.time_scale if rfm else 1.0, t_min=args.t_min if rfm else 0.0, dropout=args.dropout,
        model_channels=args.model_channels, channel_mult=args.channel_mult, num_blocks=args.num_blocks,
        attn_resolutions=args.attn_res)  # fmt: skip
    if [net_kwargs.get("img_resolution"), net_kwargs.get("img_channels")] != [res, C]:
        fail(f"--resume {args.resume} was trained on other data: resume it with the data it had")
    rfm, t_min = net_kwargs.get("objective", "rfm") == "rfm", net_kwargs.get("t_min", 0.0)  # the run's recipe
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    try:
        net = build_net(net_kwargs).to(device).train()
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = torch.optim.Adam(net.parameters(), args.lr)  # torch's default Adam, as the public code
        step = nimg = 0
        if ckpt is not None:
            for m, k in ((net, "net"), (ema, "ema"), (opt, "opt")):
                m.load_state_dict(ckpt[k])
            step, nimg = ckpt["step"], ckpt["state"]["nimg"]
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        fail(f"--resume {args.resume}: the network or state does not load ({why(e)})")
    n_data = len(images) * (2 if args.xflip == "copies" else 1)
    ms = args.batch if args.matcher == "none" else args.match_size  # plain RFM: pools of one batch
    if rank == 0:
        r = args.resume and os.path.realpath(args.resume)  # the run folder, or the checkpoint's
        src = r and (r if os.path.isdir(r) else os.path.dirname(r))
        claim_outdir(args.outdir, ckpt, src, args.overwrite)
        n_par = sum(p.numel() for p in net.parameters())
        print(f"{n_data} data indices, {n_par} parameters, {world} process(es) on {device}, from step "
              f"{step}; matcher {args.matcher}, pools of {ms}", flush=True)  # fmt: skip
        if ckpt and ckpt["state"].get("world", world) != world:  # dropout is seeded from (seed, rank, world)
            print(f"note: saved with {ckpt['state']['world']} process(es), resumed with {world}: the per-rank"
                  " dropout masks change from here on; the data order, pools and t do not")  # fmt: skip
    torch.backends.cudnn.benchmark = True  # full fp32 unless --precision tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    model = torch.compile(net) if args.compile else net  # what is called; net and ema are what is stored
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, [device] if device.type == "cuda" else None)
    stop = []  # SIGINT/SIGTERM: a checkpoint at the end of the step, then exit 128 + signal (a requeue)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda signum, frame: stop.append(signum))
    pools, total_steps = {}, math.ceil(args.duration * 1e6 / args.batch)
    grid_noise = noise_for_seeds(range(args.grid), (C, res, res)) if args.grid and not latent else None
    sums, t_log, step_log = torch.zeros(4, dtype=torch.float64), time.time(), step
    while step < total_steps:
        s0, s1 = np.random.SeedSequence([args.seed * world + rank, step]).generate_state(2)
        torch.manual_seed(int(s0) << 32 | int(s1))  # dropout from (seed, rank, step): no RNG state to store
        lo, hi, got = step * args.batch, (step + 1) * args.batch, []  # the global batch's stream positions
        for p in range(lo // ms, (hi - 1) // ms + 1):  # Alg. 1 on pool p: ms images and noises, (seed, p)
            if p not in pools:
                x = get_batch(images, batch_indices(n_data, ms, p, args.seed), device)
                z = torch.randn([ms, C, res, res], generator=generator_for(args.seed, p, 1)).to(device)
                perm, t_match = torch.empty(ms, dtype=torch.long, device=device), time.time()
                if rank == 0:
                    perm = match(x, z, args.matcher)
                torch.distributed.broadcast(perm, 0) if ddp else None  # rank 0's matching for everyone
                pools = {q: v for q, v in pools.items() if q >= p - 1}
                lengths = [path_length(x, z).mean().item(), path_length(x, z[perm]).mean().item()]
                pools[p] = (x, z[perm], *lengths, time.time() - t_match)  # image i gets z[perm[i]]
            got.append((pools[p], slice(max(lo - p * ms, 0), min(hi - p * ms, ms))))
        mine = slice(rank * batch_rank, (rank + 1) * batch_rank)
        x, z = (torch.cat([q[k][s] for q, s in got])[mine] for k in (0, 1))
        g = generator_for(args.seed, step, 3)  # t of the global batch: independent of the world size
        if rfm:  # the public code's t ~ U[t_min, 1) on its clock s = 1 - t
            t = ((1 - t_min) * torch.rand(args.batch, generator=g))[mine].to(device)
        else:
            t = torch.randint(1000, (args.batch,), generator=g)[mine].to(device)
        lr = args.lr * min(1.0, (nimg + args.batch) / (args.lr_rampup * 1e6)) if args.lr_rampup else args.lr
        for group in opt.param_groups:  # linear lr ramp-up over --lr-rampup Mimg (the public code: none)
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        loss_sum = 0.0
        for j, c in enumerate(chunks := range(0, batch_rank, batch_gpu)):  # --batch-gpu per forward pass
            sync = contextlib.nullcontext() if j == len(chunks) - 1 or not ddp else model.no_sync()
            with sync, torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
                sl = slice(c, c + batch_gpu)
                loss = (rfm_loss if rfm else dm_loss)(model, x[sl], z[sl], t[sl]).mean()  # Eq. 2
                (loss * batch_gpu / batch_rank).backward()
            loss_sum += loss.item() * batch_gpu / batch_rank
        if args.grad_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip)
        opt.step()
        beta = min(args.ema_decay, (2 + step) / (11 + step) if args.ema_warmup else 1)  # score-sde's warm-up
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
                p_ema.copy_(p.detach().lerp(p_ema, beta))
            for b_ema, b in zip(ema.buffers(), net.buffers(), strict=True):
                b_ema.copy_(b)
        nimg, step = nimg + args.batch, step + 1
        match_s = sum(q[4] * (s.stop - s.start) / ms for q, s in got)  # a pool's seconds shared by its rows
        lengths = [sum(q[i] for q, _ in got) / len(got) for i in (2, 3)]  # before and after matching
        sums += torch.tensor([loss_sum, *lengths, match_s], dtype=torch.float64)
        flags = torch.tensor([float(bool(stop)), float(not math.isfinite(loss_sum))], device=device)
        torch.distributed.all_reduce(flags) if ddp else None  # every rank stops together
        if flags[1]:
            fail(f"non-finite loss at step {step}: stopped before a checkpoint; lower --lr or check the data")
        done, stopping = step >= total_steps, bool(flags[0])
        if step % args.log_every == 0 or done or stopping:
            mean = (sums / (step - step_log) / world).to(device)
            torch.distributed.all_reduce(mean) if ddp else None
            rec = dict(zip(("loss", "len_before", "len_after", "match_s"), mean.tolist(), strict=True))
            rec |= dict(kimg=nimg / 1000, sec_per_step=(time.time() - t_log) / (step - step_log))
            if rank == 0:
                print(f"step={step}/{total_steps}", *(f"{k}={v:.5g}" for k, v in rec.items()), flush=True)
                rec = dict(step=step, **rec)
                with open(os.path.join(args.outdir, "log.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
            sums, t_log, step_log = sums.zero_(), time.time(), step
        if not (step % args.snap_every == 0 or done or stopping):
            continue
        if not all(v.isfinite().all() for v in [*net.state_dict().values(), *ema.state_dict().values()]):
            fail(f"non-finite weights at step {step}: not saved; the newest checkpoint is the last good one")
        if rank == 0:  # pools are rebuilt from their seeds on resume
            ckpt = dict(method=METHOD, version=VERSION, args=vars(args), net_kwargs=net_kwargs, step=step,
                        net=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), kimg=nimg / 1000,
                        state=dict(nimg=nimg, world=world), data=meta)  # fmt: skip
            atomic_save(ckpt, os.path.join(args.outdir, name := f"ckpt-{step:07d}.pt"))
            os.symlink(name, os.path.join(args.outdir, "latest.tmp"))
            os.replace(os.path.join(args.outdir, "latest.tmp"), os.path.join(args.outdir, "latest.pt"))
            if grid_noise is not None:  # EMA samples of the grid seeds
                x = (sample(ema, grid_noise.to(device), args.nfe)[0].cpu() + 1) / 2
                path, nrow = os.path.join(args.outdir, f"grid-{step:07d}.png"), math.ceil(math.sqrt(len(x)))
                save_image(x, path, nrow=nrow, padding=0)
        if stopping:
            print(f"stopped by signal at step {step}: resume with --resume {args.outdir}", flush=True)
            break
    if ddp:
        torch.distributed.barrier(), torch.distributed.destroy_process_group()
    if stop:
        raise SystemExit(128 + stop[0])


# --- the report (Tables 2 and 3) and generation ---


def report_set(images, n_data, size, matcher, keep, seed, device):
    """Table 2's paths for one match-size: pools of `size` consecutive positions of the epoch stream matched
    as in training, as many as cover every data index (a pool larger than the data spans several epochs, as
    the public code's pool of noises outlives an epoch). Each data index of `keep` then takes one of its
    occurrences uniformly, so no index appears twice and no position of a greedy pool is favoured.
    -> (x, z) in the order of `keep`, number of pools."""
    n_pools = math.ceil(n_data / size)
    idx = torch.cat([batch_indices(n_data, size, p, seed) for p in range(n_pools)])
    order = torch.randperm(len(idx), generator=generator_for(seed, size, 4))
    first = torch.full((n_data,), len(idx), dtype=torch.long)
    chosen = order[first.scatter_reduce_(0, idx[order], torch.arange(len(idx)), "amin")[keep]]
    x = get_batch(images, keep, device)
    z = torch.empty_like(x)
    for p in range(n_pools):
        if len(mine := torch.nonzero((chosen >= p * size) & (chosen < (p + 1) * size)).flatten()):
            xp = get_batch(images, idx[p * size : (p + 1) * size], device)
            zp = torch.randn([size, *x.shape[1:]], generator=generator_for(seed, p, 1)).to(device)
            z[mine.to(device)] = zp[match(xp, zp, matcher)][(chosen[mine] - p * size).to(device)]
    return x, z, n_pools


def summarize(per_path, n_ref):
    """Means of P sampled paths' terms (of a set of n_ref) with a standard error: s / sqrt(P) for the length;
    s sqrt(1/P + 3/n_ref) for the pair statistics (a U-statistic over the set plus the sampling of P rows),
    which is conservative by about 1.6-1.9x for d_min and t*_min."""
    out = {}
    for k, v in per_path.items():
        s = v.std().item() if len(v) > 1 else 0.0
        out[k], out[k + "_se"] = v.mean().item(), s * math.sqrt(1 / len(v) + (k != "length") * 3 / n_ref)
    return out


@torch.no_grad()
def report(args):
    """Table 2 (random paths and each match-size), with --ckpt Table 3's preferable paths (each image's noise
    by Euler on the model's ODE from t = 0 to 1). Every row is a set of --ref-paths paths (default: one per
    data index), the same in every row, its metrics averaged over --paths of them, each against the set."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    images = load_data(args.data, args.data_dir)
    n_data = len(images) * (2 if args.xflip == "copies" else 1)
    if args.ref_paths > n_data:
        fail(f"--ref-paths {args.ref_paths} exceeds the {n_data} data indices of {args.data}")
    n_ref, g = args.ref_paths or n_data, generator_for(args.seed, 5)
    keep = torch.randperm(n_data, generator=g)[:n_ref].sort().values  # the data indices of every row
    sampled, rows = torch.randperm(n_ref, generator=g)[: min(args.paths, n_ref)].sort().values, []
    for ms in [0, *args.match_sizes]:  # 0: random pairs (the RFM baseline), one pool of the whole data
        size, matcher = (ms, "greedy") if ms else (n_data, "none")
        x, z, n_pools = report_set(images, n_data, size, matcher, keep, args.seed, device)
        rows.append(dict(paths=f"ms {ms}" if ms else "random", pools=n_pools, pool_size=size,
                         **summarize(path_rows(x, z, sampled), n_ref)))  # fmt: skip
    if args.ckpt:
        net, x = restore(load_checkpoint(args.ckpt), args.ckpt).to(device), get_batch(images, keep, device)
        if net.objective != "rfm" or [net.img_channels, net.img_resolution] != list(x.shape[1:3]):
            fail(f"--ckpt {args.ckpt}: preferable paths need an rfm checkpoint trained on data like --data's")
        z, h = x.clone(), 1.0 / args.invert_steps
        for i in range(args.invert_steps):  # each image's noise by the model: Euler from t = 0 up to 1
            z = torch.cat([zj + h * net(zj, i * h) for zj in z.split(256)])
        stats = summarize(path_rows(x, z, sampled), n_ref)
        rows.append(dict(paths="preferable", pools=0, pool_size=0, **stats))
    flips = " (with x-flips)" if n_data > len(images) else ""
    print(f"{args.data}: {n_data} data indices{flips}; each row is a set of {n_ref} paths (one per data "
          f"index), its metrics averaged over {len(sampled)} of them, each against all {n_ref}; +- one "
          "standard error (d_min falls as the set grows)")  # fmt: skip
    keys = ("length", "d_avg", "t_avg", "d_min", "t_min")
    print(f"{'paths':>12} {'pools':>13} " + " ".join(f"{k.replace('t_', 't*_'):>16}" for k in keys))
    for r in rows:
        pools = f"{r['pools']} x {r['pool_size']}" if r["pools"] else "-"
        cells = [f"{r[k]:8.4f} +-{r[k + '_se']:<6.2g}" for k in keys]
        print(f"{r['paths']:>12} {pools:>13} " + " ".join(cells))
    return rows


@torch.no_grad()
def generate(args):
    """--generate N: the images of seeds --seed ... --seed + N - 1 from --ckpt's EMA, one process -> an .npz
    ('images' uint8 NHWC, 'seeds'; latent data: 'latents' and the decoded images) written atomically and a
    PNG grid of the first 64 beside it."""
    from tqdm import tqdm

    out, png = args.out, os.path.splitext(args.out)[0] + ".png"
    with open(f"{out}.lock", "a+") as lock:  # one job per --out
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fail(f"{out} is being written by another job; wait for it or choose another --out")
        if (old := [f for f in (out, png) if os.path.exists(f)]) and not args.overwrite:
            fail(f"{' and '.join(old)} exist; pass --overwrite to replace them")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        net = restore(ckpt := load_checkpoint(args.ckpt), args.ckpt).to(device)
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
        model, meta = torch.compile(net) if args.compile else net, ckpt.get("data", {})
        vae = load_vae(meta["vae"]).to(device) if meta.get("kind") == "latents" else None  # latents' own VAE
        seeds, shape, xs, zs = range(args.seed, args.seed + args.generate), (net.img_channels,), [], []
        for i in tqdm(range(0, len(seeds), args.gen_batch), unit="batch"):
            noise = noise_for_seeds(seeds[i : i + args.gen_batch], shape + (net.img_resolution,) * 2)
            with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
                x, nfe = sample(model, noise.to(device), args.nfe)
            if not torch.isfinite(x).all():
                fail(f"{args.ckpt} gives non-finite samples (broken weights): nothing written")
            if vae is not None:  # tools/prepare_data.py stored the VAE's latents times "scale"
                zs.append(x.cpu())
                x = vae.decode(x / meta["scale"]).sample.float()
            xs.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
        arrays = dict(images=torch.cat(xs).numpy(), seeds=np.array(seeds))
        with open(f"{out}.tmp{os.getpid()}", "wb") as f:
            np.savez(f, **arrays, **({"latents": torch.cat(zs).numpy()} if zs else {}))
        os.replace(f"{out}.tmp{os.getpid()}", out)
        grid = torch.from_numpy(arrays["images"][:64]).permute(0, 3, 1, 2).float() / 255
        save_image(grid, png, nrow=math.ceil(math.sqrt(len(grid))), padding=0)
        print(f"wrote {len(seeds)} images to {out} (NFE {nfe} per image)")


def load_vae(name):  # tools/prepare_data.py's diffusers AutoencoderKL: a folder or a model id (HF cache)
    from diffusers import AutoencoderKL
    from huggingface_hub.constants import HF_HUB_CACHE

    try:
        return AutoencoderKL.from_pretrained(name, local_files_only=not os.path.isdir(name)).eval()
    except Exception as e:  # missing, unreadable or not a VAE: one line with the reason
        fail(f"cannot load the VAE {name} of this checkpoint's latents ({type(e).__name__}): put its "
             f"diffusers files at {name} or in {HF_HUB_CACHE}/models--{name.replace('/', '--')}")  # fmt: skip


# --- command line ---


def number(cast, lo, hi=math.inf, lo_open=False):  # argparse type: a finite number in range
    def parse(s):
        v = cast(s)
        if not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi):
            raise argparse.ArgumentTypeError(f"{s} is not in {'(' if lo_open else '['}{lo}, {hi}]")
        return v

    return parse


def ints(s):  # argparse type: a non-empty list of positive integers, e.g. 1,2,2,2
    return [number(int, 1)(v) for v in s.split(",")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="DANSM (see the docstring)", allow_abbrev=False,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add, n0, n1, below1 = p.add_argument, number(int, 0), number(int, 1), number(float, 0, 1 - 1e-12)
    pos = number(float, 0, lo_open=True)
    add("--data", help="cifar10 | shapes (synthetic) | FILE.npy (tools/prepare_data.py) | FILE.npz")
    add("--data-dir", default="datasets", help="where --data cifar10 is looked for / downloaded")
    add("--outdir", default="runs/dansm", help="checkpoints, grids, log.jsonl")
    add("--xflip", choices=["off", "copies"], help="mirror images as data indices (copies; latents: off)")
    add("--objective", default="rfm", choices=["rfm", "dm"], help="rectified flow | Sec. 5.8's DM (Table 4)")
    add("--matcher", default="greedy", choices=MATCHERS, help="Alg. 1 | Immiscible's (MSE cost) | plain RFM")
    add("--match-size", type=n1, default=10000, help="images (and noises) per matched pool (Table 1: 10,000)")
    add("--batch", type=number(int, 1, 2**20), default=250, help="global batch per step (the paper: 250)")
    add("--batch-gpu", type=n1, help="images per forward pass (accumulating to the per-process batch)")
    add("--lr", type=pos, default=1e-4, help="Adam learning rate (public code: 1e-4, constant)")
    add("--lr-rampup", type=number(float, 0), default=0, help="linear lr warm-up, Mimg (public code: none)")
    add("--grad-clip", type=number(float, 0), default=1.0, help="gradient-norm clip (public: 1; 0: off)")
    add("--ema-decay", type=number(float, 0, 1), default=0.9999, help="EMA decay per step (public: 0.9999)")
    add("--ema-warmup", action=argparse.BooleanOptionalAction, default=True, help="score-sde's EMA warm-up")
    add("--duration", type=pos, default=25, help="training length, Mimg (Table 1: 500 epochs = 25 Mimg)")
    add("--t-min", type=below1, default=1e-3, help="t ~ U[0, 1 - t_min) and its Euler grid (public: 1e-3)")
    add("--time-scale", type=pos, default=999, help="the network sees time-scale * t (public code: 999)")
    add("--arch", default="ddpmpp", choices=["ddpmpp", "ncsnpp", "adm", "adm-cfm"], help="the UNet")
    add("--model-channels", type=n1, default=128, help="UNet base width (public: 128)")
    add("--channel-mult", type=ints, default=[1, 2, 2, 2], help="width per resolution (public: 1,2,2,2)")
    add("--num-blocks", type=n1, default=4, help="residual blocks per resolution (public: 4)")
    add("--attn-res", type=ints, default=[16], help="self-attention resolutions (public: 16)")
    add("--dropout", type=below1, default=0.15, help="dropout (public CIFAR-10 RFM config: 0.15)")
    add("--tiny", action="store_true", help="a tiny UNet for CPU smoke runs")
    add("--seed", type=number(int, 0, 2**63 - 1), default=0, help="all draws; --generate's first seed")
    add("--log-every", type=n1, default=100, help="steps between log lines")
    add("--snap-every", type=n1, default=5000, help="steps between checkpoints and image grids")
    add("--grid", type=n0, default=64, help="images in each snapshot grid (seeds 0..N-1); 0: none")
    add("--resume", help="run folder (its latest.pt) or checkpoint to continue")
    add("--overwrite", action="store_true", help="replace a run in --outdir or an existing --out")
    add("--report", action="store_true", help="print Table 2 (and 3 with --ckpt) for --data")
    add("--match-sizes", type=ints, default=[10, 100, 1000, 10000], help="--report: its match-sizes")
    add("--paths", type=n1, default=2000, help="--report: paths sampled per row (each against the set)")
    add("--ref-paths", type=n0, default=0, help="--report: paths per row's set (0: one per data index)")
    add("--invert-steps", type=n1, default=100, help="--report --ckpt: Euler steps from data to noise")
    add("--generate", type=n0, default=0, metavar="N", help="generate N images from --ckpt (one process)")
    add("--ckpt", help="--generate, --report: a checkpoint of this file, or its run folder")
    add("--out", default="samples.npz", help="--generate's .npz (a .png grid beside it)")
    add("--nfe", type=n1, default=10, help="network evaluations per image, grids too (Euler; dm: DDIM)")
    add("--gen-batch", type=n1, default=256, help="images per sampling batch")
    add("--precision", default="fp32", choices=["fp32", "tf32", "bf16"], help="fp32 (the paper's) | TF32")
    add("--compile", action="store_true", help="torch.compile the network")
    args = p.parse_args(argv)
    if not (args.ckpt if args.generate else args.data):
        p.error("--generate N needs --ckpt" if args.generate else "--data is needed to train or --report")
    if args.xflip is None:  # latents (tools/prepare_data.py --vae) are mirrored only if asked
        args.xflip = "off" if data_meta(args.data or "").get("kind") == "latents" else "copies"
    if args.tiny:
        args.model_channels, args.channel_mult, args.num_blocks, args.attn_res = 16, [1, 2], 1, [8]
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.report:
            return report(args)
        generate(args) if args.generate else train(args)
    except OSError as e:  # a full disk, a read-only folder, a name too long: one line
        fail(f"{e.filename or (args.out if args.generate else args.outdir)}: {e.strerror or e}")
    except KeyboardInterrupt:  # Ctrl-C during --generate or --report (training saves and exits itself)
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

"""LOOM-CFM: Looking Out Of Minibatch conditional flow matching (Davtyan et al., ICLR 2025).

Minibatch OT pairs each image with the best noise in its minibatch and forgets it; LOOM-CFM keeps it. Every
image holds `--caches K` noises (one drawn per visit, Sec. 3.2); the assignment tau permutes noise ids over
the n_data x K slots. Each step solves its minibatch's assignment (Eq. 9), writes it back (Eq. 10) and takes
the CFM step (Eq. 3) on the new pairs: the total cost never increases (Theorem 1). Unconditional, as LOOM.

Convention: x_t = t x1 + (1 - t) x0 + sigma eps, t = 0 the noise x0 ~ N(0, I), t = 1 the image x1 in [-1, 1];
t fed to the net as is; cost ||x - z|| (both as the official code; Sec. 3.1 squares it: --cost sqeuclidean).
Commands (every Table 1 row: docs/loom_cfm.md): a CPU smoke run; "LOOM-CFM, 4 caches"; 50,000 images:
    python loom_cfm.py --data shapes --tiny --batch 64 --duration 0.02 --outdir runs/loom-shapes
    torchrun --standalone --nproc_per_node=4 loom_cfm.py --data cifar10 --xflip random --outdir runs/loom
    python loom_cfm.py --generate 50000 --ckpt runs/loom --solver midpoint --nfe 8 --out loom8.npz
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
import torchdiffeq
import torchvision
import tqdm
from scipy.optimize import linear_sum_assignment
from torch import nn

METHOD = "loom_cfm"  # equals the file name
VERSION = 1


# --- LOOM-CFM: the CFM path and loss (Eq. 3), the velocity net, the cost, the assignment (Alg. 1) ---


def cfm_loss(net, x0, x1, t, sigma_min=0.0, eps=None):
    """LOOM Eq. 3 per sample [N] (x1 data, x0 noise): the network at x_t = t x1 + (1 - t) x0 + sigma_min eps
    regresses the path's constant velocity x1 - x0."""
    tb = t.reshape(-1, *[1] * (x1.ndim - 1))  # any data shape (images, toy2d's vectors)
    xt = tb * x1 + (1 - tb) * x0
    if sigma_min:
        xt = xt + sigma_min * eps
    return (net(xt, t) - (x1 - x0)).square().flatten(1).mean(1)


class VelocityNet(nn.Module):  # v_theta(x, t) -> dx/dt, t in [0, 1]: the UNet of `arch` on (x, time_scale t)
    def __init__(self, img_resolution, img_channels, label_dim=0, time_scale=1000.0, arch="ddpmpp", **unet):
        super().__init__()
        self.time_scale = time_scale
        self.model = make_unet(arch, img_resolution, img_channels, img_channels, label_dim=label_dim, **unet)

    def forward(self, x, t, class_labels=None):
        t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        return self.model(x.float(), self.time_scale * t).float()


def pair_cost(x0, x1, cost="l2"):
    """LOOM Eq. 7's c: C[j, i] = ||x1_j - x0_i|| (l2: App. B, the official code) or its square (sqeuclidean:
    Sec. 3.1), float64 [n1, n0], rows images, columns noises."""
    c = torch.cdist(x1.flatten(1).double(), x0.flatten(1).double())
    return c if cost == "l2" else c.square()


def path_cost(x0, x1, cost="l2"):  # c(x1_j, x0_j) per pair [N], the diagonal of pair_cost
    d = (x1.double() - x0.double()).flatten(1).square().sum(1)
    return d.sqrt() if cost == "l2" else d


def ot_permutation(x0, x1, cost="l2"):
    """Exact OT on one minibatch (LOOM Eq. 9) -> perm, x0[perm[j]] the noise of x1[j] (a permutation)."""
    _, cols = linear_sum_assignment(pair_cost(x0, x1, cost).cpu().numpy())  # rows come back as 0..n-1
    return torch.as_tensor(cols, dtype=torch.long, device=x0.device)


def loom_reassign(tau, slots, x1, z, cost="l2"):
    """LOOM Eq. 9-10: z[j] is the noise of slot slots[j], x1[j] its image; omega (Eq. 9) -> tau_k = omega_k o
    tau_{k-1} in place (ids move only between these slots: tau stays a permutation); x1[j] gets z[perm[j]]."""
    perm = ot_permutation(z, x1, cost).cpu()
    tau[slots] = tau[slots][perm]
    return perm


def splitmix64(x):  # SplitMix64's output function on int64 tensors (wrapping; >> made logical by a mask)
    srl = lambda x, k: (x >> k) & ((1 << (64 - k)) - 1)  # noqa: E731
    x = x + (0x9E3779B97F4A7C15 - (1 << 64))  # the constants as the signed int64 torch stores
    x = (x ^ srl(x, 30)) * (0xBF58476D1CE4E5B9 - (1 << 64))
    x = (x ^ srl(x, 27)) * (0x94D049BB133111EB - (1 << 64))
    return x ^ srl(x, 31)


def noise_for_ids(ids, seed, shape, device=None):
    """Noise ids [B] -> N(0, I) noise [B, *shape] float32 of (seed, id) alone, on every rank and device:
    SplitMix64 of (seed, id, element) -> 53-bit uniforms -> Box-Muller in float64 (Sec. 3.3 stores seeds)."""
    d, key = math.prod(shape), int(splitmix64(torch.tensor(int(seed), dtype=torch.long)))
    half = (d + 1) // 2
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    counter = ids[:, None] * (2 * half) + torch.arange(2 * half, device=ids.device)  # unique per uniform
    u = (((splitmix64(splitmix64(counter) ^ key) >> 11) & ((1 << 53) - 1)).double() + 0.5) * 2.0**-53
    r, phi = torch.sqrt(-2 * torch.log(u[:, :half])), 2 * math.pi * u[:, half:]
    return torch.cat([r * torch.cos(phi), r * torch.sin(phi)], 1)[:, :d].float().reshape(len(ids), *shape)


def generator_for(seed, *keys):  # a CPU generator of (seed, keys) alone: the same on every rank and device
    state = np.random.SeedSequence([seed, *keys]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def minibatch_slots(n_data, caches, batch, step, seed, random_flip=False):
    """Alg. 1 line 3: the global minibatch -> (data indices [batch], slots = cache * n_data + index): epoch
    permutations of (seed, epoch), no partial batch, a random cache per image (Sec. 3.2). random_flip (the
    official code's): epochs over n_data / 2 images, each mirrored with prob. 1/2 as index i + n_data / 2."""
    n_epoch = n_data // 2 if random_flip else n_data
    epoch, j = divmod(step, n_epoch // batch)
    idx = torch.randperm(n_epoch, generator=torch.Generator().manual_seed((seed * 1_000_003 + epoch) % 2**64))
    idx = idx[j * batch : (j + 1) * batch]
    if random_flip:
        idx = idx + n_epoch * (torch.rand(batch, generator=generator_for(seed, step, 5)) < 0.5)
    cache = torch.randint(caches, (batch,), generator=generator_for(seed, step, 4))
    return idx, cache * n_data + idx


def build_net(net_kwargs):  # the trained network: a velocity field net(x, t), t = 0 noise, t = 1 data
    return VelocityNet(**net_kwargs)


@torch.no_grad()
def sample(net, noise, nfe, labels=None, solver="euler", atol=1e-5, rtol=1e-5, stats=None):
    """LOOM Eq. 1-2, dx/dt = v(x, t) from the noise at t = 0 to t = 1 -> (images, NFE). euler: nfe steps of h;
    midpoint: nfe / 2 steps x <- x + h v(x + h/2 v(x, t), t + h/2); dopri5: torchdiffeq's (nfe ignored; the
    batch is one ODE, so its NFE depends on the batch). stats: the solver's (attempted) steps, LOOM's log."""
    if solver == "dopri5":
        calls, steps, f = [], [], lambda t, x: calls.append(t) or net(x, t).to(x.dtype)
        f.callback_step = lambda t0, y0, dt: steps.append(t0)  # torchdiffeq calls it at each attempted step
        x = noise if noise.dtype == torch.float64 else noise.float()
        t = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
        try:  # tolerances it cannot meet (0, an underflow) or of another type: a bad argument
            x = torchdiffeq.odeint(f, x, t, method="dopri5", atol=atol, rtol=rtol)[-1]
        except (AssertionError, TypeError) as e:
            raise ValueError(f"dopri5 with atol={atol!r}, rtol={rtol!r}: {e}") from None
        stats.update(nfe_torchdiffeq=len(calls), solver_steps=len(steps)) if stats is not None else None
        return x, len(calls)
    if solver not in ("euler", "midpoint") or nfe < 1 or (solver == "midpoint" and nfe % 2):
        raise ValueError(f"solver {solver!r} with NFE {nfe}: use euler (NFE >= 1), midpoint (even) or dopri5")
    x, n, mid = noise, nfe if solver == "euler" else nfe // 2, solver == "midpoint"
    stats.update(solver_steps=n) if stats is not None else None
    h = 1.0 / n
    for i in range(n):
        x = x + h * (net(x + 0.5 * h * net(x, i * h), i * h + 0.5 * h) if mid else net(x, i * h))
    return x, nfe


def ode_start(net, noise):  # x at t = 0 of the common clock (t = 0 noise, t = 1 data): the noise itself
    return noise


def ode_velocity(net, x, t, labels=None):  # dx/dt on the common clock: this file's own, v_theta itself
    return net(x, t)


def fail(msg):
    raise SystemExit(f"error: {msg}")  # one line for the user, exit code 1, no traceback


def load_data(spec):
    """--data cifar10 | shapes | FILE.npy (memory-mapped) | FILE.npz ('images') -> (uint8 [N, H, W, C], meta);
    tools/prepare_data.py's latents (so says FILE.json beside FILE.npy) are float [N, C, H, W]."""
    if spec == "shapes":  # the smoke-test set: a disc or square of random colour, size and place
        n, res, rng = 4096, 16, np.random.default_rng(0)
        yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) + 0.5
        cy, cx = (rng.uniform(0.25, 0.75, (2, n, 1, 1)) * res).astype(np.float32)
        r = rng.uniform(0.12, 0.3, (n, 1, 1)).astype(np.float32) * res
        kind, fg, bg = rng.integers(0, 2, n), *rng.integers(0, 256, (2, n, 1, 1, 3))
        disc, square = (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2, np.maximum(abs(yy - cy), abs(xx - cx)) <= r
        images = np.where(np.where(kind[:, None, None] == 0, disc, square)[..., None], fg, bg)
        return images.astype(np.uint8), {}
    try:  # a missing, truncated or foreign file: one line
        if spec == "cifar10":
            images = torchvision.datasets.CIFAR10(root="datasets", train=True, download=True).data
        else:
            images = np.load(spec, mmap_mode="r") if spec.endswith(".npy") else np.load(spec)["images"]
        js = spec[:-4] + ".json"  # tools/prepare_data.py's, beside its .npy
        meta = dict(json.load(open(js))) if spec.endswith(".npy") and os.path.isfile(js) else {}  # noqa: SIM115
    except Exception as e:
        fail(f"--data {spec}: {type(e).__name__} {e}; use cifar10 (cifar-10-python.tar.gz in datasets/), "
             "shapes, an .npy of tools/prepare_data.py or an .npz of 'images'")  # fmt: skip
    n, *hwc = images.shape
    if meta.get("kind") == "latents":  # tools/prepare_data.py --vae
        if images.dtype not in (np.float16, np.float32) or len(hwc) != 3 or hwc[1] != hwc[2] or not n:
            fail(f"{spec}: latents must be float [N, C, H, H]; got {images.dtype} {images.shape}")
    elif images.dtype != np.uint8 or len(hwc) != 3 or hwc[2] not in (1, 3) or hwc[0] != hwc[1] or not n:
        fail(f"{spec}: images must be square uint8 [N, H, W, C], C 1 or 3; got {images.dtype} {images.shape}")
    return images, meta


def get_batch(images, idx, device):  # data indices -> [-1, 1] floats (latents as they are); i >= N: mirrored
    x, latent = images[(idx % len(images)).numpy()], images.dtype != np.uint8
    x = torch.from_numpy(np.array(x, order="C") if latent else np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    x = x.to(device).float() if latent else x.to(device).float() / 127.5 - 1
    return torch.where((idx >= len(images)).to(device)[:, None, None, None], x.flip(3), x)


def load_checkpoint(path):
    """A checkpoint of this file (a run folder: its latest.pt), checked, loaded without running code."""
    path = os.path.join(path, "latest.pt") if os.path.isdir(path) else path
    try:  # torch.load checks neither CRCs nor the zip's structure: flipped bits would load as other weights
        with zipfile.ZipFile(path) as z:
            dirs = [i.filename for i in z.infolist() if i.is_dir() or i.external_attr & 0x10]  # flipped bit 4
            bad = z.testzip() or (dirs and dirs[0])
        if bad:
            fail(f"{path} is corrupt: its member {bad} is damaged; use an intact ckpt-*.pt beside it")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # missing, cut off or foreign (never unpickled unsafely): one line
        fail(f"cannot load {path}: {e!r:.300}; use an intact ckpt-*.pt beside it")
    ok = isinstance(ckpt, dict) and (ckpt.get("method"), ckpt.get("version")) == (METHOD, VERSION)
    if missing := [k for k in ("net_kwargs", "net", "ema", "opt", "step", "state") if not (ok and k in ckpt)]:
        fail(f"{path} is not a {METHOD}.py checkpoint of version {VERSION}: it lacks {', '.join(missing)}")
    return ckpt


def lock(path, _held={}):  # noqa: B006 (flocks held for the process's life): a second job on one output stops
    if (path := os.path.abspath(path)) not in _held:
        try:
            fcntl.flock(f := open(path, "a"), fcntl.LOCK_EX | fcntl.LOCK_NB)  # noqa: SIM115
        except BlockingIOError:
            fail(f"{path} is locked by a running job; wait for it or choose another output")
        _held[path] = f


def claim_outdir(outdir, resume, step, overwrite):
    """Rank 0: lock --outdir; replace a run only if resumed from it or --overwrite; clean up after a kill."""
    os.makedirs(outdir, exist_ok=True)
    lock(os.path.join(outdir, ".lock"))
    runs = sorted(n for n in os.listdir(outdir) if re.fullmatch(r"ckpt-\d+\.pt", n))
    src = resume and os.path.realpath(resume)  # the folder of the resumed run
    fresh = not resume or os.path.realpath(outdir) != (src if os.path.isdir(src) else os.path.dirname(src))
    if runs and fresh and not overwrite:
        fail(f"{outdir} holds a run at step {int(runs[-1][5:-3])}: pass --resume {outdir} to continue it, "
             "--overwrite to replace it, or choose another --outdir")  # fmt: skip
    old = (*runs, "latest.pt", "log.jsonl") if fresh else ()  # a new run replaces the old one
    for name in os.listdir(outdir):  # exactly the names this file writes, never a user's notes.tmp
        if name in old or re.fullmatch(r"(ckpt-\d+\.pt|log\.jsonl)\.tmp", name):
            os.remove(os.path.join(outdir, name))
    if not fresh and os.path.isfile(log := os.path.join(outdir, "log.jsonl")):  # cut back to the checkpoint
        keep = [s for s in open(log) if (m := re.match(r'{"step": (\d+),.*}\n', s)) and int(m[1]) <= step]  # noqa: SIM115
        with open(log + ".tmp", "w") as f:
            f.writelines(keep)
        os.replace(log + ".tmp", log)


# --- training (LOOM Alg. 1, nanoGPT-style), generation, command line ---


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
    ckpt = load_checkpoint(args.resume) if args.resume else None
    images, meta = load_data(args.data)
    latent = meta.get("kind") == "latents"  # tools/prepare_data.py --vae: [N, C, H, W] floats
    res, C = (images.shape[2], images.shape[1]) if latent else (images.shape[1], images.shape[3])
    n_data, shape = len(images) * (1 if args.xflip == "off" else 2), (C, res, res)  # i + N: image i mirrored
    n_eff, total_steps = n_data * args.caches, math.ceil(args.duration * 1e6 / args.batch)
    if args.batch > len(images) * (2 if args.xflip == "copies" else 1):
        fail(f"--batch {args.batch} exceeds the {n_data} training images (each batch holds distinct images)")
    net_kwargs = dict(img_resolution=res, img_channels=C, label_dim=0, time_scale=1.0, dropout=args.dropout,
                      arch=args.arch, model_channels=args.model_channels, channel_mult=args.channel_mult,
                      num_blocks=args.num_blocks, attn_resolutions=args.attn_res)  # fmt: skip
    st = dict(tau=torch.arange(n_eff), nimg=0, n_data=n_data, caches=args.caches)  # Alg. 1: tau_0 = Id
    if ckpt is not None:  # the run's own network and assignment
        net_kwargs, st = ckpt["net_kwargs"], ckpt["state"]
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    try:  # a checkpoint with other shapes or an unknown arch: one line
        if (st["n_data"], st["caches"], net_kwargs["img_resolution"]) != (n_data, args.caches, res):
            fail(f"--resume {args.resume} is an assignment of {st['n_data']} images x {st['caches']} caches, "
                 f"but this run has {n_data} x {args.caches}: use its --data, --xflip, --caches")  # fmt: skip
        net = build_net(net_kwargs).to(device).train()
        ema = copy.deepcopy(net).eval().requires_grad_(False)
        opt = torch.optim.Adam(net.parameters(), args.lr)
        if ckpt is not None:
            net.load_state_dict(ckpt["net"]), ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["opt"])
        tau, nimg, step = st["tau"].clone(), st["nimg"], ckpt["step"] if ckpt else 0
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        fail(f"cannot build the network of {args.resume or 'these flags'}: {e!r:.300}")
    if rank == 0:
        claim_outdir(args.outdir, args.resume, step, args.overwrite)  # the flags are in every checkpoint
        print(f"{n_data} images x {args.caches} caches, {world} process(es) on {device}, from step {step}")
    torch.backends.cudnn.benchmark = True  # full fp32 unless --precision tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    model = torch.compile(net) if args.compile else net  # what is called; net and ema are what is stored
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(model, [device] if device.type == "cuda" else None)
    stop = []  # SIGINT/SIGTERM: a checkpoint at the end of the step, then exit 128 + signal (a requeue)
    [signal.signal(s, lambda signum, frame: stop.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)]
    sums, t_log, step_log, t0, step0 = {}, time.time(), step, time.time(), step
    while step < total_steps:
        torch.manual_seed(generator_for(args.seed * world + rank, step).initial_seed())  # dropout
        # Alg. 1 on the global minibatch, the same on every rank: its images and the noise their slots hold
        idx, slots = minibatch_slots(n_data, args.caches, args.batch, step, args.seed, args.xflip == "random")
        x1, z = get_batch(images, idx, device), noise_for_ids(tau[slots], args.seed, shape, device)
        t_solve, perm = time.time(), torch.arange(args.batch, device=device)
        if not args.no_reassign:  # Eq. 9 on rank 0 (a global solve, as the official code), sent to every rank
            perm = ot_permutation(z, x1, args.cost) if rank == 0 else perm
            torch.distributed.broadcast(perm, 0) if ddp else None
            tau[slots] = tau[slots][perm.cpu()]  # Eq. 10: tau_k = omega_k o tau_{k-1}
        x0 = z[perm]
        rec = dict(swaps=int((perm.cpu() != torch.arange(args.batch)).sum()), solve_s=time.time() - t_solve,
                   cost_before=path_cost(z, x1, args.cost).mean().item(),
                   cost_after=path_cost(x0, x1, args.cost).mean().item())  # Fig. 9-12  # fmt: skip
        # the CFM step (Eq. 3) on this rank's rows of the global minibatch
        lo, g = rank * batch_rank, generator_for(args.seed, step, 3)  # t, eps: independent of world size
        t = torch.rand(args.batch, generator=g)[lo : lo + batch_rank].to(device)
        eps = torch.randn([args.batch, *shape], generator=g)[lo : lo + batch_rank].to(device)
        for group in opt.param_groups:  # Table 4: linear warm-up over --lr-rampup Mimg, then constant
            group["lr"] = args.lr * (min(nimg / (args.lr_rampup * 1e6), 1) if args.lr_rampup > 0 else 1)
        opt.zero_grad(set_to_none=True)
        loss_sum, chunks = 0.0, range(lo, lo + batch_rank, batch_gpu)
        for j, c in enumerate(chunks):  # --batch-gpu images per forward pass
            rows, own = slice(c, c + batch_gpu), slice(c - lo, c - lo + batch_gpu)
            sync = contextlib.nullcontext() if j == len(chunks) - 1 or not ddp else model.no_sync()
            with sync, torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
                loss = cfm_loss(model, x0[rows], x1[rows], t[own], args.sigma_min, eps[own]).mean()
                (loss * batch_gpu / batch_rank).backward()
            loss_sum += loss.item() * batch_gpu / batch_rank
        grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip or math.inf).item()
        opt.step()
        for p_ema, p in zip(ema.state_dict().values(), net.state_dict().values(), strict=True):
            p_ema.copy_(p.lerp(p_ema, args.ema_decay))  # EMA; the buffers (constant filters) stay themselves
        rec.update(loss=loss_sum, grad_norm=grad_norm, lr=opt.param_groups[0]["lr"])
        nimg, step, sums = nimg + args.batch, step + 1, {k: sums.get(k, 0.0) + v for k, v in rec.items()}
        flags = torch.tensor([bool(stop), not math.isfinite(loss_sum + grad_norm)], device=device).float()
        torch.distributed.all_reduce(flags) if ddp else None  # every rank stops together
        if flags[1]:
            fail(f"non-finite loss at step {step}: stopped before a checkpoint; lower --lr or check the data")
        done, stopping = step >= total_steps, bool(flags[0])
        if step % args.log_every == 0 or done or stopping:
            vals = torch.tensor([*sums.values()], dtype=torch.float64).to(device) / (step - step_log) / world
            torch.distributed.all_reduce(vals) if ddp else None  # means over the steps and the ranks
            rec = dict(step=step, kimg=nimg / 1000, **dict(zip(sums, vals.tolist(), strict=True)),
                       sec_per_step=(time.time() - t_log) / (step - step_log))  # fmt: skip
            if rank == 0:
                eta = round((time.time() - t0) / (step - step0) * (total_steps - step))
                text = " ".join(f"{k}={v:.5g}" for k, v in rec.items() if k != "step")
                print(f"step={step}/{total_steps} {text} eta={eta // 60}m{eta % 60:02d}s", flush=True)
                with open(os.path.join(args.outdir, "log.jsonl"), "a") as f:
                    f.write(json.dumps(rec) + "\n")
            sums, t_log, step_log = {}, time.time(), step
        if rank == 0 and (step % args.snap_every == 0 or done or stopping):  # all a bit-exact resume needs
            if not all(v.isfinite().all() for m in (net, ema) for v in m.state_dict().values()):
                fail(f"non-finite weights at step {step}: not saved; the newest checkpoint is the last "
                     "good one")  # fmt: skip
            out = os.path.join(args.outdir, name := f"ckpt-{step:07d}.pt")
            ckpt = dict(method=METHOD, version=VERSION, args=vars(args), net_kwargs=net_kwargs, step=step,
                net=net.state_dict(), ema=ema.state_dict(), opt=opt.state_dict(), kimg=nimg / 1000,
                state=dict(nimg=nimg, tau=tau, n_data=n_data, caches=args.caches), data=meta)  # fmt: skip
            with open(f"{out}.tmp", "wb") as f:  # a full disk: an OSError (one line), not a RuntimeError
                torch.save(ckpt, f)
            os.replace(f"{out}.tmp", out), os.symlink(name, f"{out}.tmp")  # atomic: never half-written
            os.replace(f"{out}.tmp", os.path.join(args.outdir, "latest.pt"))
        if stopping:
            print(f"stopped at step {step}; --resume {args.outdir} continues the run") if rank == 0 else None
            break
    torch.distributed.destroy_process_group() if ddp else None
    if stop:
        raise SystemExit(128 + stop[0])


@torch.no_grad()
def generate(args):
    """--generate N on one device (many: gen_pairs.py, evaluate.py): image i from seed --seed + i by --ckpt's
    EMA -> .npz ('images' uint8 NHWC, 'seeds'; latents: 'latents' too) written atomically, and a .png grid."""
    png = os.path.splitext(args.out)[0] + ".png"
    lock(f"{args.out}.lock")
    if not args.overwrite and (there := [f for f in (args.out, png) if os.path.exists(f)]):
        fail(f"{there[0]} exists; pass --overwrite to replace it")
    ckpt, device = load_checkpoint(args.ckpt), torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:  # a checkpoint with other shapes or an unknown arch: one line
        net = build_net(k := ckpt["net_kwargs"]).eval().requires_grad_(False).to(device)
        net.load_state_dict(ckpt["ema"])
        meta = dict(ckpt.get("data", {}))  # latents: the VAE that decodes them
        shape = (k["img_channels"], k["img_resolution"], k["img_resolution"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        fail(f"cannot build the network of {args.ckpt}: {e!r:.300}")
    if latent := meta.get("kind") == "latents":  # decoded by tools/prepare_data.py's diffusers VAE
        try:  # diffusers or the VAE missing, unreadable or not a VAE: one line
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(v := meta["vae"], local_files_only=not os.path.isdir(v))
        except Exception as e:
            fail(f"cannot load the VAE {meta['vae']} of {args.ckpt} ({type(e).__name__}): put its diffusers "
                 "files there or in the Hugging Face cache")  # fmt: skip
    seeds, out = range(args.seed, args.seed + args.generate), []
    for i in tqdm.trange(0, args.generate, args.gen_batch, unit="batch"):  # dopri5: a batch is one ODE
        gens = [torch.Generator().manual_seed(s) for s in seeds[i : i + args.gen_batch]]  # as every file
        noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
        x, _ = sample(net, noise.to(device), args.nfe, None, args.solver)
        if not x.isfinite().all():  # NaN weights would write black images
            fail(f"--ckpt {args.ckpt} gave non-finite samples (its weights are broken); nothing written")
        out.append((x, vae.to(device).decode(x / meta["scale"]).sample.float() if latent else x))
    images = (torch.cat([x for _, x in out]) * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    raw = dict(latents=torch.cat([z for z, _ in out]).cpu().numpy()) if latent else {}  # the raw samples too
    with open(f"{args.out}.tmp{os.getpid()}", "wb") as f:
        np.savez(f, images=images.cpu().numpy(), seeds=np.array(seeds), **raw)
    os.replace(f"{args.out}.tmp{os.getpid()}", args.out)
    torchvision.utils.save_image(images[:64].permute(0, 3, 1, 2) / 255, png, nrow=8)


def number(cast, lo, hi=math.inf, lo_open=False):  # argparse type: a finite number in range
    def parse(s):
        v = cast(s)
        if not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi):
            raise argparse.ArgumentTypeError(f"{s} is not in {'(' if lo_open else '['}{lo}, {hi}]")
        return v

    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="LOOM-CFM: train a flow on a persistent assignment, or generate.",
        allow_abbrev=False, formatter_class=argparse.ArgumentDefaultsHelpFormatter)  # fmt: skip
    add, ints = p.add_argument, lambda s: [number(int, 1)(v) for v in s.split(",") if v]
    count, real, batch = number(int, 1), number(float, 0), number(int, 1, 2**20)
    add("--data", help="cifar10 (in datasets/) | shapes | FILE.npy (tools/prepare_data.py) | FILE.npz")
    add("--outdir", default="runs/loom", help="checkpoints (with the flags) and log.jsonl")
    add("--xflip", default="off", choices=["off", "random", "copies"], help="random: as the official code")
    add("--caches", type=count, default=4, help="noises per image, Sec. 3.2 (Table 1: 4; official config: 6)")
    add("--cost", default="l2", choices=["l2", "sqeuclidean"], help="c(x, z) = ||x - z|| (App. B) or squared")
    add("--no-reassign", action="store_true", help="App. D's fixed source: tau stays the identity")
    add("--sigma-min", type=real, default=1e-7, help="sigma of the CFM path, Eq. 3 (Table 4: 1e-7)")
    add("--arch", choices=["ddpmpp", "ncsnpp", "adm", "adm-cfm"], help="UNet (cifar10: adm-cfm, else ddpmpp)")
    add("--batch", type=batch, default=128, help="global batch = the LOOM minibatch (Table 4: 128)")
    add("--batch-gpu", type=batch, help="images per forward pass (accumulating to the per-process batch)")
    add("--lr", type=number(float, 0, lo_open=True), default=2e-4, help="Adam learning rate (Table 4: 2e-4)")
    add("--lr-rampup", type=real, default=0.64, help="linear lr warm-up, Mimg (Table 4: 5k steps of 128)")
    add("--grad-clip", type=real, default=1.0, help="gradient-norm clip (0: none)")
    add("--ema-decay", type=number(float, 0, 1), default=0.9999, help="EMA decay per step (Table 4: 0.9999)")
    add("--duration", type=number(float, 0, lo_open=True), default=50.0, help="training length, Mimg")
    add("--model-channels", type=count, default=128, help="UNet base width (Table 4: 128)")
    add("--channel-mult", type=ints, default=[1, 2, 2, 2], help="width multiplier per resolution (Table 4)")
    add("--num-blocks", type=number(int, 0), default=2, help="residual blocks per resolution (Table 4: 2)")
    add("--attn-res", type=ints, default=[16], help="self-attention resolutions (Table 4: 16)")
    add("--dropout", type=number(float, 0, 1), default=0.1, help="dropout (Table 4: 0.1)")
    add("--tiny", action="store_true", help="a tiny UNet for CPU smoke runs")
    add("--seed", type=number(int, 0, 2**63 - 1), default=0, help="init, data, noise ids, t; --generate")
    add("--log-every", type=count, default=100, help="steps between log lines")
    add("--snap-every", type=count, default=5000, help="steps between checkpoints")
    add("--resume", help="run folder (its latest.pt) or checkpoint to continue, with its assignment")
    add("--overwrite", action="store_true", help="replace a run in --outdir or an existing --out")
    add("--generate", type=number(int, 0), default=0, metavar="N", help="generate N images from --ckpt")
    add("--ckpt", help="--generate: a checkpoint of this file, or its run folder")
    add("--out", default="samples.npz", help="--generate's .npz (a .png grid beside it)")
    add("--solver", default="midpoint", choices=["euler", "midpoint", "dopri5"], help="ODE solver (dopri5: "
        "atol = rtol = 1e-5, as the official code)")  # fmt: skip
    add("--nfe", type=count, default=8, help="network evaluations of euler / midpoint (the paper: 4, 8, 12)")
    add("--gen-batch", type=batch, default=256, help="images per sampling batch (one ODE for dopri5)")
    add("--precision", default="fp32", choices=["fp32", "tf32", "bf16"], help="fp32 (the paper's)")
    add("--compile", action="store_true", help="torch.compile the network")
    args = p.parse_args(argv)
    if not args.channel_mult or (args.solver == "midpoint" and args.nfe % 2):
        p.error("--channel-mult needs a multiplier, --solver midpoint an even --nfe")
    if not (args.ckpt if args.generate else args.data):
        p.error("--generate N needs --ckpt" if args.generate else "--data is required for training")
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

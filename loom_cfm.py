"""LOOM-CFM: Looking Out Of Minibatch conditional flow matching (Davtyan et al., ICLR 2025).

Minibatch OT (BatchOT / OT-CFM) pairs each image with the best noise *within one minibatch* and then forgets
the answer. LOOM-CFM keeps it: every training image holds assigned noise (`--caches K` noises per image, one
drawn at random each time the image is visited, Sec. 3.2), the assignment tau is a permutation of the noise
ids over all n_eff = n_data x K slots, and each step solves the minibatch assignment on the slots it visits
(Eq. 9) and writes it back (tau_k = omega_k o tau_{k-1}, Eq. 10) before the CFM step (Eq. 3). Over training
the assignments of different minibatches talk to each other: the total cost never increases and converges to
an assignment with no improving cycle shorter than the batch (Theorem 1), a much better approximation of the
global OT coupling than any single minibatch.

Convention (as the paper and cfm_couplings.py): t = 0 is the noise z ~ N(0, I), t = 1 the image x in [-1, 1];
x_t = t x + (1 - t) z + sigma eps, target x - z; the network sees time_scale * t, t itself by default as the
official code. The transport cost is the official code's unsquared ||x - z|| (App. B; Sec. 3.1 writes the
square: --cost sqeuclidean). Unconditional, as the paper; --cond solves Eq. 9 within each class. Samplers:
euler, midpoint (the paper's 4/8/12 NFE) and dopri5 (torchdiffeq, atol = rtol = 1e-5 as the official code;
its function evaluations are the NFE, its attempted steps, which the official code logs, beside them).

Noise ids: slot s = k * n_data + i (image i, cache k) holds noise id tau[s]; noise id j is regenerated from
(--seed, j) by a counter-based generator (SplitMix64 + Box-Muller, batched on the device), identical on every
call, rank and device; nothing per sample is stored but tau itself (8 bytes per slot). With --xflip each visit
mirrors its image with probability 1/2 and the mirror is its own data index (n_data = 2 x images), as in the
official code.

Distributed policy: the global minibatch (slots, images, noise) is a function of (seed, step) on every rank;
rank 0 solves Eq. 9 on the whole global batch (as the official code's global solve) and broadcasts omega;
every rank applies the same update, so all ranks hold the identical tau after every step (checked each step
with a digest); each rank then trains on its slice of the batch.

Commands
  CPU smoke run on a synthetic dataset (tiny net, 4 caches):
    python loom_cfm.py --data shapes --tiny --batch 64 --duration 0.02 --outdir runs/loom-shapes
  The paper's CIFAR-10 run (Table 4: batch 128 on 4 GPUs, 4 caches, random x-flips, lr 2e-4, 5k warm-up, EMA
  0.9999, sigma 1e-7, unsquared L2 cost, t fed as is, 1000 epochs = 391k steps):
    torchrun --standalone --nproc_per_node=4 loom_cfm.py --data cifar10 --xflip --outdir runs/loom-cifar10
  Ablations (App. D, Table 5): --no-reassign (fixed source), --fresh-noise (BatchOT: new noise every step),
  --train-after-convergence 50 (50 assignment-only epochs first), --caches 1..4, --batch 32/64/128.
  Generate 50,000 images with the paper's midpoint sampler at 8 NFE:
    python loom_cfm.py --generate 50000 --ckpt runs/loom-cifar10 --solver midpoint --nfe 8 --out loom8.npz
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

# --- method: LOOM-CFM (Davtyan et al.) ---
# The CFM loss (Eq. 3) and the ODE samplers are the flow matching block, first in the shared appendix at the
# end of this file (identical in cfm_couplings); LOOM's assignment (Alg. 1) is below.
METHOD = "loom_cfm"
VERSION = 1


# --- LOOM-CFM: the persistent assignment (Sec. 3, Alg. 1) ---


def _int64(c):
    """A 64-bit constant as the signed int64 torch stores (two's complement)."""
    return c - (1 << 64) if c >= 1 << 63 else c


SM_GAMMA, SM_M1, SM_M2 = (_int64(c) for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB))


def _srl(x, k):
    """Logical right shift of int64 tensors (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x):
    """SplitMix64's output function on int64 tensors (wrap-around arithmetic): counter -> 64 mixed bits."""
    x = x + SM_GAMMA
    x = (x ^ _srl(x, 30)) * SM_M1
    x = (x ^ _srl(x, 27)) * SM_M2
    return x ^ _srl(x, 31)


def noise_for_ids(ids, seed, shape, device=None):
    """Noise ids [B] -> standard-normal noise [B, *shape] float32, a pure function of (seed, id): a
    counter-based generator (SplitMix64 of (seed key, id, element) -> 53-bit uniforms -> Box-Muller in
    float64), batched on the device. The paper stores one generator seed per noise (Sec. 3.3) and builds one
    generator per sample; here there is nothing to store and no per-sample loop."""
    d = math.prod(shape)
    half = (d + 1) // 2
    key = int(splitmix64(torch.tensor(int(seed), dtype=torch.long)))
    ids = torch.as_tensor(ids, dtype=torch.long, device=device)
    counter = ids[:, None] * (2 * half) + torch.arange(2 * half, device=ids.device)  # unique per uniform
    u = (_srl(splitmix64(splitmix64(counter) ^ key), 11).double() + 0.5) * 2.0**-53  # in (0, 1)
    r, phi = torch.sqrt(-2 * torch.log(u[:, :half])), 2 * math.pi * u[:, half:]
    z = torch.cat([r * torch.cos(phi), r * torch.sin(phi)], 1)[:, :d]
    return z.float().reshape(len(ids), *shape)


def minibatch_slots(n_data, caches, batch, step, seed, random_flip=False):
    """The global minibatch of step `step` (Alg. 1 line 3): data indices from the epoch's permutation, without
    the epoch's last partial batch (so no image twice in a batch), and one random cache per image (Sec. 3.2).
    -> (data indices [batch], slots [batch]) with slot = cache * n_data + data index.
    random_flip (--xflip random, the official code's flips): the epoch runs over the n_data / 2 images and
    each visit mirrors its image with probability 1/2; the mirror of image i is data index i + n_data / 2,
    with caches of its own, as the official code gives the flipped image index i + n."""
    n_epoch = n_data // 2 if random_flip else n_data
    epoch, j = divmod(step, n_epoch // batch)
    idx = epoch_order(n_epoch, seed, epoch)[j * batch : (j + 1) * batch]
    if random_flip:
        idx = idx + n_epoch * (torch.rand(batch, generator=generator_for(seed, step, 5)) < 0.5)
    cache = torch.randint(caches, (batch,), generator=generator_for(seed, step, 4))
    return idx, cache * n_data + idx


def minibatch_permutation(z, x1, cost="sqeuclidean", labels=None):
    """LOOM Eq. 9 on one minibatch: image j gets noise z[perm[j]]. With labels (--cond) the assignment is
    solved within each class (AOT Alg. 2), so every class keeps the noise ids it started with."""
    if labels is None:
        return ot_permutation(z, x1, cost).cpu()
    labels, perm = labels.cpu(), torch.arange(len(x1))
    for k in labels.unique():
        g = torch.nonzero(labels == k).flatten()
        gd = g.to(x1.device)
        perm[g] = g[ot_permutation(z[gd], x1[gd], cost).cpu()]
    return perm


def loom_reassign(tau, slots, x1, z, cost="sqeuclidean", labels=None):
    """LOOM Eq. 9-10 on one minibatch. z[j] is the noise of slot slots[j] (id tau[slots[j]]) and x1[j] its
    image. omega = the optimal assignment of this minibatch's noises to its images (Eq. 9); tau is updated in
    place, tau_k = omega_k o tau_{k-1} (Eq. 10): noise ids only move between the minibatch's slots, so tau
    stays a permutation. Returns perm: image j now holds noise z[perm[j]]."""
    perm = minibatch_permutation(z, x1, cost, labels)
    tau[slots] = tau[slots][perm]
    return perm


class NoiseBank:
    """Noise of ids: regenerated on the device each time (default), or (--noise-store memory) generated once
    for all n_eff ids and kept in CPU RAM (4 bytes per pixel per slot). Both give the same numbers."""

    def __init__(self, store, n_eff, seed, shape, device, chunk=4096):
        self.seed, self.shape, self.device, self.table = seed, shape, device, None
        if store == "memory":
            self.table = torch.cat(
                [
                    noise_for_ids(torch.arange(lo, min(lo + chunk, n_eff)), seed, shape)
                    for lo in range(0, n_eff, chunk)
                ]
            )

    def __call__(self, ids):
        if self.table is not None:
            return self.table[ids].to(self.device)
        return noise_for_ids(ids, self.seed, self.shape, self.device)


@torch.no_grad()
def assignment_cost(tau, images, n_data, bank, cost, device, chunk=2048):
    """The exact mean cost of tau over all n_eff slots, c(x_i, z_tau(s)) (LOOM Eq. 7's objective / n_eff),
    computed in chunks shared out over the ranks."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    total = torch.zeros((), dtype=torch.float64, device=device)
    for lo in range(rank * chunk, len(tau), chunk * world):
        s = torch.arange(lo, min(lo + chunk, len(tau)))
        x1, _ = get_batch(images, None, s % n_data, device)
        total += path_cost(bank(tau[s]), x1, cost).sum()
    if world > 1:
        torch.distributed.all_reduce(total)
    return total.item() / len(tau)


def tau_digest(tau):
    """A checksum of the assignment, for the every-step check that all ranks hold the same tau."""
    w = torch.arange(len(tau), dtype=torch.long) % 1_000_003 + 1
    return int((tau * w).sum())


def generator_for(seed, *keys):
    """A CPU generator that depends only on (seed, keys): the same stream on every rank and device."""
    state = np.random.SeedSequence([seed, *keys]).generate_state(2)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


# --- training ---


def _sync(module, sync):
    """DDP: skip the gradient all-reduce on accumulation chunks that are not the last."""
    return contextlib.nullcontext() if sync or not hasattr(module, "no_sync") else module.no_sync()


def run_net_kwargs(args, shape, label_dim, n_data, ckpt, log):
    """The network this run trains: from the flags and the data, or the resumed run's, whose assignment must
    be of the same images and caches."""
    res = shape[-1]
    if res % 2 ** (len(args.channel_mult) - 1):
        fail(f"image size {res} is not divisible by 2^{len(args.channel_mult) - 1} (--channel-mult)")
    net_kwargs = dict(
        img_resolution=res,
        img_channels=shape[0],
        label_dim=label_dim,
        time_scale=args.time_scale,
        arch=args.arch,
        model_channels=args.model_channels,
        channel_mult=list(args.channel_mult),
        num_blocks=args.num_blocks,
        attn_resolutions=list(args.attn_res),
        dropout=args.dropout,
    )
    if ckpt is None:
        return net_kwargs
    st = ckpt["state"]
    if (st["n_data"], st["caches"]) != (n_data, args.caches):
        fail(
            f"--resume {args.resume} is an assignment of {st['n_data']} images x {st['caches']} caches, "
            f"but this run has {n_data} x {args.caches}: use the same --data, --xflip and --caches"
        )
    keys = ("data", "xflip", "cond", "batch", "seed", "lr", "cost", "no_reassign", "fresh_noise")
    net_kwargs = resumed_net_kwargs(ckpt, net_kwargs, args, log, keys)
    return net_kwargs


def assign_minibatch(tau, bank, images, labels, n_data, step, args, device, rank, world):
    """LOOM Alg. 1, one iteration on the global minibatch (the same on every rank): its images, the noises
    their slots hold, re-matched by minibatch OT (Eq. 9) with tau updated in place (Eq. 10)
    -> (x0, x1, labels, the path costs before and after, statistics)."""
    idx, slots = minibatch_slots(n_data, args.caches, args.batch, step, args.seed, args.xflip == "random")
    x1, y = get_batch(images, labels, idx, device)
    t0 = time.time()
    if args.fresh_noise:  # BatchOT: new noise each step, assignment thrown away
        g = generator_for(args.seed, step, 1)
        z = torch.randn([args.batch, *images.shape[1:]], generator=g).to(device)
    else:
        z = bank(tau[slots])
    perm = torch.arange(args.batch)
    if not args.no_reassign:
        if rank == 0:
            perm = minibatch_permutation(z, x1, args.cost, y)  # LOOM Eq. 9 on the global minibatch
        if world > 1:
            perm = perm.to(device)
            torch.distributed.broadcast(perm, 0)
            perm = perm.cpu()
        if not args.fresh_noise:
            tau[slots] = tau[slots][perm]  # LOOM Eq. 10: tau_k = omega_k o tau_{k-1}
    x0 = z[perm.to(device)]
    solve_s = time.time() - t0
    before, after = path_cost(z, x1, args.cost), path_cost(x0, x1, args.cost)
    if world > 1 and not args.fresh_noise:  # every rank must hold the same assignment
        digests = [None] * world
        torch.distributed.all_gather_object(digests, tau_digest(tau))
        if len(set(digests)) != 1:
            fail(f"ranks disagree on the assignment at step {step}: digests {digests}")
    rec = dict(
        swaps=int((perm != torch.arange(args.batch)).sum()),
        cost_before=before.mean().item(),
        cost_after=after.mean().item(),
        solve_s=solve_s,
    )
    return x0, x1, y, before, after, rec


def training_step(ddp, net, opt, batch, lo, batch_gpu, args):
    """One optimiser step on this rank's rows [lo, lo + len(t)) of the global minibatch (x0, x1, labels)
    with its (t, eps), accumulated over --batch-gpu chunks -> (the mean CFM loss of LOOM Eq. 3, the gradient
    norm before clipping)."""
    x0, x1, y, t, eps = batch
    opt.zero_grad(set_to_none=True)
    loss_sum, chunks = 0.0, list(range(lo, lo + len(t), batch_gpu))
    for j, c in enumerate(chunks):
        sl, sr = slice(c, c + batch_gpu), slice(c - lo, c - lo + batch_gpu)
        with _sync(ddp, j == len(chunks) - 1):
            loss = cfm_loss(ddp, x0[sl], x1[sl], t[sr], None if y is None else y[sl], args.sigma_min,
                            None if eps is None else eps[sr]).mean()  # LOOM Eq. 3  # fmt: skip
            (loss * batch_gpu / len(t)).backward()
        loss_sum += loss.item() * batch_gpu / len(t)
    grad_norm = torch.nn.utils.clip_grad_norm_(net.parameters(), args.grad_clip or math.inf)
    opt.step()
    return loss_sum, grad_norm.item()


def save_snapshot(args, net_kwargs, net, ema, opt, step, nimg, tau, n_data, grids, grid_noise, grid_labels,
                  device):  # fmt: skip
    """Rank 0: the checkpoint, with the assignment tau (the noises are rebuilt from their seeds), and with
    `grids` one grid of EMA samples per --grid-nfe."""
    ckpt = dict(method=METHOD, version=VERSION, args=vars(args), net_kwargs=net_kwargs, net=net.state_dict(),
                ema=ema.state_dict(), opt=opt.state_dict(), step=step, kimg=nimg / 1000,
                state=dict(nimg=nimg, tau=tau, n_data=n_data, caches=args.caches))  # fmt: skip
    save_checkpoint(ckpt, args.outdir, step)
    for nfe in args.grid_nfe if args.grid and grids else ():
        x, _ = sample(ema, grid_noise.to(device), nfe, grid_labels)
        save_image_grid(x, os.path.join(args.outdir, f"grid-euler{nfe}-{step:07d}.png"))


def train(args):
    rank, world, device = dist_setup()
    log = Logger(args.outdir, rank)
    torch.backends.cudnn.benchmark = True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    batch_rank, batch_gpu = split_batch(args, world)
    ckpt = resume_checkpoint(args, METHOD)
    images, labels = load_images(args.data, args.data_dir)  # unconditional unless --cond, as the paper
    if args.cond and labels is None:
        fail(f"--cond, but {args.data} has no labels")
    label_dim = int(labels.max()) + 1 if args.cond else 0
    labels = labels.to(device) if args.cond else None
    shape, n_data = tuple(images.shape[1:]), len(images) * (1 if args.xflip == "off" else 2)
    n_eff = n_data * args.caches
    if args.batch > len(images) * (2 if args.xflip == "copies" else 1):
        fail(f"--batch {args.batch} exceeds the {n_data} training images (each batch holds distinct images)")
    images = images.to(device)
    net_kwargs = run_net_kwargs(args, shape, label_dim, n_data, ckpt, log)
    tau = torch.arange(n_eff)  # Alg. 1: tau_0 = Id (noise id s starts in slot s)
    step = nimg = 0
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    net = build_net(net_kwargs).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=args.lr, **optimizer_kwargs(args, device))
    if ckpt is not None:
        net.load_state_dict(ckpt["net"])
        ema.load_state_dict(ckpt["ema"])
        opt.load_state_dict(ckpt["opt"])
        tau, step, nimg = ckpt["state"]["tau"].clone(), ckpt["step"], ckpt["state"]["nimg"]
        log.print(f"resumed from {args.resume} at step {step} ({nimg / 1000:.1f} kimg), assignment restored")
    ddp = prepare_net(net, args, device)  # the call under the speed flags; net and ema are what is stored
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            ddp, device_ids=[device] if device.type == "cuda" else None
        )
    spe = (n_data // 2 if args.xflip == "random" else n_data) // args.batch
    pre_steps = args.train_after_convergence * spe  # assignment-only steps before training (App. D)
    total_steps = pre_steps + math.ceil(args.duration * 1e6 / args.batch)
    bank = NoiseBank(args.noise_store, n_eff, args.seed, shape, device)
    mode = "fresh noise (BatchOT)" if args.fresh_noise else "fixed source" if args.no_reassign else "LOOM"
    if rank == 0:
        claim_outdir(args.outdir, ckpt, args.overwrite)
        with open(os.path.join(args.outdir, "args.json"), "w") as f:
            json.dump(vars(args), f, indent=2)
        log.print(json.dumps(vars(args)))
        params = sum(p.numel() for p in net.parameters())
        log.print(
            f"{n_data} images {shape} x {args.caches} caches = {n_eff} slots "
            f"({tau.numel() * 8 / 2**20:.1f} MiB assignment), {params} parameters, {world} process(es) on "
            f"{device}; {mode}, {spe} steps per epoch"
            + (f", {pre_steps} assignment-only steps first" if pre_steps else "")
        )
    track = args.cost_every > 0 and not args.fresh_noise
    global_cost = assignment_cost(tau, images, n_data, bank, args.cost, device) if track else None
    grid_noise = torch.randn([args.grid, *shape], generator=torch.Generator().manual_seed(0))
    grid_labels = (torch.arange(args.grid) % label_dim).to(device) if label_dim else None
    stop = StopFlag()
    sums, t_last, step_last = {}, time.time(), step
    log.start(step, total_steps)
    while step < total_steps:
        seed_step(args.seed, rank, world, step)  # dropout
        training = step >= pre_steps
        x0, x1, y, before, after, rec = assign_minibatch(
            tau, bank, images, labels, n_data, step, args, device, rank, world
        )
        if track:
            global_cost += (after.sum() - before.sum()).item() / n_eff  # only this minibatch's pairs changed
            if (step + 1) % args.cost_every == 0:
                global_cost = assignment_cost(tau, images, n_data, bank, args.cost, device)  # exact, no drift
        if training:
            lo, hi = rank * batch_rank, (rank + 1) * batch_rank
            g = generator_for(args.seed, step, 3)  # t and eps of the global batch: independent of world size
            t = torch.rand(args.batch, generator=g)[lo:hi].to(device)
            eps = torch.randn([args.batch, *shape], generator=g)[lo:hi].to(device) if args.sigma_min else None
            for group in opt.param_groups:  # linear warm-up over training steps, then constant (Table 4)
                group["lr"] = (  # min(k, W) / W over training steps k: the official code's schedule
                    args.lr * min(1.0, (step - pre_steps) / args.warmup) if args.warmup else args.lr
                )
            loss_sum, grad_norm = training_step(ddp, net, opt, (x0, x1, y, t, eps), lo, batch_gpu, args)
            ema_update(ema, net, args.ema)
            rec.update(loss=loss_sum, grad_norm=grad_norm, lr=opt.param_groups[0]["lr"])
            nimg += args.batch
        for k, v in rec.items():  # (sum, count): the loss exists only on training steps
            sums[k] = (sums.get(k, (0.0, 0))[0] + v, sums.get(k, (0.0, 0))[1] + 1)
        step += 1
        done = step >= total_steps
        stop_now = stop.any(device, rec.get("loss", 0.0) + rec.get("grad_norm", 0.0), step)
        if step % args.log_every == 0 or done or stop_now:
            n = max(step - step_last, 1)
            metrics = {k: all_mean(v / c, device) for k, (v, c) in sums.items()}
            extra = {} if global_cost is None else dict(global_cost=global_cost)
            log.log(step=step, epoch=step // spe, kimg=nimg / 1000, **metrics, **extra,
                    sec_per_step=(time.time() - t_last) / n)  # fmt: skip
            sums, t_last, step_last = {}, time.time(), step
        if step % args.snap_every == 0 or done or stop_now:
            if rank == 0:
                save_snapshot(args, net_kwargs, net, ema, opt, step, nimg, tau, n_data, training, grid_noise,
                              grid_labels, device)  # fmt: skip
            barrier()
        if stop_now:
            log.print(f"stopped by signal at step {step}; resume with --resume {args.outdir}")
            break
    dist_teardown()
    stop.exit()  # 143 after SIGTERM: the scheduler requeues the job


# --- generation ---


def generate(args):
    """--generate N images from --ckpt: uint8 NHWC npz (images, seeds) and a PNG grid of the first 64. Image i
    uses the noise of seed --seed + i (fresh noise, not the training caches): identical for any number of
    processes."""
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
    out_x, out_y, nfes = [], [], []
    for i in tqdm(range(0, len(seeds), args.gen_batch), disable=rank != 0, unit="batch"):
        noise, lab = inputs_for_seeds(seeds[i : i + args.gen_batch], shape, label_dim)
        lab = None if lab is None else lab.to(device)
        st = {}
        try:
            x, nfe = sample(net, noise.to(device), args.nfe, lab, args.solver, args.atol, args.rtol, st)
        except ValueError as e:
            fail(str(e))
        nfes.append((nfe, st.get("solver_steps", 0)))
        out_x.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
        out_y.append(lab.cpu() if lab is not None else torch.zeros(len(x), dtype=torch.long))
    mine = (
        seeds,
        torch.cat(out_x).numpy() if out_x else None,
        nfes,
        torch.cat(out_y).numpy() if out_y else None,
    )
    parts = [mine]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, mine)
    if rank == 0:
        nfes = [v for p in parts for v in p[2]]
        parts = [p for p in parts if p[0]]
        order = np.argsort(np.concatenate([p[0] for p in parts]), kind="stable")
        images = np.concatenate([p[1] for p in parts])[order]
        arrays = dict(images=images, seeds=np.arange(args.seed, args.seed + args.generate))
        if label_dim:
            arrays["labels"] = np.concatenate([p[3] for p in parts])[order]
        tmp = f"{args.out}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, args.out)
        grid = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 127.5 - 1
        save_image_grid(grid, os.path.splitext(args.out)[0] + ".png")
        print(
            f"wrote {len(images)} images to {args.out} ({args.solver}: mean NFE {np.mean(nfes, 0)[0]:.1f} "
            f"network calls = solver function evaluations, {np.mean(nfes, 0)[1]:.1f} solver steps)",
            flush=True,
        )
    dist_teardown()


# --- command line ---


def _ints(s):
    return [int(v) for v in s.split(",") if v]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="LOOM-CFM: flow matching with a persistent minibatch-refined OT assignment.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=None, help="training images: cifar10 | shapes | FILE.npz | DIR")
    p.add_argument("--data-dir", default="datasets", help="where --data cifar10 is looked for / downloaded")
    p.add_argument(
        "--xflip", nargs="?", const="random", default="off", choices=["off", "random", "copies"],
        help="mirror images (official code: on): random = each visit with prob. 1/2, the mirror its own "
        "index with its own caches (bare --xflip); copies = both versions every epoch",
    )  # fmt: skip
    p.add_argument(
        "--cond", action="store_true", help="class-conditional: labels to the net, Eq. 9 solved per class"
    )
    p.add_argument("--outdir", default="runs/loom", help="checkpoints, grids, log.jsonl, args.json")
    p.add_argument(
        "--caches", type=int, default=4, help="noises per image, Sec. 3.2 (Table 1/4: 4; official config: 6)"
    )
    p.add_argument(
        "--cost",
        default="l2",
        choices=["sqeuclidean", "l2"],
        help="c(x, z): l2 = ||x - z|| (App. B, the official code); sqeuclidean = Sec. 3.1's ||x - z||^2",
    )
    p.add_argument(
        "--noise-store", default="regenerate", choices=["regenerate", "memory"], help="noise of ids"
    )
    p.add_argument(
        "--no-reassign", action="store_true", help="ablation: fixed source, tau stays the identity"
    )
    p.add_argument("--fresh-noise", action="store_true", help="ablation: BatchOT, new noise every step")
    p.add_argument(
        "--train-after-convergence", type=int, default=0, metavar="EPOCHS",
        help="ablation: this many assignment-only epochs before training starts",
    )  # fmt: skip
    p.add_argument("--cost-every", type=int, default=5000, help="steps between exact global costs (0: off)")
    p.add_argument("--sigma-min", type=float, default=1e-7, help="CFM sigma of Eq. 3 (Table 4: 1e-7)")
    p.add_argument(
        "--arch",
        default="ddpmpp",
        choices=["ddpmpp", "adm"],
        help="the UNet: the shared DDPM++ or ADM (the papers' ADM-style net: --arch adm --channel-mult "
        "1,2,2,2 --num-blocks 2: 4 heads of 64 channels at 16x16)",
    )
    p.add_argument(
        "--time-scale", type=float, default=1.0, help="the UNet sees time_scale * t (official code: t itself)"
    )
    p.add_argument("--batch", type=int, default=128, help="global batch = LOOM minibatch (Table 4: 128)")
    p.add_argument(
        "--batch-gpu", type=int, default=None, help="samples per forward pass (accumulate the rest)"
    )
    p.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (Table 4)")
    p.add_argument(
        "--warmup", type=int, default=5000, help="lr x min(k, W) / W over training steps k (Table 4: 5k)"
    )
    p.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (0: off)")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay per step (Table 4)")
    p.add_argument("--duration", type=float, default=50.0, help="training Mimg (Table 4: 391k steps of 128)")
    p.add_argument("--model-channels", type=int, default=128, help="UNet base width (Table 4: 128)")
    p.add_argument("--channel-mult", type=_ints, default=[1, 2, 2, 2], help="width multipliers (Table 4)")
    p.add_argument("--num-blocks", type=int, default=2, help="residual blocks per resolution (Table 4)")
    p.add_argument(
        "--attn-res", type=_ints, default=[16], help="resolutions with self-attention (Table 4: 16)"
    )
    p.add_argument("--dropout", type=float, default=0.1, help="dropout (Table 4: 0.1)")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny UNet (CPU smoke runs)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order, caches, noise ids, t")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    p.add_argument("--snap-every", type=int, default=5000, help="steps between checkpoints and image grids")
    p.add_argument("--grid", type=int, default=64, help="images per snapshot grid; 0: none")
    p.add_argument("--grid-nfe", type=_ints, default=[1, 20], help="Euler NFEs of the snapshot grids")
    p.add_argument("--resume", default=None, help="checkpoint file or run folder: weights and the assignment")
    p.add_argument("--overwrite", action="store_true", help="replace a run in --outdir or an existing --out")
    p.add_argument(
        "--generate", type=int, default=0, metavar="N", help="generate N images from --ckpt instead"
    )
    p.add_argument("--ckpt", default=None, help="loom_cfm checkpoint (or run folder) for --generate")
    p.add_argument("--out", default="samples.npz", help="output .npz of --generate (a .png grid beside it)")
    p.add_argument("--solver", default="midpoint", choices=["euler", "midpoint", "dopri5"], help="ODE solver")
    p.add_argument("--nfe", type=int, default=8, help="--generate: evaluations for euler / midpoint (4/8/12)")
    p.add_argument("--atol", type=float, default=1e-5, help="dopri5 absolute tolerance (official code)")
    p.add_argument("--rtol", type=float, default=1e-5, help="dopri5 relative tolerance (official code)")
    p.add_argument("--gen-batch", type=int, default=256, help="images per sampling batch in --generate")
    add_speed_args(p)
    args = p.parse_args(argv)
    check_numbers(p, args, ("batch", "batch_gpu", "duration", "atol", "rtol"), ("lr",))
    if args.generate:
        if not args.ckpt:
            p.error("--generate needs --ckpt")
    elif not args.data:
        p.error("--data is required for training (cifar10 | shapes | FILE.npz | DIR)")
    if args.tiny:
        args.model_channels, args.channel_mult, args.num_blocks, args.attn_res = 16, [1, 2], 1, [8]
    if args.caches < 1:
        p.error(f"--caches must be at least 1, got {args.caches}")
    if args.no_reassign and args.fresh_noise:
        p.error("--no-reassign and --fresh-noise are different ablations: choose one")
    for name in ("batch", "duration", "log_every", "snap_every", "gen_batch", "time_scale"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if min(args.warmup, args.cost_every, args.train_after_convergence) < 0 or args.sigma_min < 0:
        p.error("--warmup, --cost-every, --train-after-convergence and --sigma-min must be >= 0")
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


# --- shared: flow matching (identical in cfm_couplings, loom_cfm) ---
# The velocity network, the CFM loss, the exact minibatch OT permutation and the ODE samplers.


class VelocityNet(nn.Module):
    """v_theta(x, t, class_labels=None) -> dx/dt: the shared UNet (arch ddpmpp | adm) on (x, time_scale * t),
    t in [0, 1]. class_labels: int64 class indices [N] or one-hot floats [N, label_dim]."""

    def __init__(self, img_resolution, img_channels, label_dim=0, time_scale=1000.0, arch="ddpmpp", **unet):
        super().__init__()
        self.img_resolution, self.img_channels, self.label_dim = img_resolution, img_channels, label_dim
        self.time_scale = time_scale
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


def cfm_loss(net, x0, x1, t, labels=None, sigma_min=0.0, eps=None):
    """Per-sample CFM loss [N] (LOOM Eq. 3 with x = x1 data, z = x0 noise): the network at
    x_t = t x1 + (1 - t) x0 + sigma_min eps regresses the path's constant velocity x1 - x0."""
    tb = t.reshape(-1, *[1] * (x1.ndim - 1))  # broadcast over any data shape (images, toy vectors)
    xt = tb * x1 + (1 - tb) * x0
    if sigma_min:
        xt = xt + sigma_min * eps
    return (net(xt, t, labels) - (x1 - x0)).square().flatten(1).mean(1)


def pair_cost(x0, x1, cost="sqeuclidean"):
    """C[j, i] = ||x1_j - x0_i||^2 (cost sqeuclidean) or ||x1_j - x0_i|| (cost l2), float64 [n1, n0]:
    rows are images, columns noises (the transport cost c(x, z) of LOOM Eq. 7)."""
    c = torch.cdist(x1.flatten(1).double(), x0.flatten(1).double())
    return c if cost == "l2" else c.square()


def ot_permutation(x0, x1, cost="sqeuclidean"):
    """Exact minibatch OT (BatchOT; LOOM Eq. 7 on one minibatch) -> perm with x0[perm[j]] the noise of x1[j].
    The images stay where they are and the noise moves: permuting x1 instead would detach images from their
    labels and indices (the classic bug). With uniform marginals the optimal plan is a permutation matrix, so
    every noise and every image is used exactly once (no sampling from the plan with replacement)."""
    from scipy.optimize import linear_sum_assignment

    _, cols = linear_sum_assignment(pair_cost(x0, x1, cost).cpu().numpy())  # rows come back as 0..n-1
    return torch.as_tensor(cols, dtype=torch.long, device=x0.device)


def path_cost(x0, x1, cost="sqeuclidean"):
    """c(x1_j, x0_j) per pair [N] (the diagonal of pair_cost)."""
    d = (x1.double() - x0.double()).flatten(1).square().sum(1)
    return d.sqrt() if cost == "l2" else d


# --- sampling: integrate dx/dt = v(x, t) from t = 0 (noise) to t = 1 (data) (LOOM Eq. 1-2) ---


@torch.no_grad()
def euler_sample(net, x, steps, labels=None):
    """Euler: x <- x + h v(x, t), h = 1 / steps; steps NFE."""
    h = 1.0 / steps
    for i in range(steps):
        x = x + h * net(x, i * h, labels)
    return x


@torch.no_grad()
def midpoint_sample(net, x, steps, labels=None):
    """Explicit midpoint (RK2): x <- x + h v(x + h/2 v(x, t), t + h/2); 2 NFE per step."""
    h = 1.0 / steps
    for i in range(steps):
        t = i * h
        x_mid = x + 0.5 * h * net(x, t, labels)
        x = x + h * net(x_mid, t + 0.5 * h, labels)
    return x


class _ODEFunc:
    """dx/dt = net(x, t) as torchdiffeq calls it, f(t, x), counting what the papers count: every call is one
    function evaluation (torchcfm's NFE), every attempted step one callback (what the official LOOM code logs
    as num_steps; an attempted step of dopri5 costs 6 evaluations, FSAL)."""

    def __init__(self, net, labels):
        self.net, self.labels, self.nfe, self.steps, self.accepted = net, labels, 0, 0, 0

    def __call__(self, t, x):
        self.nfe += 1
        return self.net(x, t, self.labels).to(x.dtype)

    def callback_step(self, t0, y0, dt):
        self.steps += 1

    def callback_accept_step(self, t0, y0, dt):
        self.accepted += 1


@torch.no_grad()
def dopri5_sample(net, x, labels=None, atol=1e-5, rtol=1e-5, stats=None):
    """Adaptive Dormand-Prince 5(4) from t = 0 to 1 with torchdiffeq's `odeint(method="dopri5")`, the solver
    of torchcfm's compute_fid.py and the LOOM code (both atol = rtol = 1e-5) -> (x, function evaluations).
    The batch is one ODE system (RMS error norm over all its elements), so every image gets the same steps.
    `stats` (a dict) receives nfe_torchdiffeq, solver_steps (attempted), accepted_steps, rejected_steps."""
    from torchdiffeq import odeint

    if not (atol > 0 and rtol > 0):  # zero tolerances never accept a step: the solve would not end
        raise ValueError(f"dopri5 needs atol > 0 and rtol > 0, got atol={atol}, rtol={rtol}")

    f = _ODEFunc(net, labels)
    x = x if x.dtype == torch.float64 else x.float()
    t = torch.tensor([0.0, 1.0], dtype=x.dtype, device=x.device)
    x = odeint(f, x, t, method="dopri5", atol=atol, rtol=rtol)[-1]
    if stats is not None:
        stats.update(nfe_torchdiffeq=f.nfe, solver_steps=f.steps, accepted_steps=f.accepted,
                     rejected_steps=f.steps - f.accepted)  # fmt: skip
    return x, f.nfe


def build_net(net_kwargs):
    """The trained network: a velocity field net(x, t, class_labels=None) with t = 0 noise, t = 1 data."""
    return VelocityNet(**net_kwargs)


def sample(net, noise, nfe, labels=None, solver="euler", atol=1e-5, rtol=1e-5, stats=None):
    """noise [N, C, H, W] standard normal -> (images, NFE used). euler: nfe steps; midpoint: nfe / 2
    steps (nfe even); dopri5: torchdiffeq with atol/rtol, nfe ignored, its function evaluations returned.
    `stats` (a dict, optional) receives the solver's step counts (see dopri5_sample)."""
    if solver == "dopri5":
        return dopri5_sample(net, noise, labels, atol, rtol, stats)
    if solver not in ("euler", "midpoint"):
        raise ValueError(f"unknown solver {solver!r}; expected euler, midpoint or dopri5")
    if nfe < 1 or (solver == "midpoint" and nfe % 2):
        raise ValueError(
            f"{solver} needs {'an even NFE >= 2' if solver == 'midpoint' else 'NFE >= 1'}, got {nfe}"
        )
    if stats is not None:
        stats.update(solver_steps=nfe if solver == "euler" else nfe // 2)
    if solver == "euler":
        return euler_sample(net, noise, nfe, labels), nfe
    return midpoint_sample(net, noise, nfe // 2, labels), nfe


def inputs_for_seeds(seeds, shape, label_dim=0):
    """Image i's noise, then its class label, from a generator seeded with seeds[i] (the same noise and label
    as every other method file and gen_pairs.py use for that seed)."""
    noise, labels = [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        noise.append(torch.randn(shape, generator=g))
        if label_dim:
            labels.append(torch.randint(label_dim, [], generator=g))
    return torch.stack(noise), (torch.tensor(labels, dtype=torch.long) if label_dim else None)


def ode_velocity(net, x, t, labels=None):
    """dx/dt on the common clock (t = 0 noise, t = 1 data): this file's own convention, so v_theta itself."""
    return net(x, t, labels)


def predict_x1(x, t, v):
    """The image the current velocity points at: x + (1 - t) v (the end of the straight path through x)."""
    t = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.ndim - 1))
    return x + (1 - t) * v


# --- end shared: flow matching ---


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

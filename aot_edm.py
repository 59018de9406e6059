"""AOT: EDM trained with Approximated Optimal Transport (Kim et al., "Improving Diffusion-Based Generative
Models via Approximated Optimal Transport", 2024).

EDM (edm_teacher.py) pairs every training image with independent noise. AOT instead draws a round of N images
and N standard-normal noises, solves the assignment problem between them (Eq. 8, the Hungarian algorithm on
the L2 cost between image and noise), and trains EDM's denoiser on the assigned pairs: the noisy input is
x = y + sigma * eps' with eps' the noise chosen for y. The N pairs are consumed as minibatches until each has
been used once, then the next round is drawn (Alg. 1). For class-conditional data the assignment is solved
within each class (Alg. 2), so every class keeps exactly the noises it drew: the noise marginal stays N(0, I)
and labels stay independent of the noise. Everything else (network, preconditioning, loss, sigma law, EMA,
learning rate, Heun sampler) is EDM's, in the same code as edm_teacher.py (a fenced shared block).

Convention (EDM): sigma in [0.002, 80]; sampling starts at x = 80 * noise and ends at sigma = 0. The paper
sweeps the schedule exponent rho (3..421) and the number of Heun steps (8..18): `sample(..., rho=...)`.

Distributed policy (the paper's): every process draws its own rounds of --aot-pairs N pairs and solves them
alone; rank k takes images k*N..(k+1)*N-1 of the global round's slice of the epoch stream, so every image is
still used once per epoch. Pairs therefore depend on the number of processes (as in the paper); the rest of
the run is seeded as edm_teacher.py.

--overlap on (the default): round r + 1's Hungarian solve runs in a background thread while round r trains
and is joined when round r + 1 starts, so the device does not wait for scipy; the assignments, and the run,
are the serial ones (--overlap off) exactly.

Commands
  CPU smoke run on a synthetic dataset (tiny net, pools of 128 pairs):
    python aot_edm.py --data shapes --outdir runs/aot-shapes --tiny --duration 0.05 --batch 64 --aot-pairs 128
  The paper's unconditional CIFAR-10 run (Sec. 5.1: batch 256 on 4 GPUs, N = 512 pairs per GPU):
    torchrun --standalone --nproc_per_node=4 aot_edm.py --data cifar10 --outdir runs/aot-cifar10
  (EDM's augmentation, p = 0.12 with its 9-dim label, is on by default for cifar10: each round is augmented,
  then its noise is assigned, as in the public EDM-AOT code; --augment 0 turns it off.)
  Conditional (batch 128, N = 2048): add --cond (the defaults of --batch and --aot-pairs follow it)
  Sample with the paper's best schedule, and sweep rho x steps (Table 4) with evaluate.py's FID:
    python aot_edm.py --generate 50000 --ckpt runs/aot-cifar10 --steps 14 --rho 90 --out aot.npz
    python aot_edm.py --sweep-rho --ckpt runs/aot-cifar10 --rhos 3,7,27,90 --sweep-steps 8,14,18 \\
        --num-images 50000 --out-json sweep.json
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
import threading
import time
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# --- method: EDM with Approximated Optimal Transport (Kim et al.) ---
# AOT changes only which noise goes with which image (Alg. 1-2, below). EDM's preconditioning, loss, sampler
# and augmentation are the first blocks of the shared appendix at the end of this file (as in edm_teacher).
METHOD = "aot_edm"
VERSION = 1


# --- AOT: the assignment of one round (Alg. 1-2, Eq. 8) ---


def aot_cost(eps, y, cost="l2"):
    """W[i, j] = ||y_i - eps_j|| (AOT Sec. 4: L2 between the i-th image and the j-th noise), or its square
    (--cost sqeuclidean), float64 [N, N]."""
    w = torch.cdist(y.flatten(1).double(), eps.flatten(1).double())
    return w.square() if cost == "sqeuclidean" else w


def aot_assign(eps, y, labels=None, cost="l2"):
    """AOT Eq. 8 -> perm: image i trains with noise eps[perm[i]], a permutation of the round's noises.
    With labels, Alg. 2: solved within each class on that class's positions, so the noises of a class's
    positions are only permuted among themselves (the multiset per class is unchanged)."""
    from scipy.optimize import linear_sum_assignment

    n = len(y)
    perm = torch.arange(n)
    groups = (
        [perm.clone()]
        if labels is None
        else [torch.nonzero(labels.cpu() == k).flatten() for k in labels.cpu().unique()]
    )
    for g in groups:
        gd = g.to(y.device)
        _, cols = linear_sum_assignment(aot_cost(eps[gd], y[gd], cost).cpu().numpy())
        perm[g] = g[torch.as_tensor(cols, dtype=torch.long)]
    return perm


def pair_cost(eps, y, cost="l2"):
    """c(eps_i, y_i) per pair [N], float64."""
    d = (y.double() - eps.double()).flatten(1).square().sum(1)
    return d if cost == "sqeuclidean" else d.sqrt()


def draw_sigma(n, P_mean, P_std, device):
    """EDM's training noise levels, ln(sigma) ~ N(P_mean, P_std^2), drawn exactly as edm_loss draws them."""
    return (torch.randn(n, 1, 1, 1, device=device) * P_std + P_mean).exp()


class Rounds:
    """This process's rounds of N pairs (Alg. 1). Round r takes images r*N*world + rank*N ... of the epoch
    stream (batch_indices with batch N * world) and N noises; step s uses rows (s mod N/B) * B ... of round
    s // (N/B). A round's noise is drawn from the global generator right after the round's first step is
    seeded and its sigmas drawn, so that with N = B and no assignment every draw is edm_teacher.py's.

    --overlap on: as soon as round r is built, round r + 1's inputs (a function of (seed, world, rank, r + 1)
    only, drawn under a forked RNG) go to a background thread that solves their assignment while round r
    trains (scipy's solver releases the GIL); round r + 1 joins it. The assignments are the serial ones
    exactly, and nothing of the thread is in a checkpoint: a resumed run rebuilds its round and restarts the
    thread."""

    def __init__(self, args, images, labels, n_data, shape, device, rank, world):
        self.args, self.images, self.labels, self.n_data = args, images, labels, n_data
        self.shape, self.device, self.rank, self.world = shape, device, rank, world
        self.B = args.batch // world
        self.per_round = args.aot_pairs // self.B
        self.cached = self.pending = None
        self.end_step = None  # no prefetch of a round that starts at or after this step
        self.cuda = [device.index or 0] if device.type == "cuda" else []

    def inputs(self, r):
        """Round r's (augmented images, labels, augment labels, noise), drawn as edm_teacher's first step of
        the round draws its noise (seed_step, the step's sigmas, then the noise from the global RNG)."""
        a = self.args
        idx = batch_indices(self.n_data, a.aot_pairs * self.world, r, a.seed)
        idx = idx[self.rank * a.aot_pairs : (self.rank + 1) * a.aot_pairs]
        y, lab = get_batch(self.images, self.labels, idx, self.device)
        aug = None
        if a.augment > 0:  # as EDM-AOT: the round is augmented first, then the noise is assigned to it
            g = torch.Generator().manual_seed(
                int(np.random.SeedSequence([a.seed, self.world, self.rank, r]).generate_state(1)[0])
            )
            y, aug = edm_augment(y, a.augment, generator=g)
        seed_step(a.seed, self.rank, self.world, r * self.per_round)
        draw_sigma(self.B, a.P_mean, a.P_std, self.device)  # the first step's sigmas come first
        eps = torch.randn([a.aot_pairs, *self.shape], device=self.device)
        return y, lab, aug, eps

    def solve(self, eps, y, lab):
        """(perm, seconds) of AOT Eq. 8 for one round (the identity with --assign 0)."""
        t0 = time.time()
        perm = aot_assign(eps, y, lab, self.args.cost) if self.args.assign else torch.arange(len(y))
        return perm, time.time() - t0

    def prefetch(self, r):
        """Start solving round r in a background thread, from inputs drawn without touching the RNGs."""
        with torch.random.fork_rng(devices=self.cuda):
            y, lab, _, eps = self.inputs(r)
        out = {}

        def work():
            try:
                out["perm"], out["solve_s"] = self.solve(eps, y, lab)
            except BaseException as e:  # handed to the training thread, which stops with one line
                out["error"] = e

        thread = threading.Thread(target=work, name=f"aot-solve-round-{r}", daemon=True)
        thread.start()
        self.pending = (r, thread, out)

    def take(self, r, eps, y, lab):
        """Round r's (perm, solve seconds): the background thread's when it holds round r, else solved now."""
        pending, self.pending = self.pending, None
        if pending is None or pending[0] != r:
            if pending is not None:
                pending[1].join()  # a stale round (resumed elsewhere): let it finish, drop its answer
            return self.solve(eps, y, lab)
        _, thread, out = pending
        thread.join()
        if "error" in out:
            e = out["error"]
            fail(
                f"the background assignment solve of round {r} failed: {type(e).__name__}: {e} "
                "(run with --overlap off to solve in the training thread)"
            )
        return out["perm"], out["solve_s"]

    def close(self):
        """Wait for a background solve still running (the end of training)."""
        if self.pending is not None:
            self.pending[1].join()
            self.pending = None

    def make(self, r):
        y, lab, aug, eps = self.inputs(r)
        t0 = time.time()
        perm, solve_s = self.take(r, eps, y, lab)
        wait_s = time.time() - t0
        if self.args.overlap and (self.end_step is None or (r + 1) * self.per_round < self.end_step):
            self.prefetch(r + 1)
        perm = perm.to(self.device)
        stats = dict(
            solve_s=solve_s / self.per_round,  # per training step, as the round is used
            wait_s=wait_s / self.per_round,  # what training waited for it (--overlap on: only a late solve)
            cost_before=pair_cost(eps, y, self.args.cost).mean().item(),
            cost_after=pair_cost(eps[perm], y, self.args.cost).mean().item(),
        )
        self.cached = (r, y, lab, aug, eps[perm], stats)

    def step(self, step):
        """(images, labels, assigned noise, round stats, augment labels) of this process for one step."""
        r = step // self.per_round
        if self.cached is None or self.cached[0] != r:
            if step % self.per_round == 0:
                self.make(r)  # leaves the generator where edm_teacher's step would be after its noise
            else:  # resumed inside a round: rebuild it without disturbing this step's random state
                with torch.random.fork_rng(devices=self.cuda):
                    self.make(r)
        _, y, lab, aug, eps, stats = self.cached
        rows = slice((step % self.per_round) * self.B, (step % self.per_round + 1) * self.B)
        lab, aug = (None if v is None else v[rows] for v in (lab, aug))
        return y[rows], lab, eps[rows], stats, aug


# --- training ---


def training_step(ddp, net, opt, pairs, batch_gpu, args, world):
    """One optimiser step on this rank's assigned pairs (y, labels, noise, augment labels, sigma) -> its mean
    loss: EDM's step, accumulated over --batch-gpu chunks, on the pairs of AOT Alg. 1 line 13."""
    y, lab, eps, aug, sigma = pairs
    opt.zero_grad(set_to_none=True)
    loss_sum, chunks = 0.0, list(range(0, len(y), batch_gpu))
    for j, lo in enumerate(chunks):
        sl = slice(lo, lo + batch_gpu)
        sync = j == len(chunks) - 1 or world == 1
        with contextlib.nullcontext() if sync else ddp.no_sync():
            lab_sl, aug_sl = (None if a is None else a[sl] for a in (lab, aug))
            loss = edm_loss(ddp, y[sl], lab_sl, args.P_mean, args.P_std, sigma=sigma[sl], n=eps[sl],
                            augment_labels=aug_sl)  # fmt: skip
            loss.sum().mul(1 / len(y)).backward()  # EDM: sum over the batch / per-rank batch
        loss_sum += loss.detach().mean().item() * batch_gpu / len(y)
    for p in net.parameters():  # EDM: non-finite gradient entries are replaced, not propagated
        if p.grad is not None:
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
    opt.step()
    return loss_sum


def save_snapshot(args, net_kwargs, net, ema, opt, step, nimg, grid_noise, grid_labels, device):
    """Rank 0: the checkpoint (the round is rebuilt from its seed on resume) and a grid of EMA samples."""
    ckpt = dict(method=METHOD, version=VERSION, args=vars(args), net_kwargs=net_kwargs, net=net.state_dict(),
                ema=ema.state_dict(), opt=opt.state_dict(), step=step, kimg=nimg / 1000,
                state=dict(nimg=nimg))  # fmt: skip
    save_checkpoint(ckpt, args.outdir, step)
    if args.grid:
        labels = None if grid_labels is None else grid_labels.to(device)
        x, _ = sample(ema, grid_noise.to(device), 2 * args.grid_steps - 1, labels)
        save_image_grid(x, os.path.join(args.outdir, f"grid-{step:07d}.png"))


def run_net_kwargs(args, shape, label_dim, ckpt, log):
    """The network this run trains -> net_kwargs: EDM's from the flags, or the resumed run's."""
    res, levels = shape[-1], len(args.channel_mult)
    if res % 2 ** (levels - 1):
        fail(f"image size {res} is not divisible by 2^{levels - 1} (--channel-mult has {levels} levels)")
    net_kwargs = dict(img_resolution=res, img_channels=shape[0], label_dim=label_dim,
                      augment_dim=args.augment_dim, model_channels=args.model_channels,
                      channel_mult=list(args.channel_mult), num_blocks=args.num_blocks,
                      attn_resolutions=list(args.attn_res), arch=args.arch, dropout=args.dropout)  # fmt: skip
    if ckpt is not None:
        keys = ("data", "batch", "seed", "xflip", "cond", "lr", "aot_pairs", "assign", "cost", "augment")
        net_kwargs = resumed_net_kwargs(ckpt, net_kwargs, args, log, keys)
    return net_kwargs


def train(args):
    rank, world, device = dist_setup()
    log = Logger(args.outdir, rank)
    torch.backends.cudnn.benchmark = True  # as EDM: fastest kernels for training, tf32 off (full fp32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    batch_rank, batch_gpu = split_batch(args, world)
    if args.aot_pairs % batch_rank:
        fail(
            f"--aot-pairs {args.aot_pairs} (pairs per process and round) must be a multiple of the "
            f"per-process batch {batch_rank} (= --batch / processes): rounds are used in whole batches"
        )
    ckpt = resume_checkpoint(args, METHOD)
    images, labels = load_images(args.data, args.data_dir)
    if args.cond and labels is None:
        fail(f"--cond needs class labels, but {args.data} has none (npz key 'labels' or dataset.json)")
    n_data = len(images) * (2 if args.xflip else 1)
    label_dim = int(labels.max()) + 1 if args.cond else 0
    if args.cond and args.aot_pairs < label_dim:
        fail(f"--aot-pairs {args.aot_pairs} is smaller than the {label_dim} classes: Alg. 2 solves per class")
    if args.aot_pairs * world > n_data:
        fail(f"a round of {args.aot_pairs} pairs x {world} processes exceeds the {n_data} training images")
    net_kwargs = run_net_kwargs(args, tuple(images.shape[1:]), label_dim, ckpt, log)
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    net = build_net(net_kwargs).to(device).train()
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    opt = torch.optim.Adam(
        net.parameters(), lr=args.lr, betas=(0.9, 0.999), eps=1e-8, **optimizer_kwargs(args, device)
    )
    step, nimg = 0, 0
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
            f"{len(images)} images {tuple(images.shape[1:])}, {sum(p.numel() for p in net.parameters())} "
            f"parameters, {world} process(es) on {device}; rounds of {args.aot_pairs} pairs per process "
            f"({args.aot_pairs // batch_rank} steps each), assignment {'on' if args.assign else 'off'}"
        )
    images = images.to(device)
    labels = None if labels is None or not args.cond else labels.to(device)
    shape = tuple(images.shape[1:])
    rounds = Rounds(args, images, labels, n_data, shape, device, rank, world)
    rounds.end_step = math.ceil(round(args.duration * 1e6) / args.batch)
    grid_noise, grid_labels = noise_for_seeds(range(args.grid), shape, label_dim)
    stop, total = StopFlag(), round(args.duration * 1e6)
    sums, t_last, step_last = {}, time.time(), step
    log.start(step, math.ceil(total / args.batch))
    while nimg < total:
        seed_step(args.seed, rank, world, step)
        sigma = draw_sigma(batch_rank, args.P_mean, args.P_std, device)
        y, lab, eps, stats, aug = rounds.step(step)  # AOT Alg. 1: this step's slice of the assigned pairs
        for g in opt.param_groups:  # EDM's linear learning-rate ramp-up over --lr-rampup Mimg (0: none)
            g["lr"] = args.lr * (min(nimg / (args.lr_rampup * 1e6), 1) if args.lr_rampup > 0 else 1)
        loss_sum = training_step(ddp, net, opt, (y, lab, eps, aug, sigma), batch_gpu, args, world)
        ema_update(ema, net, edm_ema_beta(args.batch, nimg, args.ema, args.ema_rampup))
        rec = dict(loss=loss_sum, **stats)
        for k, v in rec.items():
            sums[k] = sums.get(k, 0.0) + v
        nimg, step = nimg + args.batch, step + 1
        done, stop_now = nimg >= total, stop.any(device, loss_sum, step)
        if step % args.log_every == 0 or done or stop_now:
            n = max(step - step_last, 1)
            metrics = {k: all_mean(v / n, device) for k, v in sums.items()}
            log.log(step=step, kimg=nimg / 1000, **metrics, lr=opt.param_groups[0]["lr"],
                    sec_per_step=(time.time() - t_last) / n)  # fmt: skip
            sums, t_last, step_last = {}, time.time(), step
        if step % args.snap_every == 0 or done or stop_now:
            if rank == 0:
                save_snapshot(args, net_kwargs, net, ema, opt, step, nimg, grid_noise, grid_labels, device)
            barrier()
        if stop_now:
            log.print(f"stopped by signal at step {step}; resume with --resume {args.outdir}")
            break
    rounds.close()
    dist_teardown()
    stop.exit()  # 143 after SIGTERM: the scheduler requeues the job


# --- generation and the rho sweep ---


def generate(args):
    """Write --generate N images (uint8 NHWC npz with seeds and labels, plus a PNG grid of the first 64).
    Image i's noise and label come from seed --seed + i: identical for any number of processes."""
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
        noise, lab, gens = noise_for_seeds(
            seeds[i : i + args.gen_batch], shape, label_dim, with_generators=True
        )
        churn = dict(S_churn=args.S_churn, S_min=args.S_min, S_max=args.S_max, S_noise=args.S_noise)
        lab = None if lab is None else lab.to(device)
        x, nfe = sample(net, noise.to(device), 2 * args.steps - 1, lab, rho=args.rho, generator=gens, **churn)
        out_x.append((x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu())
        out_y.append(lab if lab is not None else torch.zeros(len(x), dtype=torch.long))
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
        print(
            f"wrote {len(images)} images to {args.out} ({args.steps} Heun steps, rho {args.rho:g}, NFE {nfe})"
        )
    dist_teardown()


def sweep_rho(args):
    """AOT Table 4: a metric over rho x Heun steps for one checkpoint, through evaluate.py (same protocol,
    same noise for every cell). One evaluate run per rho, the step counts as its NFE list (NFE = 2 steps - 1).
    evaluate.py's own flags (--metrics fid, --ref-stats, --feature-extractor, ...) follow --eval-args."""
    import evaluate  # a tool, not a method file: imported only here

    grid = {}
    nfes = [2 * s - 1 for s in args.sweep_steps]
    for rho in args.rhos:
        argv = ["--ckpt", args.ckpt, "--nfe", ",".join(map(str, nfes)), "--sampler-kw", f"rho={rho:g}"]
        argv += ["--num-images", str(args.num_images), "--seed", str(args.seed)]
        if "--fid-seeds" not in args.eval_args:  # AOT Sec. 5.1 / EDM: the lowest of three measurements
            argv += ["--fid-seeds", str(args.fid_seeds)]
        argv += args.eval_args
        for row in evaluate.main(argv):  # one row per NFE (= per step count) at this rho
            if "nfe_requested" in row and args.metric in row:
                grid[(rho, (row["nfe_requested"] + 1) // 2)] = row[args.metric]
    if int(os.environ.get("RANK", 0)) == 0:
        print(
            f"\n{args.metric} by rho (rows) and Heun steps (columns), {args.num_images} images each"
            f" (the lowest of {args.fid_seeds} seed ranges for fid)"
        )
        print("rho    " + "".join(f"{s:>10d}" for s in args.sweep_steps))
        for rho in args.rhos:
            print(
                f"{rho:<7g}" + "".join(f"{grid.get((rho, s), float('nan')):>10.4g}" for s in args.sweep_steps)
            )
        if args.out_json:
            out = dict(ckpt=args.ckpt, metric=args.metric, rhos=args.rhos, steps=args.sweep_steps,
                       table=[[grid.get((r, s)) for s in args.sweep_steps] for r in args.rhos])  # fmt: skip
            tmp = f"{args.out_json}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(out, f, indent=2)
            os.replace(tmp, args.out_json)


# --- command line ---


ARCH_WIDTHS = {
    "ddpmpp": dict(model_channels=128, channel_mult=[2, 2, 2], num_blocks=4, attn_res=[16]),
    "adm": dict(model_channels=192, channel_mult=[1, 2, 3, 4], num_blocks=3, attn_res=[32, 16, 8]),
}


def _ints(s):
    return [int(v) for v in s.split(",") if v]


def _floats(s):
    return [float(v) for v in s.split(",") if v]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="EDM with Approximated Optimal Transport (Kim et al.): train, generate, sweep rho.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--data", help="cifar10 | shapes | FILE.npz (uint8 NHWC 'images', optional 'labels') | DIR"
    )
    p.add_argument("--data-dir", default="datasets", help="where --data cifar10 is looked for / downloaded")
    p.add_argument("--outdir", default="runs/aot", help="checkpoints, grids, log.jsonl, args.json")
    p.add_argument("--cond", action="store_true", help="class-conditional: Alg. 2, solved within each class")
    p.add_argument("--xflip", action="store_true", help="mirrored copies of every image (the augmentation)")
    p.add_argument(
        "--aot-pairs", type=int, default=None, help="N pairs per process and round (512; 2048 --cond)"
    )
    p.add_argument("--cost", default="l2", choices=["l2", "sqeuclidean"], help="assignment cost (paper: L2)")
    p.add_argument("--assign", type=int, default=1, choices=[0, 1], help="0: rounds without the assignment")
    p.add_argument(
        "--overlap",
        default="on",
        choices=["on", "off"],
        help="on: round r + 1's solve runs in a background thread while round r trains (same assignments)",
    )
    p.add_argument("--batch", type=int, default=None, help="global batch (Sec. 5.1: 256; 128 with --cond)")
    p.add_argument(
        "--batch-gpu", type=int, default=None, help="images per forward pass (accumulate the rest)"
    )
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (EDM CIFAR-10: 1e-3)")
    p.add_argument("--lr-rampup", type=float, default=10, help="linear lr warm-up, Mimg (EDM: 10)")
    p.add_argument("--duration", type=float, default=200, help="training length, Mimg (EDM CIFAR-10: 200)")
    p.add_argument("--ema", type=float, default=500, help="EMA half-life, kimg (EDM: 500)")
    p.add_argument("--ema-rampup", type=float, default=0.05, help="EMA ramp-up ratio (EDM: 0.05)")
    p.add_argument("--dropout", type=float, default=0.13, help="dropout (EDM CIFAR-10: 0.13)")
    p.add_argument("--P-mean", type=float, default=-1.2, help="mean of ln(sigma) in training (EDM: -1.2)")
    p.add_argument("--P-std", type=float, default=1.2, help="std of ln(sigma) in training (EDM: 1.2)")
    p.add_argument(
        "--arch", default="ddpmpp", choices=sorted(ARCH_WIDTHS), help="DDPM++ or ADM (EDM's ImageNet)"
    )
    p.add_argument("--model-channels", type=int, default=None, help="UNet base width (DDPM++ 128, ADM 192)")
    p.add_argument(
        "--channel-mult", type=_ints, default=None, help="per-resolution widths (2,2,2; ADM 1,2,3,4)"
    )
    p.add_argument("--num-blocks", type=int, default=None, help="residual blocks per resolution (4; ADM 3)")
    p.add_argument(
        "--attn-res", type=_ints, default=None, help="self-attention resolutions (16; ADM 32,16,8)"
    )
    p.add_argument(
        "--augment",
        type=float,
        default=None,
        metavar="P",
        help="EDM's geometric augmentation probability (0: off; default: 0.12 for cifar10 as EDM, else 0)",
    )
    p.add_argument(
        "--augment-dim",
        type=int,
        default=None,
        help="augment-label width of the network (default 9 when --augment > 0, else 0)",
    )
    p.add_argument("--tiny", action="store_true", help="the tests' tiny UNet (CPU smoke runs)")
    p.add_argument("--seed", type=int, default=0, help="seed for init, data order, rounds, sigmas, dropout")
    p.add_argument("--log-every", type=int, default=100, help="steps between log lines")
    p.add_argument("--snap-every", type=int, default=5000, help="steps between checkpoints and image grids")
    p.add_argument("--grid", type=int, default=64, help="images in each snapshot grid; 0: none")
    p.add_argument("--grid-steps", type=int, default=18, help="Heun steps for the snapshot grids")
    p.add_argument("--resume", default=None, help="checkpoint file or run folder (its latest.pt) to continue")
    p.add_argument("--overwrite", action="store_true", help="replace a run in --outdir or an existing --out")
    p.add_argument(
        "--generate", type=int, default=0, metavar="N", help="generate N images from --ckpt instead"
    )
    p.add_argument(
        "--ckpt", default=None, help="aot_edm checkpoint (or run folder) for --generate / --sweep-rho"
    )
    p.add_argument("--out", default="samples.npz", help="output .npz of --generate (a .png grid beside it)")
    p.add_argument("--steps", type=int, default=18, help="--generate: Heun steps (NFE = 2 steps - 1)")
    p.add_argument("--rho", type=float, default=7.0, help="--generate: schedule exponent (EDM: 7)")
    p.add_argument("--gen-batch", type=int, default=256, help="images per sampling batch in --generate")
    p.add_argument("--sweep-rho", action="store_true", help="Table 4: --metric over --rhos x --sweep-steps")
    p.add_argument("--rhos", type=_floats, default=[3, 5, 9, 16, 27, 47, 81, 140, 243, 421], help="Table 4")
    p.add_argument("--sweep-steps", type=_ints, default=[8, 14, 18], help="Heun steps of the sweep")
    p.add_argument("--metric", default="fid", help="the evaluate.py metric of the sweep table (fid, kid)")
    p.add_argument("--num-images", type=int, default=50000, help="images per sweep cell")
    p.add_argument(
        "--fid-seeds",
        type=int,
        default=3,
        help="--sweep-rho: seed ranges per cell, the lowest FID reported (AOT Sec. 5.1, as EDM: 3)",
    )
    p.add_argument(
        "--eval-args", type=str.split, default=[], help="more evaluate.py flags, e.g. '--ref-stats s.npz'"
    )
    p.add_argument("--out-json", default=None, help="--sweep-rho: write the table as JSON here")
    p.add_argument("--S-churn", type=float, default=0.0, help="--generate: EDM Alg. 2 stochasticity (0: ODE)")
    p.add_argument("--S-min", type=float, default=0.0, help="--generate: churn only for sigma >= S_min")
    p.add_argument(
        "--S-max", type=float, default=float("inf"), help="--generate: churn only for sigma <= S_max"
    )
    p.add_argument("--S-noise", type=float, default=1.0, help="--generate: churn noise scale (EDM: S_noise)")
    add_speed_args(p)
    args = p.parse_args(argv)
    check_numbers(p, args, ("batch", "batch_gpu", "duration", "atol", "rtol"), ("lr",))
    args.overlap = args.overlap == "on"
    augment_defaults(p, args)
    if args.generate or args.sweep_rho:
        if not args.ckpt:
            p.error("--generate and --sweep-rho need --ckpt")
    elif not args.data:
        p.error("--data is required for training (or use --generate N / --sweep-rho with --ckpt)")
    if args.aot_pairs is None:
        args.aot_pairs = 2048 if args.cond else 512  # AOT Sec. 5.1
    if args.batch is None:
        args.batch = 128 if args.cond else 256
    for k, v in ARCH_WIDTHS[args.arch].items():  # EDM's CIFAR-10 DDPM++ / ImageNet-64 ADM widths
        setattr(args, k, v if getattr(args, k) is None else getattr(args, k))
    if args.tiny:
        args.model_channels, args.channel_mult, args.num_blocks, args.attn_res = 16, [1, 2], 1, [8]
    for name in (
        "batch",
        "aot_pairs",
        "duration",
        "log_every",
        "snap_every",
        "steps",
        "gen_batch",
        "num_images",
        "fid_seeds",
    ):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.sweep_rho and "--metrics" not in args.eval_args:
        args.eval_args += ["--metrics", args.metric]
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.sweep_rho:
        sweep_rho(args)
    elif args.generate:
        generate(args)
    else:
        train(args)


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


# --- shared: EDM loss and sampler (identical in edm_teacher, aot_edm) ---


def edm_loss(
    net, y, labels=None, P_mean=-1.2, P_std=1.2, sigma_data=0.5, sigma=None, n=None, augment_labels=None
):
    """EDM Eq. 2 with Table 1's training choices, per element [N, C, H, W]:
    ln(sigma) ~ N(P_mean, P_std^2), weight lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2.
    sigma [N, 1, 1, 1] and n (standard normal, like y) may be given; otherwise drawn here. augment_labels
    [N, 9]: what edm_augment applied to y (EDM conditions the network on it; None = nothing applied)."""
    if sigma is None:
        sigma = (torch.randn(y.shape[0], 1, 1, 1, device=y.device) * P_std + P_mean).exp()
    if n is None:
        n = torch.randn_like(y)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    aug = {} if augment_labels is None else dict(augment_labels=augment_labels)  # plain denoisers take none
    denoised = net(y + sigma * n, sigma.flatten(), class_labels=labels, **aug)
    return weight * (denoised - y) ** 2


def karras_sigmas(N, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM Eq. 5: N noise levels from sigma_max to sigma_min, then sigma_N = 0. Float64, as in EDM:
    the last non-zero level must be 0.002000000000000003, not a float32 rounding of it."""
    if N < 1:
        raise ValueError(f"need at least one sampling step, got N={N}")
    i = torch.arange(N, dtype=torch.float64)
    t = (
        sigma_max ** (1 / rho) + i / max(N - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))
    ) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def edm_sampler(
    net, noise, sigmas, labels=None, S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, generator=None
):
    """EDM Algorithm 2 (Algorithm 1, deterministic Heun, when S_churn = 0). sigmas: float64 [N+1], last 0.
    generator: the churn noise's source, one torch.Generator or a list of one per image (then image i does not
    depend on the batch it is in or on the number of processes, with or without an S_min/S_max window).
    Heun correction on every step but the last, which is Euler (sigma_N = 0): 2N - 1 network calls.
    Returns (x float32, number of network calls)."""
    N = len(sigmas) - 1
    x = noise.double() * sigmas[0]  # x_0 ~ N(0, sigma_0^2 I)
    nfe = 0
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:], strict=True)):
        gamma = min(S_churn / N, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur  # Alg. 2 line 5: temporarily raise the noise level
        if gamma > 0:
            if isinstance(generator, (list, tuple)):  # one stream per image (EDM's per-seed generators)
                eps = torch.stack([torch.randn(x.shape[1:], generator=g, dtype=x.dtype) for g in generator])
            else:
                eps = torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu")
            x = x + (t_hat**2 - t_cur**2).sqrt() * S_noise * eps.to(x.device)
        d = (x - net(x, t_hat, class_labels=labels).double()) / t_hat  # dx/dsigma (Eq. 4 with sigma(t) = t)
        x_next = x + (t_next - t_hat) * d  # Euler step
        nfe += 1
        if i < N - 1:  # 2nd-order correction (Alg. 1 lines 9-11), skipped when sigma_{i+1} = 0
            d_next = (x_next - net(x_next, t_next, class_labels=labels).double()) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d + 0.5 * d_next)
            nfe += 1
        x = x_next
    return x.float(), nfe


def build_net(net_kwargs):
    """The trained network: an EDM denoiser net(x, sigma, class_labels=None) -> D(x; sigma)."""
    return EDMPrecond(**net_kwargs)


def sample(
    net,
    noise,
    nfe,
    labels=None,
    steps=None,
    sigma_min=0.002,
    sigma_max=80.0,
    rho=7.0,
    sigmas=None,
    generator=None,
    **churn,
):
    """Interface: noise [N, C, H, W] standard normal -> (images in [-1, 1], true NFE).
    nfe asks for N = (nfe + 1) // 2 Heun steps, which use 2N - 1 evaluations (35 -> 18 steps); `steps` or an
    explicit float64 `sigmas` schedule override it. churn: S_churn, S_min, S_max, S_noise (EDM Alg. 2), drawn
    from `generator` (per image: a list of generators, e.g. noise_for_seeds' third output)."""
    if sigmas is None:
        sigmas = karras_sigmas(steps or max(1, (nfe + 1) // 2), sigma_min, sigma_max, rho)
    return edm_sampler(net, noise, sigmas.to(noise.device), labels, generator=generator, **churn)


def ode_start(net, noise):
    """x at t = 0 of the common clock: sigma_max * noise."""
    return noise * 80.0


def ode_velocity(net, x, t, labels=None, sigma_min=0.002, sigma_max=80.0):
    """The probability-flow ODE (EDM Eq. 4, dx/dsigma = (x - D(x; sigma)) / sigma) on the common clock t in
    [0, 1] with sigma(t) = sigma_max (1 - t), noise at t = 0: dx/dt = sigma_max (D(x; sigma) - x) / sigma."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
    sigma = (sigma_max * (1 - t)).clamp(min=sigma_min)
    return (net(x, sigma, class_labels=labels) - x) * (sigma_max / sigma).reshape(-1, 1, 1, 1)


def noise_for_seeds(seeds, shape, label_dim=0, with_generators=False):
    """EDM's per-image seeds: image i's noise (and uniform class label, drawn after it) come from a generator
    seeded with seeds[i], so a generated set does not depend on the number of processes or the batch.
    with_generators: also return the generators, which then give each image's churn noise (as EDM's)."""
    noise, labels, gens = [], [], []
    for s in seeds:
        gens.append(torch.Generator().manual_seed(int(s)))
        noise.append(torch.randn(shape, generator=gens[-1]))
        if label_dim:
            labels.append(torch.randint(label_dim, [], generator=gens[-1]))
    noise = torch.stack(noise) if noise else torch.empty(0, *shape)
    out = noise, (torch.tensor(labels, dtype=torch.long) if label_dim else None)
    return (*out, gens) if with_generators else out


# --- end shared: EDM loss and sampler ---


# --- shared: EDM augmentation (identical in edm_teacher, aot_edm) ---
# EDM's non-leaking geometric augmentation (EDM App. F.2, Table 7: p = 0.12 on CIFAR-10), the ADA pipeline
# (Karras et al. 2020) in the configuration EDM trains CIFAR-10 with: x-flip on a random half of the images
# (EDM's multiplier 1e8 makes it always draw), and y-flip, isotropic scaling, arbitrary rotation, anisotropic
# scaling and fractional translation each with probability p. The parameters of what was applied form a
# 9-dim augment label (zero where nothing was) that conditions the network, so that at sampling time (zero
# label) it produces un-augmented images: the augmentation does not leak into the samples.
# Pixel coordinates are centred; G_inv maps an output pixel to the input position it samples.

SYM6 = (  # Symlet-6 low-pass filter: ADA's anti-aliasing filter for the 2x supersampled resampling
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148,
)  # fmt: skip


def augment_draw(n, p, generator=None):
    """EDM's draws for n images, in EDM's order -> dict of float32 [n] parameters, zero where not applied."""

    def rand(*s):
        return torch.rand(s, generator=generator)

    def randn(*s):
        return torch.randn(s, generator=generator)

    def pick(prob, w):  # keep w where the transform is drawn (probability prob), else 0
        return torch.where(rand(*w.shape[-1:]) < prob, w, torch.zeros_like(w))

    a = {}
    a["xflip"] = pick(1e8 * p, torch.randint(2, (n,), generator=generator).float())
    a["yflip"] = pick(p, torch.randint(2, (n,), generator=generator).float())
    a["scale"] = pick(p, randn(n))  # log2 scale / 0.2
    a["rotate"] = pick(p, (rand(n) * 2 - 1) * math.pi)  # angle in [-pi, pi)
    a["aniso"], r = randn(n), (rand(n) * 2 - 1) * math.pi
    a["aniso"] = pick(p, a["aniso"])  # log2 x-stretch / 0.2 ...
    a["aniso_angle"] = pick(0.5, r)  # ... along an axis rotated by this angle half of the time
    t = randn(2, n)
    a["tx"], a["ty"] = torch.where(rand(1, n) < p, t, torch.zeros_like(t))  # in units of 0.125 image size
    return a


def augment_labels(a):
    """The 9-dim augment label of EDM's SongUNet (augment_dim = 9), [n, 9]."""
    rot, an, r = a["rotate"], a["aniso"], a["aniso_angle"]
    cols = [a["xflip"], a["yflip"], a["scale"], rot.cos() - 1, rot.sin(), an * r.cos(), an * r.sin()]
    return torch.stack([*cols, a["tx"], a["ty"]], dim=1)


def augment_matrix(a, H, W):
    """G_inv [n, 3, 3] of the geometric part, composed as EDM: scale, rotation, anisotropy, translation."""

    def mat(rows):  # rows of [n] tensors or numbers -> [n, 3, 3]
        return torch.stack(
            [torch.stack([torch.as_tensor(v).float().expand(n) for v in r], 1) for r in rows], 1
        )

    def rot(t):
        return mat([[t.cos(), -t.sin(), 0], [t.sin(), t.cos(), 0], [0, 0, 1]])

    def scale(sx, sy):
        return mat([[sx, 0, 0], [0, sy, 0], [0, 0, 1]])

    n = len(a["scale"])
    s, sa, r = (a["scale"] * 0.2).exp2(), (a["aniso"] * 0.2).exp2(), a["aniso_angle"]
    G = scale(1 / s, 1 / s) @ rot(a["rotate"])  # inverse of: scale by s, then rotate by -angle
    G = G @ rot(-r) @ scale(1 / sa, sa) @ rot(r)
    return G @ mat([[1, 0, -a["tx"] * W * 0.125], [0, 1, -a["ty"] * H * 0.125], [0, 0, 1]])


def augment_resample(x, G_inv):
    """Apply G_inv to images x [n, C, H, W]: reflect padding, 2x supersampling with the Symlet-6 filter,
    bilinear resampling, filtered 2x downsampling (ADA's geometric execution)."""
    n, c, H, W = x.shape
    hz = torch.tensor(SYM6, dtype=x.dtype, device=x.device)
    hpad, cx, cy = len(SYM6) // 4, (W - 1) / 2, (H - 1) / 2
    G_inv = G_inv.to(x.device)
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], device=x.device).T
    m = (G_inv @ corners)[:, :2, :].permute(1, 0, 2).flatten(1)  # [xy, n * 4] input positions of the corners
    m = torch.cat([-m, m]).amax(1) + torch.tensor([2 * hpad - cx, 2 * hpad - cy] * 2, device=x.device)
    m = torch.minimum(m.clamp(min=0), torch.tensor([W - 1, H - 1] * 2, device=x.device))
    mx0, my0, mx1, my1 = m.ceil().int().tolist()
    x = F.pad(x, [mx0, mx1, my0, my1], mode="reflect")

    def shift(tx, ty):
        return torch.tensor([[1, 0, tx], [0, 1, ty], [0, 0, 1]], dtype=torch.float32, device=x.device)

    def scale(sx, sy):
        return torch.diag(torch.tensor([sx, sy, 1.0], device=x.device))

    G_inv = shift((mx0 - mx1) / 2, (my0 - my1) / 2) @ G_inv
    up = hz.flip(0).reshape(1, 1, 1, -1).repeat(c, 1, 1, 1)  # upsample: zeros between samples, then filter
    x = torch.stack([x, torch.zeros_like(x)], 4).flatten(3)[..., :-1]
    x = F.conv2d(x, up, groups=c, padding=(0, (len(SYM6) + 1) // 2))
    x = torch.stack([x, torch.zeros_like(x)], 3).flatten(2, 3)[:, :, :-1]
    x = F.conv2d(x, up.transpose(2, 3), groups=c, padding=((len(SYM6) + 1) // 2, 0))
    G_inv = scale(2, 2) @ G_inv @ scale(0.5, 0.5)
    G_inv = shift(-0.5, -0.5) @ G_inv @ shift(0.5, 0.5)
    size = [n, c, (H + 2 * hpad) * 2, (W + 2 * hpad) * 2]
    G_inv = scale(2 / x.shape[3], 2 / x.shape[2]) @ G_inv @ scale(size[3] / 2, size[2] / 2)
    grid = F.affine_grid(G_inv[:, :2, :], size, align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    down = hz.reshape(1, 1, 1, -1).repeat(c, 1, 1, 1)  # filter, keep every other sample, crop the margin
    x = F.conv2d(x, down, groups=c, stride=(1, 2), padding=(0, (len(SYM6) - 1) // 2))[..., hpad:-hpad]
    x = F.conv2d(x, down.transpose(2, 3), groups=c, stride=(2, 1), padding=((len(SYM6) - 1) // 2, 0))
    return x[:, :, hpad:-hpad]


def edm_augment(y, p, generator=None, a=None):
    """EDM's augmentation of a batch y [n, C, H, W] in [-1, 1] -> (augmented y, augment labels [n, 9]).
    p = 0 is the identity with zero labels. `a` (augment_draw's dict) forces the parameters."""
    a = augment_draw(len(y), p, generator) if a is None else {k: v.float().cpu() for k, v in a.items()}
    G_inv = augment_matrix(a, y.shape[2], y.shape[3])  # on the CPU: [n, 3, 3] is tiny
    y = torch.where(a["xflip"].bool().to(y.device)[:, None, None, None], y.flip(3), y)
    y = torch.where(a["yflip"].bool().to(y.device)[:, None, None, None], y.flip(2), y)
    moved = torch.stack([a[k] != 0 for k in ("scale", "rotate", "aniso", "tx", "ty")]).any(0)
    if moved.any():  # resample only the images a geometric transform was drawn for
        idx = moved.nonzero().flatten().to(y.device)
        y = y.index_copy(0, idx, augment_resample(y[idx], G_inv[moved]).to(y.dtype))
    return y, augment_labels(a).to(y.device)


def augment_defaults(p, args):
    """--augment: 0.12 on CIFAR-10 (EDM's Table 7), else 0; --augment-dim: 9 with augmentation, else 0."""
    if args.augment is None:
        args.augment = 0.12 if args.data == "cifar10" else 0.0
    if not 0 <= args.augment <= 1:
        p.error(f"--augment is a probability in [0, 1], got {args.augment}")
    if args.augment_dim is None:
        args.augment_dim = 9 if args.augment > 0 else 0
    if args.augment > 0 and args.augment_dim != 9:
        p.error(f"--augment {args.augment} conditions the network on a 9-dim label: pass --augment-dim 9")
    if args.augment_dim < 0:
        p.error(f"--augment-dim must be 0 or 9, got {args.augment_dim}")


# --- end shared: EDM augmentation ---


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

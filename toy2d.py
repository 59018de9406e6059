"""toy2d.py: every method of this project on the papers' toy problems, side by side, plus analytic checks.

One command on a CPU trains every method with the same small MLP, budget and seeds, and prints what each
paper claims in numbers: how straight the learned ODE paths are (LMM Table 1), sample quality at 1, 2, 4
and 8 network evaluations, and where the field at the start of sampling points (LMM's false basin, the
mean). It imports the methods' own losses, couplings and samplers from their files, with their defaults
(the exceptions are named at the constants below); only the UNet is swapped for an MLP.

Problems (points are passed to the methods as [N, D, 1, 1] images):
  mix128  LMM Table 1: N(0, I_128) -> two equal Gaussians at +-(1, 1, 0, ...), std 0.1 in dims 1-2, 1 after.
  gauss2d LOOM Fig. 1: N(0, I_2) -> N(0, I_2); the ideal map is the identity.
  moons   eight Gaussians -> two moons (pictures; the diffusion methods start from N(0, 80^2 I): skipped).
Methods: edm, aot, lmm (on pairs gen_pairs.make_pairs draws from edm), icfm / bot128 / bot256 / sinkhorn
(cfm_couplings), loom, rf1 / rf2 (reflow on rf1's pairs from its weights) / dansm (dansm.py).
Reported: straightness (LMM Table 1) and curvature on one clock for both families (see `solve`); sliced W2,
energy distance and mode balance against fresh target samples at NFE 1, 2, 4, 8 and a fine ODE solve.
Analytic checks: LOOM Eq. 4 (the I-CFM field on gauss2d); LMM App. A.2 Eq. 20 (E<x1*, x0> under exact
batch OT <= sqrt(2 log n / d)); the random-pairing path length on mix128 (DANSM Table 2's "random").

Commands (docs/toy2d.md has the results):
    python toy2d.py --quick --outdir toy_quick      # mix128, every method, small budget, the checks
    python toy2d.py --outdir toy_results            # mix128, 1,500 steps per method, the full check grid
    python toy2d.py --problem moons --methods icfm,bot256,loom,rf2 --outdir toy_moons
"""

import argparse
import copy
import importlib
import json
import math
import os
import time

import torch
from torch import nn

import evaluate
import gen_pairs

METHODS = {  # name -> (method file, family, label)
    "edm": ("edm_teacher", "diffusion", "EDM (DSM, Heun)"),
    "aot": ("aot_edm", "diffusion", "AOT-EDM"),
    "lmm": ("lmm", "diffusion", "LMM"),
    "icfm": ("cfm_couplings", "flow", "I-CFM"),
    "bot128": ("cfm_couplings", "flow", "BOT-CFM 128"),
    "bot256": ("cfm_couplings", "flow", "BOT-CFM 256"),
    "sinkhorn": ("cfm_couplings", "flow", "Sinkhorn OT-CFM"),
    "loom": ("loom_cfm", "flow", "LOOM-CFM"),
    "rf1": ("dansm", "flow", "1-Rect-Flow"),
    "rf2": ("dansm", "flow", "2-Rect-Flow"),
    "dansm": ("dansm", "flow", "DANSM"),
}
PROBLEMS = ("mix128", "gauss2d", "moons")
NFES = (1, 2, 4, 8)
# The settings that differ from the files' defaults, and why:
SIGMA_DATA = 1.0  # the toy targets have unit scale (EDM's sigma_data is 0.5 for images in [-1, 1])
SINKHORN_REG = 0.05  # cfm_couplings' 1e-3 puts ~0.7 of the plan on the optimal permutation at CIFAR-10
# scale; on mix128 it needs ~2,000 iterations (2 s) a step and on gauss2d it does not converge. 0.05 of the
# mean cost takes ~0.06 s a step: a blurred plan (0.11 of its mass on the optimal permutation on mix128).
DANSM_POOL = 1024  # DANSM's match-size (10,000 images) is more than the toy's training set
# The files' defaults, for the parts the toy draws itself:
LOOM_CACHES = 4  # loom_cfm --caches (LOOM Table 1)
AOT_ROUND = 512  # aot_edm --aot-pairs (AOT Sec. 5.1)
LMM_TEACHER_NFE = 35  # gen_pairs --nfe (EDM's 18 Heun steps)


# --- problems: a source as a function of standard-normal z, and a target sampler ---


class Problem:
    def __init__(self, name):
        self.name = name
        self.dim = 128 if name == "mix128" else 2
        self.gaussian_source = name != "moons"

    def source(self, z):
        """x0 from standard-normal z [N, D]. moons: eight Gaussians (std 0.1 at radius 2), exactly: z's octant
        picks the centre; its angle within the octant and its radius rebuild a standard 2-D normal offset."""
        if self.gaussian_source:
            return z
        angle = torch.atan2(z[:, 1], z[:, 0]) % (2 * math.pi)
        k, frac = torch.floor(angle / (math.pi / 4)), (angle % (math.pi / 4)) / (math.pi / 4)
        r = z.norm(dim=1)
        offset = torch.stack([r * torch.cos(2 * math.pi * frac), r * torch.sin(2 * math.pi * frac)], 1)
        centre = 2 * torch.stack([torch.cos(k * math.pi / 4), torch.sin(k * math.pi / 4)], 1)
        return centre + 0.1 * offset

    def target(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        if self.name == "gauss2d":
            return torch.randn(n, 2, generator=g)
        if self.name == "mix128":  # LMM Table 1's two-Gaussian target
            sign = torch.randint(2, (n, 1), generator=g).float() * 2 - 1
            x = torch.randn(n, 128, generator=g)
            x[:, :2] = sign + 0.1 * x[:, :2]
            return x
        upper = torch.randint(2, (n,), generator=g).bool()  # two interleaved moons, scaled to about unit std
        theta = torch.rand(n, generator=g) * math.pi
        x = torch.stack([torch.cos(theta), torch.sin(theta)], 1)
        x = torch.where(upper[:, None], x, torch.stack([1 - x[:, 0], 0.5 - x[:, 1]], 1))
        return (x - torch.tensor([0.5, 0.25])) * 1.6 + 0.08 * torch.randn(n, 2, generator=g)

    def modes(self, x):
        """Mode index per sample: mix128 the nearer centre, moons the nearer moon; gauss2d has one mode."""
        if self.name == "mix128":
            return (x[:, 0] + x[:, 1] > 0).long()
        if self.name == "moons":
            curve = self.target(4096, seed=12345)  # dense samples of both moons, labelled by construction
            g = torch.Generator().manual_seed(12345)
            upper = torch.randint(2, (4096,), generator=g).bool()
            return upper[torch.cdist(x.double(), curve.double()).argmin(1)].long()
        return torch.zeros(len(x), dtype=torch.long)


# --- the toy network: an MLP in place of the UNet, inside each method's own wrapper ---


class MLP(nn.Module):
    """The UNet's interface: model(x [N, D, 1, 1], noise_labels [N], ...) -> [N, D, 1, 1], with the UNet's
    positional embedding of the noise label. An MLP of [x, embedding] plus a per-dimension gain g(label) * x:
    the gain makes fields linear in x (Gaussian dimensions, LOOM Eq. 4) exactly representable, so the toy
    shows each method's field, not the MLP's difficulty in multiplying x by a function of t."""

    def __init__(self, dim, width=256, depth=3, emb=64):
        super().__init__()
        self.emb = emb
        layers, d = [], dim + emb
        for _ in range(depth):
            layers += [nn.Linear(d, width), nn.SiLU()]
            d = width
        self.net = nn.Sequential(*layers, nn.Linear(d, dim))
        self.gain = nn.Sequential(nn.Linear(emb, 64), nn.SiLU(), nn.Linear(64, dim))

    def forward(self, x, noise_labels, class_labels=None, augment_labels=None):
        half = self.emb // 2
        freqs = (1 / 10000) ** (torch.arange(half, device=x.device) / (half - 1))
        a = noise_labels.float().reshape(-1, 1) * freqs
        e = torch.cat([torch.cos(a), torch.sin(a)], 1)
        x = x.flatten(1)
        return (self.net(torch.cat([x, e], 1)) + self.gain(e) * x).reshape(len(x), -1, 1, 1)


def toy_net(module, dim, width, depth, seed):
    """The method's build_net (EDM preconditioning, time scaling, its schedule) with the UNet replaced by an
    MLP; the MLP's initial weights depend only on the seed, so every method starts from the same MLP."""
    kw = dict(img_resolution=1, img_channels=dim, model_channels=16, channel_mult=(1,), num_blocks=1)
    kw["attn_resolutions"] = ()
    if module.METHOD in ("edm_teacher", "aot_edm", "lmm"):
        kw["sigma_data"] = SIGMA_DATA
    net = module.build_net(kw)
    torch.manual_seed(seed)
    net.model = MLP(dim, width, depth)
    return net


def img(x):
    return x.reshape(len(x), -1, 1, 1)


def flat(x):
    return x.reshape(len(x), -1)


# --- training: one loop; each method only says how a step's loss is made ---


def fit(net, step_loss, cfg, name):
    """Adam, gradients clipped at norm 1, lr decayed linearly to 0 over the last half; returns the EMA (decay
    0.995, or a memory of a tenth of a short run). The global RNG is seeded once: a run is a function of
    cfg.seed."""
    ema, decay = copy.deepcopy(net).requires_grad_(False), min(0.995, 1 - 10 / cfg.train_steps)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, 2 * (1 - s / cfg.train_steps)))
    torch.manual_seed(cfg.seed + 1)
    t0, losses = time.time(), []
    for step in range(cfg.train_steps):
        loss = step_loss(step).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        losses.append(loss.item())
    tail = sum(losses[-50:]) / len(losses[-50:])
    print(f"  {name:9s} {cfg.train_steps} steps in {time.time() - t0:5.1f} s, final loss {tail:.4f}")
    return ema.eval()


class Stream:
    """The training set (a fixed sample of the target, as a dataset is) in epochs, and fresh noise."""

    def __init__(self, data, problem):
        self.data, self.problem, self.order, self.pos = data, problem, None, len(data)

    def images(self, n):
        out = []
        while n > 0:
            if self.pos == len(self.data):
                self.order, self.pos = torch.randperm(len(self.data)), 0
            take = self.order[self.pos : self.pos + n]
            out.append(self.data[take])
            self.pos, n = self.pos + len(take), n - len(take)
        return torch.cat(out)

    def noise(self, n):
        return self.problem.source(torch.randn(n, self.problem.dim))


def train_method(name, problem, data, cfg, trained):
    """-> (module, net). `trained` holds the nets trained so far (rf2 and lmm need rf1 and edm)."""
    module = importlib.import_module(METHODS[name][0])
    net = toy_net(module, problem.dim, cfg.width, cfg.depth, cfg.seed)
    s, B = Stream(data, problem), cfg.batch

    if module.METHOD in ("edm_teacher", "aot_edm"):
        blocks = {}

        def step_loss(step):
            y = s.images(B)
            if name == "edm":  # EDM Eq. 2, independent noise
                return module.edm_loss(net, img(y), sigma_data=SIGMA_DATA)
            # AOT Alg. 1: a round of N images and N noises, Hungarian on L2 (Eq. 8), used B at a time
            k = step % (AOT_ROUND // B)
            if k == 0:
                ys, eps = s.images(AOT_ROUND), torch.randn(AOT_ROUND, problem.dim)
                blocks["y"], blocks["eps"] = ys, eps[module.aot_assign(img(eps), img(ys))]
            y, eps = blocks["y"][k * B : (k + 1) * B], blocks["eps"][k * B : (k + 1) * B]
            sigma = (torch.randn(B, 1, 1, 1) * 1.2 - 1.2).exp()  # EDM's ln(sigma) ~ N(-1.2, 1.2^2)
            return module.edm_loss(net, img(y), sigma, img(eps), sigma_data=SIGMA_DATA)

    elif name == "lmm":  # LMM Eq. 3 on the EDM teacher's (noise, sample) pairs, drawn by gen_pairs
        todo = (0, cfg.num_pairs, cfg.seed, (problem.dim, 1, 1), 0, LMM_TEACHER_NFE, 1024, "cpu")
        with torch.no_grad():
            noise, x1, _, _ = gen_pairs.make_pairs(*trained["edm"], *todo)

        def step_loss(step):
            i = torch.randint(len(noise), (B,))
            return module.lmm_loss(net, noise[i], x1[i], module.draw_sigma(B))[0]

    elif module.METHOD in ("cfm_couplings", "loom_cfm"):
        tau = torch.arange(len(data) * LOOM_CACHES)

        def step_loss(step):
            if name == "loom":  # LOOM Alg. 1: this minibatch's slots, their persistent noise, Eq. 9-10
                idx, slots = module.minibatch_slots(len(data), LOOM_CACHES, B, step, cfg.seed)
                x1 = data[idx]
                x0 = problem.source(flat(module.noise_for_ids(tau[slots], cfg.seed, (problem.dim,))))
                x0 = x0[module.loom_reassign(tau, slots, img(x1), img(x0))]
            else:
                x1, x0 = s.images(B), s.noise(B)
                if name in ("bot128", "bot256"):  # BatchOT: exact OT on each block of the batch
                    k = int(name[3:])
                    x0 = torch.cat([x0[j : j + k][module.ot_permutation(x0[j : j + k], x1[j : j + k])]
                                    for j in range(0, B, k)])  # fmt: skip
                elif name == "sinkhorn":  # the entropic plan, pairs drawn from it (cfm_couplings.couple)
                    i0, i1 = module.couple(x0, x1, None, "sinkhorn", reg=SINKHORN_REG)
                    x0, x1 = x0[i0], x1[i1]
            return module.cfm_loss(net, img(x0), img(x1), torch.rand(B))  # LOOM Eq. 3 / CFM

    else:  # dansm.py: rectified flow with t = 0 data, t = 1 noise (DANSM Eq. 1-2)
        if name == "rf2":  # reflow: rf1's own (noise, sample) pairs, starting from rf1's weights
            rf1_module, rf1 = trained["rf1"]
            net.load_state_dict(rf1.state_dict())
            g = torch.Generator().manual_seed(cfg.seed + 2)
            z = problem.source(torch.randn(cfg.num_pairs, problem.dim, generator=g))
            with torch.no_grad():
                pair_x = flat(rf1_module.sample(rf1, img(z), cfg.reflow_steps)[0])
        pool = {}

        def step_loss(step):
            if name == "rf2":
                i = torch.randint(len(z), (B,))
                x, zz = pair_x[i], z[i]
            elif name == "dansm":  # DANSM Alg. 1: greedy nearest-noise matching over a pool of match-size
                k = step % (DANSM_POOL // B)
                if k == 0:
                    xs, zs = s.images(DANSM_POOL), s.noise(DANSM_POOL)
                    pool["x"], pool["z"] = xs, zs[module.greedy_match(xs, zs)]
                x, zz = pool["x"][k * B : (k + 1) * B], pool["z"][k * B : (k + 1) * B]
            else:
                x, zz = s.images(B), s.noise(B)
            return module.rfm_loss(net, img(x), img(zz), torch.rand(B))

    return module, fit(net, step_loss, cfg, name)


# --- evaluation ---


def sliced_w2(a, b, n_dirs=256, seed=0):
    """Sliced Wasserstein-2 between equal-size samples: sqrt of the mean over random unit directions of the
    1-D W2^2 (sorted projections)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_dirs, generator=g, dtype=torch.float64)
    dirs /= dirs.norm(dim=0, keepdim=True)
    pa, pb = (a.double() @ dirs).sort(0)[0], (b.double() @ dirs).sort(0)[0]
    return (pa - pb).square().mean().sqrt().item()


def energy_distance(a, b):
    """2 E||X - Y|| - E||X - X'|| - E||Y - Y'|| (Szekely), V-statistics; 0 iff the laws are equal."""
    a, b = a.double(), b.double()
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def quality(problem, x, ref):
    m = problem.modes(x).bincount(minlength=2).double() / len(x)
    return dict(sw2=sliced_w2(x, ref), energy=energy_distance(x, ref), mode0=m[0].item())


@torch.no_grad()
def solve(module, net, noise, grid):
    """Heun on ode_velocity over the common clock `grid` (t = 0 noise, 1 data; Euler on the last step, as
    evaluate.ode_metrics) -> the states [N, K+1, D] and their times in the flow picture. The flow files'
    times are their own. The diffusion files start at 80 z and run sigma(t) = 80 (1 - t) down to 0: mapped
    to x / (1 + sigma) at t' = 1 / (1 + sigma), their ODE is a rectified-flow ODE from about z (t' = 1/81)
    to the data (t' = 1), and an LMM line x1 + sigma x0 is the straight, constant-speed path
    t' x1 + (1 - t') x0. Only in this picture are straightness and curvature comparable across families."""
    diffusion = module.METHOD in ("edm_teacher", "aot_edm", "lmm")  # the flow files' ode_start is the noise
    x = module.ode_start(net, noise) if diffusion else noise
    states = [flat(x)]
    for k in range(len(grid) - 1):
        t0, t1 = float(grid[k]), float(grid[k + 1])
        v = module.ode_velocity(net, x, t0)
        x_next = x + (t1 - t0) * v
        if k < len(grid) - 2:
            x_next = x + (t1 - t0) * 0.5 * (v + module.ode_velocity(net, x_next, t1))
        x = x_next
        states.append(flat(x))
    states, t = torch.stack(states, 1), grid.double()
    if diffusion:
        sigma = 80.0 * (1 - t)
        t = 1 / (1 + sigma)
        states = states / (1 + sigma.float())[None, :, None]
    return states, (t - t[0]) / (t[-1] - t[0])  # times rescaled to [0, 1]: the mean velocity is x1 - x0


def path_metrics(states, t):
    """LMM Table 1's straightness, sum_k ||v_k - (x1 - x0)|| dt_k with v_k the secant velocity of step k,
    its value relative to ||x1 - x0||, and the curvature mean_k 1 - cos(v_k, v_k+1) (LOOM Fig. 6)."""
    dt = (t[1:] - t[:-1]).float()
    v = (states[:, 1:] - states[:, :-1]) / dt[None, :, None]
    d = states[:, -1] - states[:, 0]
    straight = ((v - d[:, None]).norm(dim=2) * dt[None]).sum(1)
    curvature = (1 - torch.nn.functional.cosine_similarity(v[:, 1:], v[:, :-1], dim=2)).mean(1)
    return dict(straightness=straight, straightness_rel=straight / d.norm(dim=1), curvature=curvature)


@torch.no_grad()
def evaluate_method(name, module, net, problem, z, ref, cfg):
    row = dict(method=name, label=METHODS[name][2], quality={})
    noise = img(problem.source(z))
    for nfe in NFES:
        x, used = module.sample(net, noise, nfe)
        row["quality"][str(nfe)] = dict(quality(problem, flat(x), ref), nfe_used=used)
    grid = evaluate.ode_grid(cfg.ode_steps, "rho" if METHODS[name][1] == "diffusion" else "uniform")
    states, t = solve(module, net, noise, grid)
    row["quality"]["fine"] = dict(quality(problem, states[:, -1], ref), nfe_used=2 * cfg.ode_steps - 1)
    row.update({k: v.mean().item() for k, v in path_metrics(states, t).items()})
    row["paths"] = states[:40, :, :2]  # for the figure (dropped from the JSON)
    return row


@torch.no_grad()
def field_at_start(module, net, problem, lim=3.0, n=15):
    """x + v at t = 0 (LMM Table 1's green arrows) on a grid g of the first two noise dims (the others 0): a
    basin of attraction shows up as many arrows ending at one point."""
    a = torch.linspace(-lim, lim, n)
    g = torch.stack(torch.meshgrid(a, a, indexing="xy"), -1).reshape(-1, 2)
    z = torch.zeros(len(g), problem.dim)
    z[:, :2] = g
    x = module.ode_start(net, img(z))
    end = flat(x + module.ode_velocity(net, x, 0.0))[:, :2]
    return g, end


def plot_problem(problem, rows, nets, z, ref, cfg, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols, lim, x0 = min(4, len(rows)), 3.5, problem.source(z)[:, :2]
    nrows = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.6 * cols, 3.6 * nrows), squeeze=False)
    for ax, row in zip(axes.flat, rows, strict=False):
        module, net = nets[row["method"]]
        traj = row["paths"]
        g, end = field_at_start(module, net, problem)
        ax.scatter(*x0[:600].T, s=2, c="tab:blue", alpha=0.3, label="source")
        ax.scatter(*ref[:600, :2].T, s=2, c="tab:orange", alpha=0.3, label="target")
        for tr in traj:
            ax.plot(*tr.T, c="k", lw=0.6, alpha=0.7)
        ax.scatter(*traj[:, -1].T, s=6, c="tab:cyan", zorder=3, label="sample")
        ax.quiver(*g.T, *(end - g).T, color="tab:green", angles="xy", scale_units="xy", scale=4, width=0.004)
        title = f"{row['label']}\nstraightness {row['straightness']:.2f} ({row['straightness_rel']:.3f})"
        ax.set(xlim=(-lim, lim), ylim=(-lim, lim), xticks=[], yticks=[], aspect="equal")
        ax.set_title(title, fontsize=9)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    axes.flat[0].legend(loc="lower left", fontsize=6, markerscale=3)
    fig.suptitle(f"{problem.name}: first two dims; black: ODE paths, green: x + v at t = 0 (length / 4)")
    fig.tight_layout()
    fig.savefig(path, dpi=cfg.dpi)
    plt.close(fig)


# --- analytic checks ---


@torch.no_grad()
def check_loom_eq4(module, net, tol, n=4096, seed=7):
    """(1) LOOM Eq. 4: for N(0, I) -> N(0, I) the CFM field is v(y, t) = y (2t - 1) / (sigma^2 + t^2 +
    (1 - t)^2) (sigma = sigma_min = 0 here). Relative L2 error over y ~ p_t, t ~ U[0, 1]."""
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, generator=g)
    y = torch.randn(n, 2, generator=g) * (t**2 + (1 - t) ** 2).sqrt()[:, None]  # p_t = N(0, t^2 + (1-t)^2)
    exact = y * ((2 * t - 1) / (t**2 + (1 - t) ** 2))[:, None]
    err = ((flat(net(img(y), t)) - exact).norm() / exact.norm()).item()
    return dict(name="LOOM Eq. 4 (I-CFM field on gauss2d)", value=err, bound=tol, passed=err <= tol)


def check_batch_ot(dims, sizes, samples=4096, seed=0):
    """(2) LMM App. A.2 Eq. 20: under exact batch OT between two N(0, I_d) batches of n, the paired
    similarity <x1*, x0> = (1/d) sum_i x1*_i x0_i (Eq. 15) has mean <= sqrt(2 log n / d). Eq. 17 then bounds
    the regressed velocity at t = 0 from below: ||E[x1*] - x0||^2 / d >= ||x0||^2 / d - 2 E<x1*, x0>."""
    from scipy.optimize import linear_sum_assignment

    g = torch.Generator().manual_seed(seed)
    grid = []
    for d in dims:
        for n in sizes:
            sims, norms = [], []
            for _ in range(max(1, samples // n)):
                x0 = torch.randn(n, d, generator=g, dtype=torch.float64)
                x1 = torch.randn(n, d, generator=g, dtype=torch.float64)
                _, cols = linear_sum_assignment(torch.cdist(x0, x1).square().numpy())
                sims.append((x0 * x1[cols]).sum(1) / d)
                norms.append(x0.square().sum(1) / d)
            sim, norm = torch.cat(sims).mean().item(), torch.cat(norms).mean().item()
            bound = math.sqrt(2 * math.log(n) / d)
            grid.append(dict(d=d, n=n, similarity=sim, bound=bound, velocity_lb=norm - 2 * sim))
    passed = all(c["similarity"] <= c["bound"] for c in grid)
    worst = max(c["similarity"] / c["bound"] for c in grid)
    return dict(name="LMM Eq. 20 (batch OT similarity <= sqrt(2 log n / d))", value=worst, bound=1.0,
                passed=passed, grid=grid)  # fmt: skip


def check_path_length(data, n=20000, seed=3, tol=0.01):
    """(3) Random pairing: E||x - z||^2 = sum_i (1 + var_i + mean_i^2) = d (1 + var + mean^2) with per-dim
    averages, so the mean path length is close to its square root (DANSM Table 2, 'random')."""
    import dansm

    g = torch.Generator().manual_seed(seed)
    x = data[torch.randint(len(data), (n,), generator=g)]
    z = torch.randn(n, data.shape[1], generator=g)
    measured = dansm.path_length(x, z).mean().item()
    x64 = data.double()
    predicted = math.sqrt(data.shape[1] * (1 + x64.var(0).mean().item() + x64.mean(0).square().mean().item()))
    err = abs(measured / predicted - 1)
    return dict(name="random path length vs sqrt(d (1 + var + mean^2)) on mix128", value=err, bound=tol,
                passed=err <= tol, measured=measured, predicted=predicted)  # fmt: skip


# --- the run ---


def print_table(problem, rows, ref_row):
    print(f"\n{problem}: straightness (rel.), curvature, sliced W2 at NFE 1/2/4/8/fine, energy distance and "
          f"mode-0 fraction at NFE 1 and fine")  # fmt: skip
    keys = ["1", "2", "4", "8", "fine"]
    head = f"{'method':17s} {'straight':>8s} {'(rel)':>6s} {'curv':>6s}   NFE1   NFE2   NFE4   NFE8   fine"
    print(head + f" {'ED1':>6s} {'EDfine':>6s} {'mode1':>5s} {'modeF':>5s}")
    for r in rows + [ref_row]:
        q, line = r["quality"], f"{r['label']:17s} " + " " * 23
        if "straightness" in r:
            line = f"{r['label']:17s} {r['straightness']:8.3f} {r['straightness_rel']:6.3f} "
            line += f"{r['curvature']:6.3f} "
        line += " ".join(f"{q[k]['sw2']:6.3f}" if k in q else " " * 6 for k in keys)
        a, f = q.get("1", q["fine"]), q["fine"]
        print(line + f" {a['energy']:6.3f} {f['energy']:6.3f} {a['mode0']:5.2f} {f['mode0']:5.2f}")


def run_problem(name, methods, cfg):
    problem = Problem(name)
    methods = [m for m in methods if problem.gaussian_source or METHODS[m][1] != "diffusion"]
    if not methods:
        raise SystemExit(f"toy2d: {name} has a non-Gaussian source; the diffusion methods cannot run on it")
    need = list(methods)
    for m, dep in (("lmm", "edm"), ("rf2", "rf1")):  # a student needs its teacher
        if m in need and dep not in need:
            need.insert(need.index(m), dep)
    print(f"\n== {name}: training {', '.join(need)} (batch {cfg.batch}, {cfg.train_steps} steps each)")
    data = problem.target(cfg.num_train, cfg.seed)
    ref = problem.target(cfg.num_eval, cfg.seed + 100)
    z = torch.randn(cfg.num_eval, problem.dim, generator=torch.Generator().manual_seed(cfg.seed + 200))
    nets, t0 = {}, time.time()
    for m in need:
        nets[m] = train_method(m, problem, data, cfg, nets)
    rows = [evaluate_method(m, *nets[m], problem, z, ref, cfg) for m in methods]
    floor = quality(problem, problem.target(cfg.num_eval, cfg.seed + 300), ref)
    print_table(name, rows, dict(method="target", label="(fresh target)", quality={"fine": floor}))
    if cfg.plots:
        plot_problem(problem, rows, nets, z, ref, cfg, os.path.join(cfg.outdir, f"{name}.png"))
    print(f"{name}: {time.time() - t0:.1f} s")
    return dict(rows=rows, target_floor=floor, dim=problem.dim), nets


def run_checks(nets, cfg):
    if "icfm" not in nets.get("gauss2d", {}):
        print("\n== check (1): training I-CFM on gauss2d")
        problem = Problem("gauss2d")
        data = problem.target(cfg.num_train, cfg.seed)
        nets = {"gauss2d": {"icfm": train_method("icfm", problem, data, cfg, {})}}
    checks = [check_loom_eq4(*nets["gauss2d"]["icfm"], tol=cfg.eq4_tol)]
    dims, sizes = ((2, 32, 512), (16, 256)) if cfg.quick else ((2, 8, 32, 128, 512), (16, 64, 256, 1024))
    checks.append(check_batch_ot(dims, sizes))
    checks.append(check_path_length(Problem("mix128").target(cfg.num_train, cfg.seed)))
    print("\n== analytic checks")
    for c in checks:
        print(f"  [{'pass' if c['passed'] else 'FAIL'}] {c['name']}: {c['value']:.4f} (limit {c['bound']:g})")
    return checks


def run(cfg):
    os.makedirs(cfg.outdir, exist_ok=True)
    t0, results, nets = time.time(), {}, {}
    for name in cfg.problem:
        results[name], nets[name] = run_problem(name, cfg.methods, cfg)
    checks = run_checks(nets, cfg) if cfg.checks else []
    for res in results.values():
        for r in res["rows"]:
            r.pop("paths")
    out = dict(config=vars(cfg), problems=results, checks=checks, seconds=time.time() - t0)
    path = os.path.join(cfg.outdir, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump(out, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"\nwrote {path} and the figures in {time.time() - t0:.1f} s")
    return out


def number(cast, lo, hi=math.inf):  # argparse type: a finite number in [lo, hi]
    def parse(s):
        v = cast(s)
        if not (math.isfinite(v) and lo <= v <= hi):
            raise argparse.ArgumentTypeError(f"{s} is not in [{lo}, {hi}]")
        return v

    return parse


QUICK = dict(train_steps=(1500, 200), num_train=(8192, 4096), num_eval=(2000, 500), num_pairs=(32768, 4096),
             ode_steps=(100, 20), reflow_steps=(100, 30))  # fmt: skip


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add, count = p.add_argument, number(int, 1, 2**31)
    add("--problem", default="mix128", help=f"comma list of {', '.join(PROBLEMS)}, or all")
    add("--methods", default="all", help=f"comma list of {', '.join(METHODS)}, or all")
    add("--quick", action="store_true", help="the small budget below and check grid (~90 s on one core)")
    add("--outdir", default="toy_results", help="folder for results.json and the figures")
    add("--train-steps", type=count, help="training steps per method (default 1500; quick 200)")
    add("--batch", type=int, default=256, choices=(256, 512), help="training batch (BOT-CFM 256: all of it)")
    add("--num-train", type=count, help="training-set size, >= 2 x --batch (default 8192; quick 4096)")
    add("--num-pairs", type=count, help="teacher pairs for lmm and rf2 (default 32768; quick 4096)")
    add("--num-eval", type=count, help="samples per metric (default 2000; quick 500)")
    add("--width", type=count, default=256, help="MLP width")
    add("--depth", type=count, default=3, help="MLP hidden layers")
    add("--lr", type=number(float, 1e-12, 1.0), default=1e-3, help="Adam learning rate")
    add("--ode-steps", type=count, help="Heun steps of the fine solve (default 100; quick 20)")
    add("--reflow-steps", type=count, help="Euler steps of rf1 for rf2's pairs (default 100; quick 30)")
    add("--eq4-tol", type=number(float, 0.0), default=0.15, help="check (1): relative L2 error allowed")
    add("--no-checks", dest="checks", action="store_false", help="skip the analytic checks")
    add("--no-plots", dest="plots", action="store_false", help="skip the figures")
    add("--dpi", type=count, default=110, help="figure resolution")
    add("--seed", type=number(int, 0, 2**31), default=0, help="data, nets, training and evaluation draws")
    args = p.parse_args(argv)
    args.problem = list(PROBLEMS) if args.problem == "all" else args.problem.split(",")
    args.methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    for kind, given, known in (("problem", args.problem, PROBLEMS), ("method", args.methods, METHODS)):
        if bad := [x for x in given if x not in known]:
            p.error(f"unknown {kind} {', '.join(bad)}; expected {', '.join(known)} or all")
    for key, (full, quick) in QUICK.items():
        setattr(args, key, getattr(args, key) or (quick if args.quick else full))
    if args.num_train < args.batch * 2:
        p.error(f"--num-train must be at least 2 x --batch = {2 * args.batch}")
    return args


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()

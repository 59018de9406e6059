"""evaluate.py: one evaluator for every checkpoint of this project and for official EDM snapshots.

For each checkpoint (`--ckpt A B ...`) and each NFE (`--nfe 1,2,4`), image i is sampled from the same noise
and class label (a generator seeded with seed + i, as `edm_teacher.py --generate` and `gen_pairs.py` draw
them; stochastic samplers such as LMM's draw their extra noise from that generator too), so methods are
compared on identical inputs and the result does not depend on the number of processes. The network is
wrapped in a call counter: the NFE reported is the number of network calls actually made.

Metrics (`--metrics`):
  fid, kid       Inception features through clean-fid. Default protocol = the papers': clean-fid
                 `legacy_tensorflow`, CIFAR-10 train statistics at 32x32, 50,000 images quantised to uint8
                 as EDM does; `--fid-mode clean` for clean-fid's own. `--fid-seeds 3` = EDM's protocol
                 (three disjoint seed ranges; min and mean reported). Reference statistics: clean-fid's
                 download, or `--ref-stats FILE.npz` (mu, sigma[, feats]), or `--ref-data` (computed here).
  straightness   LMM Table 1: mean over samples of integral_0^1 ||dx/dt - (x1 - x0)|| dt on a fine Heun solve
                 (`--ode-steps`) of the model's own ODE (`ode_velocity` of its method file, common clock t in
                 [0, 1] from noise to data); `straightness_rel` divides by ||x1 - x0||.
  curvature      LOOM-CFM Fig. 6: mean of 1 - cos(v_k, v_k+1) between consecutive step velocities.
`--feature-extractor random-cnn` (a fixed-seed random CNN) replaces Inception for offline tests only; the
output then says "random-cnn: not FID".

Commands
  python evaluate.py --ckpt runs/lmm-cifar10 runs/edm-cifar10 --nfe 1,2,35 --num 50000 --out results.json \\
      --grid grids.png --trajectory traj.png
  torchrun --standalone --nproc_per_node=8 evaluate.py --ckpt runs/lmm-cifar10 --nfe 1,2 --fid-seeds 3 \\
      --num-images 50000                       # under torchrun --num is taken by torchrun's --numa-binding
  python evaluate.py --pairs pairs_cifar10_cond.npz --num 50000          # the teacher's quality
  python evaluate.py --ckpt runs/lmm-shapes --nfe 1,2 --num 256 --ref-data shapes \\
      --feature-extractor random-cnn --metrics fid,kid,straightness,curvature        # offline smoke run
"""

import argparse
import datetime
import inspect
import json
import os
import platform

import numpy as np
import torch
from torch import nn

import edm_teacher
import gen_pairs

fail = edm_teacher.fail
INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid's TorchScript Inception, looked for in /tmp
DENOISERS = ("edm_teacher", "aot_edm", "lmm")  # their networks output the clean-image estimate


# --- models and sampling ---


def load_model(spec, cache_dir, device):
    """(module, net, ckpt) for any checkpoint of this project or an official EDM snapshot (.pkl / URL)."""
    module, net, ckpt, _ = gen_pairs.load_teacher(spec, cache_dir, device)
    version, supported = ckpt.get("version", 1), getattr(module, "VERSION", 1)
    if version > supported:
        fail(f"{spec}: a version {version} {ckpt['method']} checkpoint; this code reads <= {supported}")
    return module, net, ckpt


class CountingNet(nn.Module):
    """Counts network calls (one per batch evaluation = one NFE) and optionally records (x, t, output)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.calls, self.trace = net, 0, None

    def forward(self, x, t, class_labels=None, **kw):
        self.calls += 1
        out = self.net(x, t, class_labels=class_labels, **kw)
        if self.trace is not None:
            self.trace.append((x.detach().float().cpu(), t, out.detach().float().cpu()))
        return out

    def __getattr__(self, name):  # method attributes such as LMM's net.schedule
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.net, name)


def inputs_for_seeds(seeds, shape, label_dim=0):
    """Image i: noise, then label, from torch.Generator(seeds[i]), returned with it for later draws."""
    gens, noise, labels = [], [], []
    for s in seeds:
        g = torch.Generator().manual_seed(int(s))
        noise.append(torch.randn(shape, generator=g))
        if label_dim:
            labels.append(torch.randint(label_dim, [], generator=g))
        gens.append(g)
    return torch.stack(noise), (torch.tensor(labels, dtype=torch.long) if label_dim else None), gens


def run_sampler(module, counter, noise, nfe, labels, gens, sample_kw=None):
    """module.sample through the call counter -> (images [-1, 1], NFE the method reports, calls counted)."""
    kw = dict(sample_kw or {})
    params = inspect.signature(module.sample).parameters
    unknown = [k for k in kw if k not in params]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        fail(f"{module.METHOD}.sample takes no {unknown} (--sampler-kw); it takes {list(params)[3:]}")
    if "generator" in params:
        kw["generator"] = gens
    counter.calls = 0
    try:
        x, used = module.sample(counter, noise, nfe, labels, **kw)
    except ValueError as e:
        fail(f"{module.METHOD} cannot sample with NFE {nfe}: {e}")
    return x, used, counter.calls


def quantize(x):
    """[-1, 1] floats -> uint8 NHWC, as EDM saves images."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# --- features, FID, KID ---


class RandomCNN(nn.Module):
    """Offline stand-in for Inception (tests only): a fixed-seed random conv net -> 64 features."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        convs = [nn.Conv2d(3, 32, 3, 2, 1), nn.Conv2d(32, 64, 3, 2, 1), nn.Conv2d(64, 64, 3, 1, 1)]
        for c in convs:
            c.weight.data = torch.randn(c.weight.shape, generator=g) / (c.weight[0].numel() ** 0.5)
            c.bias.data.zero_()
        self.body = nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2])

    def forward(self, x):  # x: [N, 3, H, W] in [0, 255]
        return self.body(x / 127.5 - 1).mean((2, 3))


def build_extractor(kind, mode, device):
    """features(uint8 NHWC numpy) -> float64 [N, D]."""
    if kind == "random-cnn":
        model = RandomCNN().to(device).eval()
        resize = None
    else:
        from cleanfid import features, resize

        path = os.path.join("/tmp", INCEPTION_FILE)
        try:
            model = features.build_feature_extractor(mode, device, use_dataparallel=False)
        except Exception as e:
            fail(
                f"cannot load clean-fid's Inception ({type(e).__name__}): put {INCEPTION_FILE} at {path} "
                "(clean-fid's cache) or pass --feature-extractor random-cnn for an offline non-FID check"
            )
        resize = resize.build_resizer(mode) if mode == "clean" else None

    @torch.no_grad()
    def extract(images):
        if resize is not None:  # clean-fid's clean mode: PIL bicubic to 299 on float images
            images = np.stack([resize(im.astype(np.uint8)) for im in images])
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        return model(x.to(device)).double().cpu().numpy()

    return extract


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017)."""
    import scipy.linalg

    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def kernel_distance(feats1, feats2, num_subsets=100, max_subset_size=1000, seed=0):
    """KID (Binkowski et al. 2018): unbiased MMD^2 with the cubic kernel (x.y / d + 1)^3, averaged over
    random subsets (a seeded generator: reproducible)."""
    rng = np.random.default_rng(seed)
    d = feats1.shape[1]
    m = min(len(feats1), len(feats2), max_subset_size)
    t = 0.0
    for _ in range(num_subsets):
        x = feats2[rng.choice(len(feats2), m, replace=False)]
        y = feats1[rng.choice(len(feats1), m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        t += (a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m
    return float(t / num_subsets / m)


def reference(args, extract, kid, rank, world, device):
    """(mu, sigma, feats or None) of the reference set."""
    if args.ref_stats:
        if not os.path.isfile(args.ref_stats):
            fail(f"--ref-stats {args.ref_stats} not found (an .npz with 'mu' and 'sigma')")
        with np.load(args.ref_stats) as f:
            if "mu" not in f or "sigma" not in f:
                fail(f"--ref-stats {args.ref_stats} needs 'mu' and 'sigma' arrays (found {sorted(f.keys())})")
            feats = f["feats"] if "feats" in f else None  # noqa: SIM401 (NpzFile has no .get)
            return f["mu"], f["sigma"], feats
    if args.ref_data:
        images, _ = edm_teacher.load_images(args.ref_data, args.data_dir)
        idx = list(range(len(images)))[rank::world]
        mine = [
            extract(images[idx[i : i + args.batch]].permute(0, 2, 3, 1).numpy())
            for i in range(0, len(idx), args.batch)
        ]
        feats = gather_rows(idx, np.concatenate(mine) if mine else None, world)
        return feats.mean(0), np.cov(feats, rowvar=False), feats
    if args.feature_extractor == "random-cnn":
        fail("--feature-extractor random-cnn has no downloadable statistics: pass --ref-data or --ref-stats")
    from cleanfid import fid

    stats = os.path.join(os.path.dirname(fid.__file__), "stats")
    name = f"{args.dataset}_{args.fid_mode}_{args.dataset_split}_{args.dataset_res}.npz".lower()
    try:
        mu, sigma = fid.get_reference_statistics(
            args.dataset, args.dataset_res, mode=args.fid_mode, split=args.dataset_split
        )
        feats = None
        if kid:
            feats = fid.get_reference_statistics(
                args.dataset, args.dataset_res, mode=args.fid_mode, split=args.dataset_split, metric="KID"
            )
    except Exception as e:
        fail(
            f"cannot load clean-fid's reference statistics ({type(e).__name__}): put {name} (and "
            f"{name[:-4]}_kid.npz for KID) in {stats}/, or pass --ref-stats FILE.npz or --ref-data DATA"
        )
    return mu, sigma, feats


def gather_rows(indices, rows, world):
    """Rows computed by each rank for its indices -> all rows in index order (on every rank)."""
    parts = [(list(indices), rows)]
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, (list(indices), rows))
    parts = [p for p in parts if p[0]]
    order = np.argsort(np.concatenate([p[0] for p in parts]), kind="stable")
    return np.concatenate([p[1] for p in parts])[order]


# --- straightness and curvature of the model's ODE ---


def ode_grid(n, kind="rho", sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """n + 1 times from 0 (noise) to 1 (data). 'rho': t = 1 - sigma / sigma_max at EDM's rho-schedule levels
    (fine where the EDM-family ODEs bend, near the data), then 1; 'uniform': evenly spaced."""
    if kind == "uniform":
        return torch.linspace(0, 1, n + 1, dtype=torch.float64)
    sigmas = edm_teacher.karras_sigmas(n, sigma_min, sigma_max, rho)
    return 1 - sigmas / sigma_max


@torch.no_grad()
def ode_metrics(module, net, noise, labels=None, grid=None):
    """Solve the model's ODE dx/dt = ode_velocity(net, x, t) with Heun (Euler on the last step) on `grid`;
    per sample: straightness (LMM Table 1) = sum_k ||v_k - (x1 - x0)|| dt_k with v_k the step's velocity
    (x_k+1 - x_k) / dt_k, its value relative to ||x1 - x0||, and curvature = mean_k 1 - cos(v_k, v_k+1)."""
    grid = ode_grid(100) if grid is None else grid
    start = getattr(module, "ode_start", None)
    if start is None:  # flow convention: x(0) is the noise itself; EDM-family files must scale it
        if getattr(module, "METHOD", None) in DENOISERS:
            raise ValueError(
                f"{module.METHOD} must export ode_start(net, noise) (x at t = 0, e.g. 80 * noise)"
            )
        start = lambda net, z: z  # noqa: E731
    x = x0 = start(net, noise).float()
    vs, dts = [], []
    for k in range(len(grid) - 1):
        t0, t1 = float(grid[k]), float(grid[k + 1])
        dt = t1 - t0
        v = module.ode_velocity(net, x, t0, labels)
        x_next = x + dt * v
        if k < len(grid) - 2:
            x_next = x + dt * 0.5 * (v + module.ode_velocity(net, x_next, t1, labels))
        vs.append(((x_next - x) / dt).flatten(1))
        dts.append(dt)
        x = x_next
    d = (x - x0).flatten(1)
    straight = sum(dt * (v - d).norm(dim=1) for v, dt in zip(vs, dts, strict=True))
    cos = [torch.nn.functional.cosine_similarity(a, b, dim=1) for a, b in zip(vs[:-1], vs[1:], strict=True)]
    curvature = torch.stack([1 - c for c in cos]).mean(0) if cos else torch.zeros(len(d))
    return dict(straightness=straight, straightness_rel=straight / d.norm(dim=1), curvature=curvature), x


# --- the evaluation ---


def shard(seeds, rank, world):
    return list(seeds)[rank::world]


def evaluate(args):
    from tqdm import tqdm

    rank, world, device = gen_pairs.dist_setup()
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    metrics = args.metrics
    for path in (args.out, args.grid, args.trajectory):
        if path and rank == 0:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    image_metrics = [m for m in metrics if m in ("fid", "kid")]
    extract = ref = None
    if image_metrics:
        extract = build_extractor(args.feature_extractor, args.fid_mode, device)
        ref = reference(args, extract, "kid" in metrics, rank, world, device)
    protocol = (
        "random-cnn features: NOT FID/KID (offline test protocol)"
        if args.feature_extractor == "random-cnn"
        else f"clean-fid {args.fid_mode}, Inception-v3 pool3"
    )
    protocol += ", reference " + (
        f"stats {args.ref_stats}"
        if args.ref_stats
        else f"data {args.ref_data}"
        if args.ref_data
        else f"{args.dataset} {args.dataset_split} {args.dataset_res}px (clean-fid)"
    )

    def score(images_rows, seeds):
        """FID/KID of uint8 images computed by this rank for `seeds` (all ranks gather)."""
        feats = [extract(images_rows[i : i + args.batch]) for i in range(0, len(images_rows), args.batch)]
        feats = gather_rows(seeds, np.concatenate(feats) if feats else None, world)
        out = {}
        if "fid" in metrics:
            out["fid"] = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref[0], ref[1])
        if "kid" in metrics:
            if ref[2] is None:
                fail(
                    "KID needs reference features: --ref-data, --ref-stats with feats, or clean-fid KID stats"
                )
            out["kid"] = kernel_distance(feats, ref[2])
        return out

    results = []
    if args.pairs:
        pairs = gen_pairs.load_pairs(args.pairs)
        n = min(args.num, len(pairs["data"]))
        seeds = shard(range(n), rank, world)
        images = quantize(torch.from_numpy(np.asarray(pairs["data"][seeds], dtype=np.float32)))
        row = dict(ckpt=args.pairs, method="pairs", nfe=pairs.get("meta", {}).get("nfe_used"), num=n)
        row.update(score(images, seeds) if image_metrics else {})
        results.append(row)
    for spec in args.ckpt:
        module, net, ckpt = load_model(spec, args.cache_dir, device)
        counter = CountingNet(net)
        k = ckpt["net_kwargs"]
        shape, label_dim = (
            (k["img_channels"], k["img_resolution"], k["img_resolution"]),
            k.get("label_dim", 0),
        )
        name = os.path.basename(os.path.normpath(spec)).removesuffix(".pt").removesuffix(".pkl")
        for nfe in args.nfe:
            row = dict(ckpt=spec, method=ckpt["method"], nfe_requested=nfe)
            runs = []
            for j in range(args.fid_seeds if image_metrics else 1):
                seeds = shard(range(args.seed + j * args.num, args.seed + (j + 1) * args.num), rank, world)
                images, counted, used = [], set(), None
                bar = tqdm(range(0, len(seeds), args.batch), disable=rank != 0, desc=f"{name} NFE {nfe}")
                for i in bar:
                    noise, labels, gens = inputs_for_seeds(seeds[i : i + args.batch], shape, label_dim)
                    x, used, calls = run_sampler(
                        module,
                        counter,
                        noise.to(device),
                        nfe,
                        None if labels is None else labels.to(device),
                        gens,
                        args.sampler_kw,
                    )
                    counted.add(calls)
                    images.append(quantize(x))
                    if not image_metrics:
                        break
                images = (
                    np.concatenate(images)
                    if images
                    else np.zeros((0, shape[1], shape[2], shape[0]), np.uint8)
                )
                row.update(nfe_reported=used, nfe=max(counted) if counted else None)
                if image_metrics:
                    runs.append(score(images, seeds))
                if j == 0 and args.grid and rank == 0:
                    grid = torch.from_numpy(images[: args.grid_n]).permute(0, 3, 1, 2).float() / 127.5 - 1
                    edm_teacher.save_image_grid(grid, suffixed(args.grid, name, nfe))
            for key in image_metrics:
                values = [r[key] for r in runs]
                row[key] = min(values) if key == "fid" else float(np.mean(values))
                if args.fid_seeds > 1:
                    row[f"{key}_mean"], row[f"{key}_all"] = float(np.mean(values)), values
            if args.trajectory and rank == 0:
                trajectory_strip(module, counter, shape, label_dim, nfe, args, name, device)
            results.append(row)
        if "straightness" in metrics or "curvature" in metrics:
            if not hasattr(module, "ode_velocity"):
                fail(f"{spec}: method {ckpt['method']} exports no ode_velocity; drop straightness/curvature")
            seeds = shard(range(args.seed, args.seed + args.ode_num), rank, world)
            per = {}
            for i in range(0, len(seeds), args.batch):
                noise, labels, _ = inputs_for_seeds(seeds[i : i + args.batch], shape, label_dim)
                try:
                    m, _ = ode_metrics(
                        module,
                        net,
                        noise.to(device),
                        None if labels is None else labels.to(device),
                        ode_grid(args.ode_steps, args.ode_grid),
                    )
                except ValueError as e:
                    fail(f"{spec}: {e}")
                for key, v in m.items():
                    per.setdefault(key, []).append(v.cpu().numpy())
            row = dict(ckpt=spec, method=ckpt["method"], ode_steps=args.ode_steps, ode_grid=args.ode_grid)
            for key in ("straightness", "straightness_rel", "curvature"):
                vals = gather_rows(seeds, np.concatenate(per[key]) if key in per else None, world)
                row[key] = float(vals.mean())
            row["nfe"] = 2 * args.ode_steps - 1
            results.append(row)
    if rank == 0:
        print_table(results, protocol)
        if args.out:
            out = dict(
                config=vars(args),
                protocol=protocol,
                results=results,
                versions=versions(),
                world_size=world,
                created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            )
            tmp = f"{args.out}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(out, f, indent=2)
            os.replace(tmp, args.out)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return results


def suffixed(path, name, nfe):
    stem, ext = os.path.splitext(path)
    return f"{stem}-{name}-nfe{nfe}{ext or '.png'}"


def trajectory_strip(module, counter, shape, label_dim, nfe, args, name, device):
    """One row per image (seeds seed..seed+n-1): the network's clean-image estimate at every call, then the
    sample (AOT Fig. 2, LOOM Fig. 13). Flow methods may export predict_x1(x, t, out); denoisers output it."""
    noise, labels, gens = inputs_for_seeds(range(args.seed, args.seed + args.trajectory_n), shape, label_dim)
    counter.trace = []
    x, _, _ = run_sampler(
        module,
        counter,
        noise.to(device),
        nfe,
        None if labels is None else labels.to(device),
        gens,
        args.sampler_kw,
    )
    trace, counter.trace = counter.trace, None
    predict = getattr(module, "predict_x1", None)
    cols = [out if predict is None else predict(xi, t, out) for xi, t, out in trace] + [x.float().cpu()]
    strip = torch.stack(cols, dim=1).flatten(0, 1)  # [n * (calls + 1), C, H, W], row-major
    save_rows(strip, len(cols), suffixed(args.trajectory, name, nfe))


def save_rows(images, cols, path):
    """images [rows * cols, C, H, W] in [-1, 1], row-major -> one PNG with `cols` images per row."""
    from PIL import Image

    x = (images * 127.5 + 128).clip(0, 255).to(torch.uint8)
    n, c, h, w = x.shape
    x = (
        x.reshape(n // cols, cols, c, h, w)
        .permute(0, 3, 1, 4, 2)
        .reshape((n // cols) * h, cols * w, c)
        .numpy()
    )
    Image.fromarray(x[:, :, 0] if c == 1 else x).save(path)


def print_table(results, protocol):
    keys = ["fid", "fid_mean", "kid", "straightness", "straightness_rel", "curvature"]
    print(f"protocol: {protocol}")
    print(
        f"{'checkpoint':<40} {'method':<12} {'NFE asked':>9} {'NFE used':>8} "
        + " ".join(f"{k:>14}" for k in keys)
    )
    for r in results:
        vals = " ".join(f"{r[k]:>14.5g}" if k in r else f"{'':>14}" for k in keys)
        asked = r.get("nfe_requested", "")
        print(
            f"{str(r['ckpt'])[-40:]:<40} {r['method']:<12} {asked!s:>9} {r.get('nfe')!s:>8} {vals}",
            flush=True,
        )


def versions():
    import importlib.metadata as md

    out = dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__)
    for pkg in ("torchvision", "clean-fid", "scipy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


# --- command line ---


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Evaluate checkpoints: FID/KID, straightness, curvature, NFE sweeps, grids.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--ckpt", nargs="*", default=[], help="checkpoints (.pt, run folder, EDM .pkl or URL)")
    p.add_argument("--pairs", default=None, help="also score a pairs file's `data` as a sample set")
    p.add_argument(
        "--nfe", type=lambda s: [int(v) for v in s.split(",") if v], default=[1, 2], help="NFE list"
    )
    p.add_argument(
        "--num-images",
        "--num",
        dest="num",
        type=int,
        default=50000,
        help="images per (checkpoint, NFE) and seed range (under torchrun write --num-images: torchrun takes "
        "--num for its --numa-binding)",
    )
    p.add_argument(
        "--sampler-kw",
        type=gen_pairs.sampler_kw,
        default={},
        help="extra keywords for every checkpoint's sample(), e.g. solver=midpoint (flows)",
    )
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--batch", type=int, default=250, help="images per sampling / feature batch and process")
    p.add_argument(
        "--metrics",
        type=lambda s: [v for v in s.split(",") if v],
        default=["fid", "kid"],
        help="any of fid,kid,straightness,curvature",
    )
    p.add_argument("--fid-mode", default="legacy_tensorflow", choices=["legacy_tensorflow", "clean"])
    p.add_argument("--fid-seeds", type=int, default=1, help="disjoint seed ranges (EDM: 3; min and mean)")
    p.add_argument("--dataset", default="cifar10", help="clean-fid reference statistics: dataset name")
    p.add_argument("--dataset-res", type=int, default=32, help="clean-fid reference statistics: resolution")
    p.add_argument("--dataset-split", default="train", help="clean-fid reference statistics: split")
    p.add_argument("--ref-stats", default=None, help="reference .npz with mu, sigma (and feats for KID)")
    p.add_argument(
        "--ref-data", default=None, help="compute the reference from data: cifar10 | FILE.npz | DIR"
    )
    p.add_argument("--data-dir", default="datasets", help="where --ref-data cifar10 is looked for")
    p.add_argument(
        "--feature-extractor",
        default="inception",
        choices=["inception", "random-cnn"],
        help="random-cnn: TESTS ONLY, not FID",
    )
    p.add_argument(
        "--ode-steps", type=int, default=100, help="Heun steps of the straightness/curvature solve"
    )
    p.add_argument("--ode-grid", default="rho", choices=["rho", "uniform"], help="time grid of that solve")
    p.add_argument("--ode-num", type=int, default=256, help="samples for straightness/curvature")
    p.add_argument("--out", default=None, help="results JSON (config, protocol, versions, results)")
    p.add_argument("--grid", default=None, help="PNG path: a grid per (checkpoint, NFE), suffixed -NAME-nfeK")
    p.add_argument("--grid-n", type=int, default=64, help="images per grid")
    p.add_argument("--trajectory", default=None, help="PNG path: x1 estimates along the sampling path")
    p.add_argument("--trajectory-n", type=int, default=8, help="rows (images) of each trajectory strip")
    p.add_argument("--cache-dir", default=None, help="download folder for checkpoint URLs")
    args = p.parse_args(argv)
    if args.sampler_kw is None:
        p.error("--sampler-kw takes KEY=VALUE[,KEY=VALUE...], e.g. solver=midpoint")
    if not args.ckpt and not args.pairs:
        p.error("give --ckpt (one or more) and/or --pairs")
    unknown = set(args.metrics) - {"fid", "kid", "straightness", "curvature"}
    if unknown:
        p.error(f"unknown metric(s) {sorted(unknown)}; choose from fid,kid,straightness,curvature")
    for name in ("num", "batch", "fid_seeds", "ode_steps", "ode_num"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if not args.nfe or min(args.nfe) < 1:
        p.error("--nfe takes positive integers, e.g. 1,2,4")
    if args.num < args.batch and any(m in args.metrics for m in ("fid", "kid")):
        p.error(f"--num-images {args.num} is smaller than --batch {args.batch}: lower --batch to at most it")
    return args


def main(argv=None):
    return evaluate(parse_args(argv))


if __name__ == "__main__":
    main()

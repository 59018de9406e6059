"""evaluate.py: one evaluator for every checkpoint of this project and for official EDM snapshots (converted
once by tools/convert_edm.py).

For each checkpoint (`--ckpt A B ...`) and each NFE (`--nfe 1,2,4`), image i is sampled from the same noise
and class label (a generator seeded with seed + i, as `edm_teacher.py --generate` and `gen_pairs.py` draw
them; stochastic samplers such as LMM's draw their extra noise from that generator too), so methods are
compared on identical inputs and the result does not depend on the number of processes. The network is
wrapped in a call counter: the NFE reported is the number of network calls actually made; beside it stand the
method's own figure (for dopri5: torchdiffeq's function evaluations, what torchcfm prints) and the solver's
attempted steps (what the official LOOM code logs). Sampler options reach every method through one flag,
`--sampler-kw solver=dopri5,atol=1e-5`.

Protocols (`--protocol`; each sets the defaults below, any flag given overrides it):
  edm   EDM (Karras et al. 2022, Sec. 5 / App. F): FID of 50,000 images against the 50k CIFAR-10 training
        images, TF-Inception pool3 (clean-fid `legacy_tensorflow`, the same network and resize as EDM's
        fid.py; torchcfm's compute_fid.py uses exactly this mode too), over 3 disjoint seed ranges
        (`--fid-seeds 3`): the minimum is EDM's figure, mean +- std beside it.
  lmm   LMM (Tables 2 and 4): EDM's protocol plus the Inception Score (Salimans et al. 2016, 10 splits) from
        the logits of that same TF-Inception network (pool3 features times the softmax layer's weights,
        without its bias, as the TF code and StyleGAN2-ADA's metric).
  loom  the official LOOM-CFM evaluator (evaluation/evaluator.py, configs/cifar10_eval.yaml): the reference
        is the CIFAR-10 *test* split, 10,000 images drawn from its 10,000 *with replacement* by torch's
        RandomSampler seeded with 42 (reproduced index for index), against 50,000 generated images; one seed
        range. Matched: the reference split, its draw, the sample count. Not matched: the paper used
        torcheval's FrechetInceptionDistance (the pytorch-fid port of the same TF-Inception weights, bilinear
        resize to 299) on float images clamped to [0, 1], and fresh torch.randn noise per batch; here the
        features are clean-fid `legacy_tensorflow` on uint8 images and image i uses seed + i. Curvature on a
        uniform grid of 1000 trajectories (Fig. 6).

Metrics (`--metrics`):
  fid, kid, is   Inception features through clean-fid (its frechet_distance and kernel_distance, KID's subsets
                 seeded); `--fid-mode clean` for clean-fid's own resize. Reference statistics: clean-fid's
                 download, or `--ref-stats FILE.npz` (mu, sigma[, feats]), or `--ref-data` (computed here,
                 `--ref-split test` for CIFAR-10's test images).
  straightness   LMM Table 1: mean over samples of integral_0^1 ||dx/dt - (x1 - x0)|| dt on a fine Heun solve
                 (`--ode-steps`) of the model's own ODE (`ode_velocity` of its method file, common clock t in
                 [0, 1] from noise to data); `straightness_rel` divides by ||x1 - x0||.
  curvature      LOOM-CFM Fig. 6: 1 - cos(v_k, v_k+1) between consecutive step velocities, its mean and its
                 value at every t (`curvature_t`).
Figures beside `--out` (matplotlib): <out>-fid_vs_nfe.png (one line per checkpoint, the papers' figures as
markers) and <out>-curvature.png (curvature against t). `--feature-extractor random-cnn` (a fixed-seed random
CNN with a random 10-way head) replaces Inception for offline tests only; the output then says so.

Commands
  python evaluate.py --protocol loom --ckpt runs/loom-cifar10 runs/otcfm --nfe 4,8,12 \
      --sampler-kw solver=midpoint --metrics fid,curvature --out results/loom.json
  torchrun --standalone --nproc_per_node=8 evaluate.py --protocol lmm --ckpt runs/lmm-cifar10 --nfe 1,2 \
      --num-images 50000                       # under torchrun --num is taken by torchrun's --numa-binding
  python evaluate.py --ckpt runs/lmm-cifar10 runs/edm-cifar10 --nfe 1,2,35 --num 50000 --out results.json \
      --grid grids.png --trajectory traj.png
  python evaluate.py --pairs pairs_cifar10_cond.npz --num 50000          # the teacher's quality
  python evaluate.py --ckpt runs/lmm-shapes --nfe 1,2 --num 256 --ref-data shapes \
      --feature-extractor random-cnn --metrics fid,kid,is,straightness,curvature   # offline smoke run
"""

import argparse
import contextlib
import datetime
import inspect
import json
import math
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
    """(module, net, ckpt) for any checkpoint of this project (an EDM .pkl: tools/convert_edm.py first);
    cache_dir: unused (nothing is downloaded)."""
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


def run_sampler(module, counter, noise, nfe, labels, gens, sample_kw=None, stats=None):
    """module.sample through the call counter -> (images [-1, 1], NFE the method reports, calls counted).
    `stats` (a dict) receives the solver's own counts where the method's sample() reports them."""
    kw = dict(sample_kw or {})
    params = inspect.signature(module.sample).parameters
    unknown = [k for k in kw if k not in params or k in ("generator", "stats")]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        fail(f"{module.METHOD}.sample takes no {unknown} (--sampler-kw); it takes {list(params)[3:]}")
    if "generator" in params:
        kw["generator"] = gens
    if "stats" in params and stats is not None:
        kw["stats"] = stats
    counter.calls = 0
    try:
        x, used = module.sample(counter, noise, nfe, labels, **kw)
    except ValueError as e:
        fail(f"{module.METHOD} cannot sample with NFE {nfe}: {e}")
    if not torch.isfinite(x).all():  # NaN would quantise to black images and still give a finite FID
        fail(f"{module.METHOD} made non-finite samples at NFE {nfe}: a broken checkpoint or --sampler-kw")
    return x, used, counter.calls


def quantize(x):
    """[-1, 1] floats -> uint8 NHWC, as EDM saves images."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# --- features, FID, KID, IS ---


class RandomCNN(nn.Module):
    """Offline stand-in for Inception (tests only): a fixed-seed random conv net -> 64 features, and a fixed
    random 10-way linear head standing in for the softmax layer (logits for IS)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        convs = [nn.Conv2d(3, 32, 3, 2, 1), nn.Conv2d(32, 64, 3, 2, 1), nn.Conv2d(64, 64, 3, 1, 1)]
        for c in convs:
            c.weight.data = torch.randn(c.weight.shape, generator=g) / (c.weight[0].numel() ** 0.5)
            c.bias.data.zero_()
        self.body = nn.Sequential(convs[0], nn.ReLU(), convs[1], nn.ReLU(), convs[2])
        self.register_buffer("head", torch.randn(10, 64, generator=g) * 4)

    def forward(self, x):  # x: [N, 3, H, W] in [0, 255]
        return self.body(x / 127.5 - 1).mean((2, 3))


def inception_softmax_weight(device):
    """The TF-Inception softmax layer's weights [1008, 2048] from clean-fid's TorchScript (the network of its
    legacy_tensorflow mode): logits = pool3 @ W.T, without the bias, as the TF IS code and StyleGAN2-ADA."""
    path = os.path.join("/tmp", INCEPTION_FILE)
    try:
        params = dict(torch.jit.load(path, map_location="cpu").named_parameters())
    except Exception as e:
        fail(f"cannot read {path} for the Inception Score ({type(e).__name__}): put {INCEPTION_FILE} there")
    w = [v for k, v in params.items() if k.endswith("weight") and tuple(v.shape) == (1008, 2048)]
    if len(w) != 1:
        fail(f"{path} has no unique [1008, 2048] softmax weight (found {len(w)}): not TF-Inception")
    return w[0].detach().double().to(device)


def build_extractor(kind, mode, device, logits=False):
    """features(uint8 NHWC numpy) -> (float64 features [N, D], float64 logits [N, K] or None)."""
    head = None
    if kind == "random-cnn":
        model = RandomCNN().to(device).eval()
        resize, head = None, model.head.double() if logits else None
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
        head = inception_softmax_weight(device) if logits else None

    @torch.no_grad()
    def extract(images):
        if resize is not None:  # clean-fid's clean mode: PIL bicubic to 299 on float images
            images = np.stack([resize(im.astype(np.uint8)) for im in images])
        x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        f = model(x.to(device)).double()
        return f.cpu().numpy(), None if head is None else (f @ head.T).cpu().numpy()

    return extract


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017): clean-fid's own function."""
    from cleanfid import fid

    return float(fid.frechet_distance(mu1, sigma1, mu2, sigma2))


def kernel_distance(feats1, feats2, num_subsets=100, max_subset_size=1000, seed=0):
    """KID (Binkowski et al. 2018), clean-fid's kernel_distance (unbiased MMD^2, cubic kernel, averaged over
    random subsets) with its numpy subset draws seeded here, so that it is reproducible."""
    from cleanfid import fid

    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return float(fid.kernel_distance(feats1, feats2, num_subsets, max_subset_size))
    finally:
        np.random.set_state(state)


def inception_score(logits, splits=10):
    """Inception Score (Salimans et al. 2016) as the TF code and StyleGAN2-ADA compute it: p(y|x) = softmax of
    each image's logits; the images in `splits` consecutive parts; per part exp(mean_x KL(p(y|x) || p(y)))
    with p(y) the part's mean. -> (mean, std) over the parts."""
    z = np.asarray(logits, dtype=np.float64)
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    p, n, scores = np.exp(log_p), len(z), []
    for k in range(splits):
        part, log_part = (
            p[k * n // splits : (k + 1) * n // splits],
            log_p[k * n // splits : (k + 1) * n // splits],
        )
        with np.errstate(invalid="ignore", divide="ignore"):
            terms = part * (log_part - np.log(part.mean(0, keepdims=True)))
        kl = np.where(part > 0, terms, 0.0).sum(1).mean()  # 0 log 0 = 0
        scores.append(np.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))


def loom_reference_indices(n, num=10000, seed=42):
    """The official LOOM evaluator's real images: torch's RandomSampler(replacement=True, num_samples=num,
    generator=torch.Generator().manual_seed(seed)) over the n test images, index for index."""
    g = torch.Generator().manual_seed(seed)
    return torch.tensor(
        list(torch.utils.data.RandomSampler(range(n), True, num, generator=g)), dtype=torch.long
    )


def load_reference_images(spec, split, data_dir):
    """--ref-data images (uint8 [N, H, W, C]; an .npy memory-mapped): split test reads CIFAR-10's 10,000 test
    images."""
    if split == "train":
        return edm_teacher.load_data(spec, data_dir)[0]
    if spec != "cifar10":
        fail(f"--ref-split test is defined for --ref-data cifar10 only, not {spec!r}")
    import torchvision

    try:
        ds = torchvision.datasets.CIFAR10(root=data_dir, train=False, download=True)
    except Exception as e:
        fail(
            f"CIFAR-10's test split is not in {data_dir}/cifar-10-batches-py and could not be downloaded "
            f"({type(e).__name__}). Put cifar-10-python.tar.gz in {data_dir}/"
        )
    return np.asarray(ds.data)


def reference(args, extract, kid, rank, world, device):
    """(mu, sigma, feats or None, description) of the reference set."""
    if args.ref_stats:
        if not os.path.isfile(args.ref_stats):
            fail(f"--ref-stats {args.ref_stats} not found (an .npz with 'mu' and 'sigma')")
        with np.load(args.ref_stats) as f:
            if "mu" not in f or "sigma" not in f:
                fail(f"--ref-stats {args.ref_stats} needs 'mu' and 'sigma' arrays (found {sorted(f.keys())})")
            feats = f["feats"] if "feats" in f else None  # noqa: SIM401 (NpzFile has no .get)
            return f["mu"], f["sigma"], feats, f"stats {args.ref_stats}"
    if args.ref_data:
        images = load_reference_images(args.ref_data, args.ref_split, args.data_dir)
        what = f"data {args.ref_data} {args.ref_split} ({len(images)} images"
        if args.ref_num:  # the official LOOM draw: with replacement, seeded
            images = images[loom_reference_indices(len(images), args.ref_num, args.ref_seed).numpy()]
            what += f", {args.ref_num} drawn with replacement by RandomSampler(seed {args.ref_seed})"
        idx = list(range(len(images)))[rank::world]
        mine = [extract(images[idx[i : i + args.batch]])[0] for i in range(0, len(idx), args.batch)]
        feats = gather_rows(idx, np.concatenate(mine) if mine else None, world)
        return feats.mean(0), np.cov(feats, rowvar=False), feats, what + ")"
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
    return mu, sigma, feats, f"{args.dataset} {args.dataset_split} {args.dataset_res}px (clean-fid)"


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
    (x_k+1 - x_k) / dt_k, its value relative to ||x1 - x0||, curvature = mean_k 1 - cos(v_k, v_k+1), and
    curvature_t [N, K - 1], the k-th value at t = grid[k + 1] (LOOM Fig. 6)."""
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
    per_t = torch.stack([1 - c for c in cos], 1) if cos else torch.zeros(len(d), 0)
    curvature = per_t.mean(1) if cos else torch.zeros(len(d))
    m = dict(straightness=straight, straightness_rel=straight / d.norm(dim=1), curvature=curvature)
    return dict(m, curvature_t=per_t), x


# --- the evaluation ---


def shard(seeds, rank, world):
    return list(seeds)[rank::world]


def gather_list(values, world):
    """A list from every rank, concatenated (all ranks)."""
    if world == 1:
        return list(values)
    parts = [None] * world
    torch.distributed.all_gather_object(parts, list(values))
    return [v for p in parts for v in p]


def summary(values):
    """The mean of per-batch counts, as an int when every batch agrees (fixed-step samplers)."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return values[0] if len(set(values)) == 1 else round(float(np.mean(values)), 2)


def evaluate(args):
    from tqdm import tqdm

    rank, world, device = gen_pairs.dist_setup()
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    metrics = args.metrics
    for path in (args.out, args.grid, args.trajectory):
        if path and rank == 0:  # before the work: a new (or --overwrite) file in a writable folder
            with contextlib.suppress(OSError):  # check_out says what is wrong with the folder
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            gen_pairs.check_out(path, args.overwrite)
    image_metrics = [m for m in metrics if m in ("fid", "kid", "is")]
    extract = ref = None
    if image_metrics:
        extract = build_extractor(args.feature_extractor, args.fid_mode, device, logits="is" in metrics)
        ref = (None, None, None, "none (IS only)")
        if "fid" in metrics or "kid" in metrics:
            ref = reference(args, extract, "kid" in metrics, rank, world, device)
    protocol = dict(
        name=args.protocol or "custom",
        source=PROTOCOLS[args.protocol]["source"] if args.protocol else "the flags given",
        features=(
            "random-cnn features: NOT FID/KID/IS (offline test protocol)"
            if args.feature_extractor == "random-cnn"
            else f"clean-fid {args.fid_mode}, TF-Inception pool3 (IS: its softmax-layer logits)"
        ),
        reference=ref[3] if ref else None,
        num_images=args.num,
        fid_seeds=args.fid_seeds,
    )

    def score(images_rows, seeds):
        """FID/KID/IS of uint8 images computed by this rank for `seeds` (all ranks gather)."""
        parts = [extract(images_rows[i : i + args.batch]) for i in range(0, len(images_rows), args.batch)]
        feats = gather_rows(seeds, np.concatenate([p[0] for p in parts]) if parts else None, world)
        out = {}
        if "fid" in metrics:
            out["fid"] = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref[0], ref[1])
        if "kid" in metrics:
            if ref[2] is None:
                fail(
                    "KID needs reference features: --ref-data, --ref-stats with feats, or clean-fid KID stats"
                )
            out["kid"] = kernel_distance(feats, ref[2])
        if "is" in metrics:
            logits = gather_rows(seeds, np.concatenate([p[1] for p in parts]) if parts else None, world)
            out["is"], out["is_std"] = inception_score(logits, args.is_splits)
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
        module, net, ckpt = load_model(spec, None, device)
        counter = CountingNet(gen_pairs.prepare_net(net, args, device))  # --precision, --compile
        k = ckpt["net_kwargs"]
        shape, label_dim = (
            (k["img_channels"], k["img_resolution"], k["img_resolution"]),
            k.get("label_dim", 0),
        )
        name = os.path.basename(os.path.normpath(spec)).removesuffix(".pt").removesuffix(".pkl")
        label = paper_label(ckpt)
        for nfe in args.nfe:
            row = dict(ckpt=spec, method=ckpt["method"], label=label, nfe_requested=nfe)
            runs, calls_all, used_all, steps_all = [], [], [], []
            for j in range(args.fid_seeds if image_metrics else 1):
                seeds = shard(range(args.seed + j * args.num, args.seed + (j + 1) * args.num), rank, world)
                images = []
                bar = tqdm(range(0, len(seeds), args.batch), disable=rank != 0, desc=f"{name} NFE {nfe}")
                for i in bar:
                    noise, labels, gens = inputs_for_seeds(seeds[i : i + args.batch], shape, label_dim)
                    st = {}
                    x, used, calls = run_sampler(
                        module,
                        counter,
                        noise.to(device),
                        nfe,
                        None if labels is None else labels.to(device),
                        gens,
                        args.sampler_kw,
                        st,
                    )
                    calls_all.append(calls)
                    used_all.append(used)
                    steps_all.append(st.get("solver_steps"))
                    images.append(quantize(x))
                    if not image_metrics:
                        break
                images = (
                    np.concatenate(images)
                    if images
                    else np.zeros((0, shape[1], shape[2], shape[0]), np.uint8)
                )
                if image_metrics:
                    runs.append(score(images, seeds))
                if j == 0 and args.grid and rank == 0:
                    grid = torch.from_numpy(images[: args.grid_n]).permute(0, 3, 1, 2).float() / 127.5 - 1
                    save_image_grid(grid, suffixed(args.grid, name, nfe))
            # network calls counted (per sampling batch), the method's own figure (dopri5: torchdiffeq's
            # function evaluations), the solver's attempted steps (the official LOOM code's num_steps)
            row.update(
                nfe=summary(gather_list(calls_all, world)),
                nfe_reported=summary(gather_list(used_all, world)),
                solver_steps=summary(gather_list(steps_all, world)),
            )
            for key in [m for m in image_metrics if m in runs[0]] if runs else ():
                values = [r[key] for r in runs]
                row[key] = min(values) if key == "fid" else float(np.mean(values))  # EDM: min over seeds
                if args.fid_seeds > 1:
                    row[f"{key}_all"] = values
                    if key != "is":  # IS: the mean over seed ranges, is_std over the first range's splits
                        row[f"{key}_mean"], row[f"{key}_std"] = float(np.mean(values)), float(np.std(values))
            if "is" in image_metrics and runs:
                row["is_std"] = runs[0]["is_std"]
            if args.trajectory and rank == 0:
                trajectory_strip(module, counter, shape, label_dim, nfe, args, name, device)
            results.append(row)
        if "straightness" in metrics or "curvature" in metrics:
            if not hasattr(module, "ode_velocity"):
                fail(f"{spec}: method {ckpt['method']} exports no ode_velocity; drop straightness/curvature")
            seeds = shard(range(args.seed, args.seed + args.ode_num), rank, world)
            grid, per = ode_grid(args.ode_steps, args.ode_grid), {}
            for i in range(0, len(seeds), args.batch):
                noise, labels, _ = inputs_for_seeds(seeds[i : i + args.batch], shape, label_dim)
                try:
                    m, _ = ode_metrics(
                        module, net, noise.to(device), None if labels is None else labels.to(device), grid
                    )
                except ValueError as e:
                    fail(f"{spec}: {e}")
                for key, v in m.items():
                    per.setdefault(key, []).append(v.cpu().numpy())
            row = dict(ckpt=spec, method=ckpt["method"], label=label, ode_steps=args.ode_steps,
                       ode_grid=args.ode_grid, ode_num=args.ode_num)  # fmt: skip
            for key in ("straightness", "straightness_rel", "curvature", "curvature_t"):
                vals = gather_rows(seeds, np.concatenate(per[key]) if key in per else None, world)
                row[key] = float(vals.mean()) if vals.ndim == 1 else vals.mean(0)
            row["curvature_t"] = [
                [float(t), float(c)] for t, c in zip(grid[1:-1], row["curvature_t"], strict=True)
            ]
            row["nfe"] = 2 * args.ode_steps - 1
            results.append(row)
    if rank == 0:
        print_table(results, protocol)
        if args.out:
            out = dict(
                config=vars(args),
                protocol=protocol,
                results=results,
                figures=write_figures(results, args.out) if args.figures else [],
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


# --- figures: FID against NFE with the papers' figures, curvature against t ---

# The papers' CIFAR-10 (unconditional) figures, as (solver, NFE, FID): LOOM-CFM Table 1 (its OT-CFM midpoint
# rows computed by the LOOM authors with torchcfm's code, the rest quoted from Tong et al. and Liu et al.),
# EDM Table 2 and LMM Table 2. Each paper's own protocol: see PROTOCOLS.
PAPER_FID = {
    "I-CFM": [("euler", 100, 4.46), ("euler", 1000, 3.64), ("dopri5", 146, 3.66)],
    "OT-CFM": [("midpoint", 4, 15.95), ("midpoint", 8, 9.73), ("midpoint", 12, 7.77), ("euler", 100, 4.44),
               ("dopri5", 134, 3.57)],
    "LOOM-CFM": [("midpoint", 4, 11.60), ("midpoint", 8, 5.38), ("midpoint", 12, 4.60),
                 ("dopri5", 134, 4.41)],
    "LOOM-CFM + reflow": [("euler", 1, 7.63), ("midpoint", 2, 4.49)],
    "1-Rect-Flow": [("euler", 1, 378.0)],
    "2-Rect-Flow": [("euler", 1, 12.21)],
    "3-Rect-Flow": [("euler", 1, 8.15)],
    "EDM": [("heun", 35, 1.97)],
    "LMM": [("lmm", 1, 1.90), ("lmm", 2, 1.55)],
}  # fmt: skip


def paper_label(ckpt):
    """Which paper row a checkpoint reproduces, from its method and training flags (None: no paper row)."""
    method, a = ckpt.get("method"), ckpt.get("args") or {}
    if method == "loom_cfm":
        return "LOOM-CFM"
    if method == "cfm_couplings":
        if a.get("coupling") == "pairs":
            return "LOOM-CFM + reflow" if a.get("preset") == "loom-reflow" else "2-Rect-Flow"
        return {"independent": "I-CFM", "ot": "OT-CFM", "sinkhorn": "OT-CFM"}.get(a.get("coupling"))
    return {"edm_teacher": "EDM", "lmm": "LMM"}.get(method)


def write_figures(results, out):
    """<out>-fid_vs_nfe.png and <out>-curvature.png beside the JSON -> the paths written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stem, paths = os.path.splitext(out)[0], []
    fid_rows = [r for r in results if "fid" in r and r.get("nfe") and "nfe_requested" in r]
    if fid_rows:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for i, ckpt in enumerate(dict.fromkeys(r["ckpt"] for r in fid_rows)):
            rows = sorted((r for r in fid_rows if r["ckpt"] == ckpt), key=lambda r: r["nfe"])
            name = os.path.basename(os.path.normpath(ckpt))
            label = f"{rows[0]['label'] or rows[0]['method']} ({name})"
            ax.plot([r["nfe"] for r in rows], [r["fid"] for r in rows], "o-", color=f"C{i}", label=label)
            for solver, nfe, fid in PAPER_FID.get(rows[0]["label"], []):
                ax.plot(nfe, fid, "x", color=f"C{i}", ms=9, mew=2)
                ax.annotate(
                    solver, (nfe, fid), fontsize=7, color=f"C{i}", xytext=(3, 3), textcoords="offset points"
                )
        ax.plot([], [], "kx", label="paper's figure (its protocol)")
        ax.set(xscale="log", yscale="log", xlabel="NFE (network calls)", ylabel="FID")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        paths.append(f"{stem}-fid_vs_nfe.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    curv_rows = [r for r in results if r.get("curvature_t")]
    if curv_rows:
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for i, r in enumerate(curv_rows):
            t, c = zip(*r["curvature_t"], strict=True)
            name = os.path.basename(os.path.normpath(r["ckpt"]))
            ax.plot(t, c, color=f"C{i}", label=f"{r['label'] or r['method']} ({name})")
        positive = all(c > 0 for r in curv_rows for _, c in r["curvature_t"])
        steps = f"{curv_rows[0]['ode_steps']} {curv_rows[0]['ode_grid']} Heun steps"
        ax.set(
            xlabel="t (0 noise, 1 data)",
            ylabel="1 - cos(v_k, v_k+1)",
            title=f"curvature along the ODE ({steps})",
        )
        ax.set_yscale("log" if positive else "linear")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        paths.append(f"{stem}-curvature.png")
        fig.savefig(paths[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return paths


def save_image_grid(images, path):
    """images [N, C, H, W] in [-1, 1] -> a square-ish PNG grid; torchvision rounds (x + 1) / 2 * 255 + 0.5,
    which is EDM's quantisation x * 127.5 + 128."""
    from torchvision.utils import save_image

    save_image((images.float().cpu() + 1) / 2, path, nrow=math.ceil(math.sqrt(len(images))), padding=0)


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
    keys = [
        "fid",
        "fid_mean",
        "fid_std",
        "kid",
        "is",
        "is_std",
        "straightness",
        "straightness_rel",
        "curvature",
    ]
    print(f"protocol {protocol['name']} ({protocol['source']}): {protocol['features']}; "
          f"reference {protocol['reference']}")  # fmt: skip
    print(
        f"{'checkpoint':<32} {'method':<14} {'NFE asked':>9} {'calls':>7} {'method':>7} {'steps':>6} "
        + " ".join(f"{k:>11}" for k in keys if any(k in r for r in results))
    )
    for r in results:
        vals = " ".join(
            f"{r[k]:>11.5g}" if k in r else f"{'':>11}" for k in keys if any(k in q for q in results)
        )
        asked = r.get("nfe_requested", "")
        print(
            f"{str(r['ckpt'])[-32:]:<32} {r['method']:<14} {asked!s:>9} {r.get('nfe')!s:>7} "
            f"{r.get('nfe_reported', '')!s:>7} {r.get('solver_steps', '')!s:>6} {vals}",
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


# --protocol NAME: each paper's evaluation as defaults (any flag given overrides them); see the docstring.
PROTOCOLS = {
    "edm": dict(
        source="EDM (Karras et al. 2022) Sec. 5 and its fid.py; torchcfm's compute_fid.py (one seed range)",
        defaults=dict(metrics=["fid"], fid_mode="legacy_tensorflow", dataset="cifar10", dataset_split="train",
                      dataset_res=32, num=50000, fid_seeds=3),
    ),
    "lmm": dict(
        source="LMM (Matityahu & Fattal) Tables 2 and 4: EDM's FID protocol plus IS (10 splits)",
        defaults=dict(metrics=["fid", "is"], fid_mode="legacy_tensorflow", dataset="cifar10",
                      dataset_split="train", dataset_res=32, num=50000, fid_seeds=3),
    ),
    "loom": dict(
        source="LOOM-CFM Sec. 4 and its official evaluator (configs/cifar10_eval.yaml): CIFAR-10 test split, "
        "10k real images drawn with replacement (RandomSampler, seed 42), 50k samples; paper: torcheval on "
        "float images, here clean-fid legacy_tensorflow on uint8",
        defaults=dict(metrics=["fid"], fid_mode="legacy_tensorflow", ref_data="cifar10", ref_split="test",
                      ref_num=10000, ref_seed=42, num=50000, fid_seeds=1, ode_grid="uniform", ode_num=1000),
    ),
}  # fmt: skip
METRICS = ("fid", "kid", "is", "straightness", "curvature")


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Evaluate checkpoints: FID/KID/IS, straightness, curvature, NFE sweeps, grids, figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--ckpt",
        nargs="*",
        default=[],
        help="checkpoints (.pt or run folder; an EDM .pkl converted by tools/convert_edm.py)",
    )
    p.add_argument("--pairs", default=None, help="also score a pairs file's `data` as a sample set")
    p.add_argument(
        "--protocol",
        default=None,
        choices=sorted(PROTOCOLS),
        help="a paper's evaluation protocol as defaults",
    )
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
        help="extra keywords for every checkpoint's sample(), e.g. solver=dopri5,atol=1e-5 (flows)",
    )
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")
    p.add_argument("--batch", type=int, default=250, help="images per sampling / feature batch and process")
    p.add_argument(
        "--metrics",
        type=lambda s: [v for v in s.split(",") if v],
        default=["fid", "kid"],
        help="any of " + ",".join(METRICS),
    )
    p.add_argument("--fid-mode", default="legacy_tensorflow", choices=["legacy_tensorflow", "clean"])
    p.add_argument(
        "--fid-seeds", type=int, default=1, help="disjoint seed ranges (EDM: 3): min, mean and std reported"
    )
    p.add_argument("--is-splits", type=int, default=10, help="Inception Score splits (Salimans et al.: 10)")
    p.add_argument("--dataset", default="cifar10", help="clean-fid reference statistics: dataset name")
    p.add_argument("--dataset-res", type=int, default=32, help="clean-fid reference statistics: resolution")
    p.add_argument("--dataset-split", default="train", help="clean-fid reference statistics: split")
    p.add_argument("--ref-stats", default=None, help="reference .npz with mu, sigma (and feats for KID)")
    p.add_argument(
        "--ref-data",
        default=None,
        help="compute the reference from data: cifar10 | shapes | FILE.npy (tools/prepare_data.py) | "
        "FILE.npz (uint8 NHWC 'images')",
    )
    p.add_argument("--ref-split", default="train", choices=["train", "test"], help="--ref-data cifar10 split")
    p.add_argument(
        "--ref-num", type=int, default=0, help="draw this many reference images with replacement (0: all)"
    )
    p.add_argument("--ref-seed", type=int, default=42, help="seed of that draw (the LOOM evaluator: 42)")
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
    p.add_argument(
        "--overwrite", action="store_true", help="replace an existing --out / --grid / --trajectory"
    )
    p.add_argument(
        "--no-figures",
        dest="figures",
        action="store_false",
        help="no FID-vs-NFE / curvature PNGs beside --out",
    )
    p.add_argument("--grid", default=None, help="PNG path: a grid per (checkpoint, NFE), suffixed -NAME-nfeK")
    p.add_argument("--grid-n", type=int, default=64, help="images per grid")
    p.add_argument("--trajectory", default=None, help="PNG path: x1 estimates along the sampling path")
    p.add_argument("--trajectory-n", type=int, default=8, help="rows (images) of each trajectory strip")
    gen_pairs.add_speed_args(p)
    known, _ = p.parse_known_args(argv)
    if known.protocol:
        p.set_defaults(**PROTOCOLS[known.protocol]["defaults"])
    args = p.parse_args(argv)
    if args.sampler_kw is None:
        p.error("--sampler-kw takes KEY=VALUE[,KEY=VALUE...], e.g. solver=midpoint")
    if not args.ckpt and not args.pairs:
        p.error("give --ckpt (one or more) and/or --pairs")
    unknown = set(args.metrics) - set(METRICS)
    if unknown:
        p.error(f"unknown metric(s) {sorted(unknown)}; choose from {','.join(METRICS)}")
    for name in ("num", "batch", "fid_seeds", "ode_steps", "ode_num", "is_splits"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.ref_num < 0:
        p.error("--ref-num must be >= 0")
    if not args.nfe or min(args.nfe) < 1:
        p.error("--nfe takes positive integers, e.g. 1,2,4")
    if args.num < args.batch and any(m in args.metrics for m in ("fid", "kid", "is")):
        p.error(f"--num-images {args.num} is smaller than --batch {args.batch}: lower --batch to at most it")
    return args


def main(argv=None):
    return evaluate(parse_args(argv))


if __name__ == "__main__":
    main()

"""evaluate.py: FID / KID / IS of any checkpoint of this project in each paper's protocol, the straightness
and curvature of its ODE, NFE sweeps and a figure of FID against NFE beside the papers' figures.

Image i of every checkpoint and NFE starts from the same noise and label (a generator seeded with seed + i,
as `edm_teacher.py --generate` and `gen_pairs.py`), for any number of processes. `nfe` counts the network
calls; beside it stand the method's own figure (dopri5: torchdiffeq's) and the solver's steps (LOOM's log).
Only the method files' interface is used (METHOD, build_net, sample, ode_start, ode_velocity); a fork's file
is named by `--method FILE.py`. `--protocol` sets a paper's evaluation (one line each in --help; more in
docs/evaluate.md). Straightness and curvature are measured on the common flow clock (ode_metrics).

    python evaluate.py --protocol loom --ckpt runs/loom-cifar10 runs/otcfm --nfe 4,8,12 \\
        --sampler-kw solver=midpoint --metrics fid,curvature --out results/loom.json
    torchrun --standalone --nproc_per_node=8 evaluate.py --protocol lmm --ckpt runs/lmm-cifar10 --nfe 1,2
"""

import argparse
import contextlib
import datetime
import fcntl
import importlib.util  # binds importlib too
import inspect
import json
import math
import os
import re
import zipfile

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

METHODS = ("edm_teacher", "aot_edm", "lmm", "cfm_couplings", "loom_cfm", "dansm")  # a checkpoint names one
INCEPTION_FILE = "inception-2015-12-05.pt"  # clean-fid's TorchScript TF-Inception, looked for in /tmp
LOCKS = {}  # --out -> its open .lock file, held by this process

PROTOCOLS = {  # name: (one line for --help and the JSON, defaults)
    "edm": ("EDM Sec. 5: TF-Inception (clean-fid legacy_tensorflow), CIFAR-10 train statistics, 50k images "
            "x 3 seed ranges, the minimum", dict(metrics=["fid"], num_images=50000, fid_seeds=3)),
    "lmm": ("LMM Tables 2/4/7: EDM's FID and IS (TF-Inception logits, 10 splits), 50k images x 3 seed "
            "ranges, mean +- std", dict(metrics=["fid", "is"], num_images=50000, fid_seeds=3,
                                        fid_stat="mean")),
    "loom": ("LOOM-CFM's evaluator: torcheval 0.0.7 FID (torchvision Inception-v3 on float [0, 1] images), "
             "CIFAR-10 test 10k drawn with replacement (seed 42), 50k images, one range",
             dict(metrics=["fid"], features="torcheval", ref_data="cifar10", ref_split="test", ref_num=10000,
                  num_images=50000, ode_grid="uniform", ode_num=1000)),
}  # fmt: skip
# The papers' CIFAR-10 figures as (solver, NFE, FID), each in its paper's protocol: LOOM-CFM Table 1 (its
# OT-CFM midpoint rows by the LOOM authors, the rest quoted from Tong et al. and Liu et al.), LMM Table 2
# (EDM's row included), unconditional and conditional.
PAPER_FID = {
    "I-CFM": [("euler", 100, 4.46), ("euler", 1000, 3.64), ("dopri5", 146, 3.66)],
    "OT-CFM": [("midpoint", 4, 15.95), ("midpoint", 8, 9.73), ("midpoint", 12, 7.77), ("euler", 100, 4.44),
               ("dopri5", 134, 3.57)],
    "LOOM-CFM": [("midpoint", 4, 11.60), ("midpoint", 8, 5.38), ("midpoint", 12, 4.60),
                 ("dopri5", 134, 4.41)],
    "LOOM-CFM + reflow": [("euler", 1, 7.63), ("midpoint", 2, 4.49)],
    "2-Rect-Flow": [("euler", 1, 12.21)],
    "EDM": [("heun", 35, 1.97)], "EDM cond": [("heun", 35, 1.79)],
    "LMM": [("lmm", 1, 1.90), ("lmm", 2, 1.55)], "LMM cond": [("lmm", 1, 1.57), ("lmm", 2, 1.39)],
}  # fmt: skip


# --- the metrics ---
def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2)) (Heusel et al. 2017): clean-fid's own function."""
    from cleanfid import fid

    return float(fid.frechet_distance(mu1, sigma1, mu2, sigma2))


def torcheval_fid(real, fake):
    """torcheval 0.0.7's FrechetInceptionDistance (LOOM's code): its float32 sums, then its compute()."""
    from torcheval.metrics import FrechetInceptionDistance

    metric = FrechetInceptionDistance(model=nn.Identity(), feature_dim=real.shape[1])
    for name, f in (("real", real), ("fake", fake)):
        f = torch.as_tensor(np.asarray(f), dtype=torch.float32)
        setattr(metric, f"{name}_sum", f.sum(0))
        setattr(metric, f"{name}_cov_sum", f.T @ f)
        setattr(metric, f"num_{name}_images", torch.tensor(len(f)).int())
    return float(metric.compute())


def kernel_distance(feats1, feats2, num_subsets=100, max_subset_size=1000, seed=0):
    """KID (Binkowski et al. 2018): clean-fid's kernel_distance, its random subsets seeded here."""
    from cleanfid import fid

    np.random.seed(seed)  # clean-fid draws the subsets from numpy's global generator
    return float(fid.kernel_distance(feats1, feats2, num_subsets, max_subset_size))


def inception_score(logits, splits=10):
    """Inception Score (Salimans et al. 2016) as the TF code and StyleGAN2-ADA: p(y|x) = softmax(logits); per
    consecutive part exp(mean_x KL(p(y|x) || p(y))), p(y) the part's mean -> (mean, std) over the parts."""
    z = np.asarray(logits, dtype=np.float64)
    log_p = z - z.max(1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(1, keepdims=True))
    scores = []
    for part in np.array_split(np.arange(len(z)), splits):
        p, log_p_part = np.exp(log_p[part]), log_p[part]
        with np.errstate(invalid="ignore", divide="ignore"):
            terms = p * (log_p_part - np.log(p.mean(0, keepdims=True)))
        scores.append(np.exp(np.where(p > 0, terms, 0.0).sum(1).mean()))  # 0 log 0 = 0
    return float(np.mean(scores)), float(np.std(scores))


def ode_grid(n, kind="rho", sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """n + 1 times from 0 (noise) to 1 (data) on the common clock. 'rho': t = 1 - sigma / sigma_max at EDM's
    rho-schedule levels (EDM Eq. 5: fine where EDM-family ODEs bend, near the data), then 1; 'uniform'."""
    if kind == "uniform":
        return torch.linspace(0, 1, n + 1, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (a + torch.arange(n, dtype=torch.float64) / max(n - 1, 1) * (b - a)) ** rho
    return torch.cat([1 - sigmas / sigma_max, torch.ones(1, dtype=torch.float64)])


@torch.no_grad()
def ode_metrics(module, net, noise, labels=None, steps=100, grid=None):
    """Heun (Euler last) on dx/dt = ode_velocity(net, x, t) from ode_start(net, noise), `steps` steps on a
    `grid` (rho, uniform; default rho for the EDM family, uniform for flows); on the flow clock: straightness
    = sum_k ||chord_k - (y1 - y0)|| ds_k (LMM Table 1), straightness_rel = that / ||y1 - y0||, curvature_t =
    1 - cos(u_k, u_k+1), u the velocity at consecutive solver times (LOOM Fig. 6), curvature = its mean
    -> (metrics per sample, x at t = 1, the flow-clock times of curvature_t)."""
    start = getattr(module, "ode_start", lambda net, z: z)
    sigma_max = float(start(net, torch.ones(())))  # EDM family (x = y + sigma n): 80; flows: 1
    t = ode_grid(steps, grid or ("rho" if sigma_max != 1 else "uniform"))
    xs, vs = [start(net, noise).float()], []
    for k in range(steps):
        dt, v = float(t[k + 1] - t[k]), module.ode_velocity(net, xs[-1], float(t[k]), labels)
        x = xs[-1] + dt * v
        if k < steps - 1:
            x = xs[-1] + dt * 0.5 * (v + module.ode_velocity(net, x, float(t[k + 1]), labels))
        xs, vs = xs + [x], vs + [v]
    xs, vs, s = torch.stack(xs, 1).flatten(2).double().cpu(), torch.stack(vs, 1).flatten(2).double().cpu(), t
    if sigma_max != 1:  # y = s x, sigma = sigma_max (1 - t), s = 1 / (1 + sigma): dy/ds = x + x'(t) / (80 s)
        s = 1 / (1 + sigma_max * (1 - t))
        xs, vs = xs * s[:, None], xs[:, :-1] + vs / (sigma_max * s[:-1, None])
    s = (s - s[0]) / (s[-1] - s[0])  # rescaled to [0, 1]
    ds = s[1:] - s[:-1]
    chords, d = (xs[:, 1:] - xs[:, :-1]) / ds[:, None], xs[:, -1] - xs[:, 0]
    straight = ((chords - d[:, None]).norm(dim=2) * ds).sum(1)
    per_t = 1 - F.cosine_similarity(vs[:, :-1], vs[:, 1:], dim=2)
    m = dict(straightness=straight, straightness_rel=straight / d.norm(dim=1), curvature=per_t.mean(1))
    return dict(m, curvature_t=per_t), x, s[1:-1]


# --- feature networks: uint8 NHWC images or [-1, 1] float NCHW samples -> features (and logits for IS) ---
def torchvision_inception(random=False):
    """torcheval 0.0.7's FIDInceptionV3 (LOOM's FID network): a bilinear resize to 299 of floats in [0, 1],
    then torchvision's Inception-v3 with its ImageNet weights and transform_input (as torchvision sets them),
    fc removed -> 2048 features. random=True: fixed-seed random weights (tests only)."""
    from torchvision.models import Inception_V3_Weights, inception_v3

    weights = None if random else Inception_V3_Weights.DEFAULT
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = inception_v3(weights=weights, aux_logits=True, init_weights=False, transform_input=True)
    except Exception as e:
        name, where = os.path.basename(weights.url), os.path.join(torch.hub.get_dir(), "checkpoints")
        fail(f"cannot load torchvision's Inception-v3 ({type(e).__name__}): put {name} in {where}/")
    model.fc = nn.Identity()
    return nn.Sequential(nn.Upsample(size=(299, 299), mode="bilinear", align_corners=False), model)


def build_extractor(kind, device, logits=False):
    """extract(images) -> (float64 features [N, D], float64 logits or None), extract.dim = D. clean-fid
    (legacy_tensorflow: EDM's network and resize) and random-cnn see EDM's uint8 quantisation; torcheval and
    random-inception floats in [0, 1] as LOOM's code (real images u / 255, samples (x + 1) / 2 clamped)."""
    floats, head = kind in ("torcheval", "random-inception"), None
    if floats:
        model = torchvision_inception(random=kind == "random-inception")
    elif kind == "random-cnn":  # tests only, not FID: fixed random features of 4x4-pooled images, 10 logits
        g = torch.Generator().manual_seed(0)
        w, head = torch.randn(48, 64, generator=g).to(device), (torch.randn(10, 64, generator=g) * 4).double()
        model = lambda x: torch.tanh(F.adaptive_avg_pool2d(x / 127.5 - 1, 4).flatten(1) @ w)  # noqa: E731
    else:
        from cleanfid import features

        path = os.path.join("/tmp", INCEPTION_FILE)
        try:
            model = features.build_feature_extractor("legacy_tensorflow", device, use_dataparallel=False)
            params = dict(torch.jit.load(path, map_location="cpu").named_parameters()) if logits else {}
        except Exception as e:
            fail(f"cannot load clean-fid's Inception ({type(e).__name__}): put {INCEPTION_FILE} at {path}")
        # IS: pool3 times the softmax layer's weights, without its bias, as the TF code and StyleGAN2-ADA
        w = [v for k, v in params.items() if k.endswith("weight") and tuple(v.shape) == (1008, 2048)]
        if logits and len(w) != 1:
            fail(f"{path} has no unique [1008, 2048] softmax weight: not TF-Inception")
        head = w[0].detach().double().to(device) if logits else None
    model = model.to(device).eval().requires_grad_(False) if kind != "random-cnn" else model

    @torch.no_grad()
    def extract(images):
        x = torch.as_tensor(images)
        x = x.permute(0, 3, 1, 2) if x.dtype == torch.uint8 else x.float().cpu()  # uint8 NHWC, float NCHW
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if floats:
            x = x.float() / 255 if x.dtype == torch.uint8 else ((x + 1) / 2).clamp(0, 1)
        else:
            x = (x if x.dtype == torch.uint8 else (x * 127.5 + 128).clip(0, 255).to(torch.uint8)).float()
        f = model(x.contiguous().to(device)).double()
        return f.cpu().numpy(), None if head is None else (f @ head.T).cpu().numpy()

    extract.dim = 64 if kind == "random-cnn" else 2048
    return extract


def fail(msg):
    raise SystemExit(f"error: {msg}")  # one line for the user, exit code 1, no traceback


def claim_out(out, written, overwrite, rank):
    """Before any work: outputs that exist (the exact names) need --overwrite; rank 0 locks OUT.lock."""
    if long := [n for n in [*written, f"{out}.tmp{os.getpid()}"] if len(os.path.basename(n)) > 255]:
        fail(f"{out}: the name is too long ({os.path.basename(long[0])} is over 255 characters)")
    if (old := [n for n in written if os.path.exists(n)]) and not overwrite:
        fail(f"{old[0]} exists; pass --overwrite to replace it")
    if rank == 0 and out not in LOCKS:  # a missing or read-only folder: an OSError, one line in main()
        lock = LOCKS[out] = open(f"{out}.lock", "a+")  # noqa: SIM115  (held for the life of the process)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.seek(0), LOCKS.pop(out)
            fail(f"{out} is locked by a running job ({lock.read()}); wait for it or choose another --out")
        lock.truncate(0), lock.write(f"pid {os.getpid()} on {os.uname().nodename}"), lock.flush()


def load_checkpoint(spec, method=None):
    """(module, ckpt) for a checkpoint (or run folder) of this project: CRC-checked, loaded without executing
    code, its tensors memory-mapped; the module is the project's file it names, or the fork's `method`."""
    if spec.endswith(".pkl") or "://" in spec:  # never unpickled or downloaded here
        fail(f"{spec} is an EDM snapshot: convert it first with python tools/convert_edm.py {spec} OUT.pt")
    path = os.path.join(spec, "latest.pt") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        fail(f"checkpoint not found: {spec} (a .pt checkpoint or a run folder)")
    try:  # CRCs, and no member flagged a directory (torch would load uninitialised memory for it)
        with zipfile.ZipFile(path) as z:
            bad, infos = z.testzip(), z.infolist()
        bad = bad or next((i.filename for i in infos if i.is_dir() or i.external_attr & 0x10), None)
        if bad:
            fail(f"{path} is corrupt: its member {bad} is damaged (CRC or zip structure)")
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a cut-off or foreign file: never unpickled unsafely
        why = (str(e) or type(e).__name__).splitlines()[0]
        fail(f"{path} is corrupt or not a weights-only torch checkpoint: {why}")
    kw = ckpt.get("net_kwargs") if isinstance(ckpt, dict) else None
    if not isinstance(kw, dict) or not {"img_channels", "img_resolution"} <= kw.keys() or "net" not in ckpt:
        fail(f"{path} is not a checkpoint of this project: no net, or no net_kwargs with the image shape")
    if method and not (method.endswith(".py") and os.path.isfile(method)):
        fail(f"--method {method} is not a .py file")
    if method:  # a fork's file, named by the user: a checkpoint never chooses which code runs
        spec_ = importlib.util.spec_from_file_location(os.path.basename(method)[:-3], method)
        spec_.loader.exec_module(module := importlib.util.module_from_spec(spec_))
    elif ckpt.get("method") in METHODS:
        module = importlib.import_module(ckpt["method"])
    else:
        fail(f"{spec}: unknown method {ckpt.get('method')!r}; this project's are {', '.join(METHODS)} "
             "(a fork's checkpoint: --method path/to/file.py)")  # fmt: skip
    if not isinstance(version := ckpt.get("version", 1), int) or version > getattr(module, "VERSION", 1):
        fail(f"{spec}: a version {version} {ckpt['method']} checkpoint; this code reads <= {module.VERSION}")
    return module, ckpt


def load_images(spec, split, data_dir):
    """uint8 [N, H, W, C]: cifar10 (torchvision, train or test), FILE.npy (prepare_data.py) or FILE.npz."""
    if spec == "cifar10":
        import torchvision

        try:
            return torchvision.datasets.CIFAR10(root=data_dir, train=split == "train", download=True).data
        except Exception as e:
            fail(f"CIFAR-10 is not in {data_dir}/ and cannot be downloaded ({type(e).__name__}): put "
                 f"cifar-10-python.tar.gz in {data_dir}/")  # fmt: skip
    if split != "train":
        fail(f"--ref-split test is defined for --ref-data cifar10 only, not {spec!r}")
    try:
        images = np.load(spec, mmap_mode="r") if spec.endswith(".npy") else np.load(spec)["images"]
    except (OSError, ValueError, KeyError) as e:
        fail(f"--ref-data {spec}: {e} (cifar10, an .npy of tools/prepare_data.py or an .npz with 'images')")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
        fail(f"--ref-data {spec}: images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    return images


def clean_fid_file(args, kid=False):
    """clean-fid's file of reference statistics (kid: of KID features; it ships none for CIFAR-10)."""
    from cleanfid import fid

    name = f"{args.dataset}_legacy_tensorflow_{args.dataset_split}_{args.dataset_res}{'_kid' * kid}.npz"
    return os.path.join(os.path.dirname(fid.__file__), "stats", name.lower())


def reference(args, images, extract, rank, world):
    """(mu, sigma, feats or None, description): --ref-stats, --ref-data's features (LOOM's draw: --ref-num),
    or clean-fid's statistics (KID: its file, else features of the dataset computed here)."""
    if args.ref_stats:
        with np.load(args.ref_stats) as f:
            return f["mu"], f["sigma"], f["feats"] if "feats" in f.files else None, f"stats {args.ref_stats}"
    if images is None:
        from cleanfid import fid

        try:
            stats = (args.dataset, args.dataset_res, "legacy_tensorflow")
            mu, sigma = fid.get_reference_statistics(*stats, split=args.dataset_split)
        except Exception as e:
            fail(f"no clean-fid statistics ({type(e).__name__}): put {clean_fid_file(args)} (or --ref-data)")
        what = f"{args.dataset} {args.dataset_split} {args.dataset_res}px (clean-fid statistics)"
        if "kid" not in args.metrics or os.path.isfile(clean_fid_file(args, kid=True)):
            feats = np.load(clean_fid_file(args, True))["feats"] if "kid" in args.metrics else None
            return mu, sigma, feats, what
        images = load_images(args.dataset, args.dataset_split, args.data_dir)
        what += f"; KID features computed here from its {len(images)} images (clean-fid has no file)"
    else:
        what = f"data {args.ref_data} {args.ref_split} ({len(images)} images)"
        if args.ref_num:  # the official LOOM draw: with replacement, seeded
            g = torch.Generator().manual_seed(42)  # LOOM's RandomSampler with its seed, index for index
            draw = torch.utils.data.RandomSampler(range(len(images)), True, args.ref_num, generator=g)
            images = images[list(draw)]
            what += f", {args.ref_num} drawn with replacement by RandomSampler(seed 42)"
    idx = list(range(len(images)))[rank::world]
    mine = [extract(np.asarray(images[idx[i : i + args.batch]]))[0] for i in range(0, len(idx), args.batch)]
    feats = gather_rows(idx, np.concatenate(mine) if mine else np.zeros((0, extract.dim)), world)
    if args.ref_data is None:  # clean-fid's FID statistics, KID's features from the data
        return mu, sigma, feats, what
    return feats.mean(0), np.cov(feats, rowvar=False), feats, what


def gather_rows(indices, rows, world):
    """Rows computed by each rank for its indices -> all rows in index order (on every rank)."""
    parts = [(list(indices), rows)] * world
    torch.distributed.all_gather_object(parts, parts[0]) if world > 1 else None
    order = np.argsort(np.concatenate([p[0] for p in parts]), kind="stable")
    return np.concatenate([p[1] for p in parts])[order]


def inputs_for_seeds(seeds, shape, label_dim=0, device="cpu"):
    """Image i: noise, then its uniform label, from torch.Generator(seeds[i]), returned with it."""
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
    labels = torch.stack([torch.randint(label_dim, [], generator=g) for g in gens]) if label_dim else None
    return noise.to(device), labels if labels is None else labels.to(device), gens


def run_sampler(module, net, noise, nfe, labels, gens, sample_kw=None, stats=None):
    """module.sample, its network calls counted by a hook -> (images in [-1, 1], NFE the method reports, calls
    counted); `stats` receives the solver's own counts where the method's sample() reports them."""
    params, kw, calls = inspect.signature(module.sample).parameters, dict(sample_kw or {}), []
    kw |= dict(generator=gens) if "generator" in params else {}
    kw |= dict(stats=stats) if "stats" in params and stats is not None else {}
    hook = net.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        x, used = module.sample(net, noise, nfe, labels, **kw)
    except (TypeError, ValueError, AssertionError) as e:  # an NFE or --sampler-kw value, a dt underflow
        fail(f"{module.METHOD} cannot sample with NFE {nfe} and --sampler-kw {sample_kw or {}}: {e!r}")
    finally:
        hook.remove()
    if not torch.isfinite(x).all():  # NaN would quantise to black images and still give a finite FID
        fail(f"{module.METHOD} made non-finite samples at NFE {nfe}: a broken checkpoint or --sampler-kw")
    return x, used, len(calls)


# --- the evaluation ---
def check_before_work(args, feature_dim):
    """Every checkpoint, the reference, the flags, before any sampling -> models, reference images."""
    ref = {"fid", "kid"} & set(args.metrics)
    if "is" in args.metrics and args.features not in ("clean-fid", "random-cnn"):
        fail("IS uses TF-Inception's logits: pass --features clean-fid (or drop is from --metrics)")
    if ref and args.features in ("torcheval", "random-inception") and not args.ref_data:
        fail("torcheval's FID is computed from the reference images: pass --ref-data (or --protocol loom)")
    if args.sampler_kw.get("solver") == "midpoint" and any(n % 2 for n in args.nfe):
        fail(f"--sampler-kw solver=midpoint makes 2 network calls per step: --nfe {args.nfe} must be even")
    models = [(spec, *load_checkpoint(spec, args.method)) for spec in args.ckpt]
    images, res, name = None, None, None
    if ref and args.ref_stats:
        try:
            with np.load(args.ref_stats) as f:
                dims, feats = (f["mu"].shape, f["sigma"].shape), "feats" in f.files
        except (OSError, ValueError, KeyError) as e:
            fail(f"--ref-stats {args.ref_stats} is not an .npz with 'mu' and 'sigma' ({e})")
        if dims != ((feature_dim,), (feature_dim, feature_dim)):
            fail(f"--ref-stats {args.ref_stats}: shapes {dims}, not statistics of {feature_dim} features")
        if "kid" in args.metrics and not feats:
            fail(f"KID needs reference features: --ref-stats {args.ref_stats} has no 'feats'")
    elif ref and args.ref_data:
        images, name = load_images(args.ref_data, args.ref_split, args.data_dir), args.ref_data
        res = images.shape[1]
    elif ref:
        if args.features.startswith("random"):
            fail(f"{args.features} features have no published statistics: pass --ref-data or --ref-stats")
        res, name, kid_file = args.dataset_res, args.dataset, clean_fid_file(args, kid=True)
        if "kid" in args.metrics and not os.path.isfile(kid_file) and args.dataset != "cifar10":
            fail(f"KID needs reference features: no {kid_file}; pass --ref-data or --ref-stats")
    for i, (spec, module, ckpt) in enumerate(models):
        latent = (meta := ckpt.get("data") or {}).get("kind") == "latents"  # prepare_data.py --vae: decoded
        a, px = ckpt.get("args") or {}, meta.get("image_resolution", ckpt["net_kwargs"]["img_resolution"])
        m = re.match(r"edm-([a-z0-9]+)-(\d+x\d+)-", os.path.basename(a.get("imported_from") or ""))
        data = ("cifar10" if m[1] == "cifar10" else f"{m[1]}-{m[2]}") if m else a.get("data")  # EDM file's
        if res and px != res:
            fail(f"{spec} makes {px} px images; the reference {name} is {res} px (--ref-data, --ref-stats)")
        if data and name and data != name and not any(c in data + name for c in "/."):  # names, not files
            fail(f"{spec} was trained on {data}, the reference is {name}: pass --ref-data or --ref-stats")
        params = inspect.signature(module.sample).parameters  # **kw: passed on (EDM's churn options)
        unknown = [k for k in args.sampler_kw if k not in params or k in ("generator", "stats")]
        if unknown and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
            fail(f"{module.METHOD}.sample takes no {unknown} (--sampler-kw)")
        if {"straightness", "curvature"} & set(args.metrics) and not hasattr(module, "ode_velocity"):
            fail(f"{spec}: {module.METHOD} exports no ode_velocity; drop straightness and curvature")
        try:  # a wrong shape, an unknown arch
            net = module.build_net(ckpt["net_kwargs"])
            net.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["net"])
        except (TypeError, ValueError, KeyError, RuntimeError) as e:
            fail(f"{spec}: its weights do not fit its network ({type(e).__name__}: {str(e).splitlines()[0]})")
        vae = latent and importlib.import_module("edm_teacher").load_vae(meta["vae"])  # or False
        models[i] = (spec, module, ckpt, net.eval().requires_grad_(False), vae)
    return models, images


def evaluate(args):
    ddp, cuda = "RANK" in os.environ, torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if ddp:
        torch.cuda.set_device(device) if cuda else None
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=6))
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if ddp else (0, 1)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # the papers' fp32
    metrics, random_features = args.metrics, args.features.startswith("random")
    figure = args.out and args.figures and "fid" in metrics  # FID against NFE, beside the JSON
    figure = figure and f"{os.path.splitext(args.out)[0]}-fid_vs_nfe.png"
    if args.out:  # before any work
        claim_out(args.out, [n for n in (args.out, figure) if n], args.overwrite, rank)
    image_metrics = [m for m in metrics if m in ("fid", "kid", "is")]
    models, images = check_before_work(args, 64 if args.features == "random-cnn" else 2048)
    extract = build_extractor(args.features, device, "is" in metrics) if image_metrics else None
    ref = reference(args, images, extract, rank, world) if {"fid", "kid"} & set(metrics) else None
    features = "random test features: NOT FID/KID/IS" if random_features else args.features
    protocol = dict(name=args.protocol or "custom", source=PROTOCOLS[args.protocol][0] if args.protocol else
                    "the flags given", features=features, reference=ref and ref[3])  # fmt: skip
    results = []

    def save(figures=()):  # after every row: the rows done survive a later failure
        if rank == 0 and args.out:
            now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            out = dict(config=vars(args), protocol=protocol, results=results, figures=list(figures),
                       world_size=world, torch=torch.__version__, created=now)  # fmt: skip
            with open(f"{args.out}.tmp{os.getpid()}", "w") as f:
                json.dump(out, f, indent=2)
            os.replace(f"{args.out}.tmp{os.getpid()}", args.out)

    def score(x, seeds):  # FID/KID/IS of the images this rank made for `seeds` (all ranks gather)
        parts = [extract(x[i : i + args.batch]) for i in range(0, len(x), args.batch)]
        feats, out = gather_rows(seeds, np.concatenate([p[0] for p in parts]), world), {}
        if "fid" in metrics and args.features in ("torcheval", "random-inception"):
            out["fid"] = torcheval_fid(ref[2], feats)
        elif "fid" in metrics:
            out["fid"] = frechet_distance(feats.mean(0), np.cov(feats, rowvar=False), ref[0], ref[1])
        if "kid" in metrics:
            out["kid"] = kernel_distance(feats, ref[2])
        if "is" in metrics:
            logits = gather_rows(seeds, np.concatenate([p[1] for p in parts]), world)
            out["is"], out["is_std"] = inception_score(logits)  # Salimans et al.'s 10 splits
        return out

    while models:  # one network on the device at a time
        spec, module, ckpt, net, vae = models.pop(0)
        net, vae = net.to(device), vae and vae.requires_grad_(False).to(device)
        k, name = ckpt["net_kwargs"], os.path.basename(os.path.normpath(spec))
        shape, label_dim = (k["img_channels"], k["img_resolution"], k["img_resolution"]), k.get("label_dim")
        label = None if random_features else paper_label(ckpt)
        for nfe in args.nfe if image_metrics else []:
            row, runs, counts = dict(ckpt=spec, method=module.METHOD, label=label, nfe_requested=nfe), [], []
            for j in range(args.fid_seeds):
                seeds = list(range(args.seed + j * args.num_images, args.seed + (j + 1) * args.num_images))
                seeds, xs = seeds[rank::world], []
                for i in tqdm(range(0, len(seeds), args.batch), disable=rank != 0, desc=f"{name} NFE {nfe}"):
                    noise, labels, g = inputs_for_seeds(seeds[i : i + args.batch], shape, label_dim, device)
                    x, used, n = run_sampler(module, net, noise, nfe, labels, g, args.sampler_kw, st := {})
                    if vae:  # latents times "scale" (prepare_data.py) -> images in [-1, 1], 32 at a time
                        x = torch.cat([vae.decode(z).sample for z in (x / ckpt["data"]["scale"]).split(32)])
                    xs.append(x.cpu())
                    counts.append((n, used, st.get("solver_steps")))
                runs.append(score(torch.cat(xs) if xs else torch.zeros(0, *shape), seeds))
            parts = [counts] * world
            torch.distributed.all_gather_object(parts, counts) if ddp else None
            counts = [c for p in parts for c in p]
            for i, key in enumerate(("nfe", "nfe_reported", "solver_steps")):  # calls, the method's, solver's
                v = [c[i] for c in counts if c[i] is not None]  # an int when all batches agree
                row[key] = None if not v else v[0] if len(set(v)) == 1 else round(float(np.mean(v)), 2)
            for key in [m for m in image_metrics if m in runs[0]]:
                v = [r[key] for r in runs]  # EDM: the minimum over seed ranges; LMM: the mean +- std
                row[key] = min(v) if key != "is" and args.fid_stat == "min" else float(np.mean(v))
                if args.fid_seeds > 1:
                    row |= {f"{key}_all": v, f"{key}_mean": np.mean(v), f"{key}_std": np.std(v)}
            row |= dict(is_std=runs[0]["is_std"]) if "is" in image_metrics and args.fid_seeds == 1 else {}
            results.append(row)
            save()
        if {"straightness", "curvature"} & set(metrics):
            seeds, per = list(range(args.seed, args.seed + args.ode_num))[rank::world], {}
            steps, kind = args.ode_steps, args.ode_grid
            for i in range(0, len(seeds), args.batch):
                noise, labels, _ = inputs_for_seeds(seeds[i : i + args.batch], shape, label_dim, device)
                try:  # e.g. dansm's DM objective has no ODE velocity
                    m, _, times = ode_metrics(module, net, noise, labels, steps, kind)
                except ValueError as e:
                    fail(f"{spec}: {e}")
                for key, v in m.items():
                    per.setdefault(key, []).append(v.numpy())
            row = dict(ckpt=spec, method=module.METHOD, label=label, ode_steps=steps, ode_num=args.ode_num,
                       ode_grid=kind or "family default", nfe=2 * steps - 1)  # fmt: skip
            for key in ("straightness", "straightness_rel", "curvature", "curvature_t"):
                row[key] = gather_rows(seeds, np.concatenate(per[key]), world).mean(0).tolist()
            row["curvature_t"] = [[float(t), c] for t, c in zip(times, row["curvature_t"], strict=True)]
            results.append(row)
            save()
    if rank == 0:
        print_table(results, protocol)
        save(write_figures(results, figure, random_features) if figure else [])
    if ddp:
        torch.distributed.barrier(), torch.distributed.destroy_process_group()
    return results


# --- figures and the table ---
def paper_label(ckpt):
    """The paper row a checkpoint reproduces, from its method, flags and conditioning (None: no row)."""
    method, a, cond = ckpt.get("method"), ckpt.get("args") or {}, ckpt["net_kwargs"].get("label_dim")
    if method in ("edm_teacher", "lmm"):  # LMM Table 2 has EDM's and LMM's conditional figures too
        return {"edm_teacher": "EDM", "lmm": "LMM"}[method] + (" cond" if cond else "")
    if method == "loom_cfm" and not cond:  # the flow papers' rows are unconditional
        return "LOOM-CFM"
    couplings = {"independent": "I-CFM", "ot": "OT-CFM", "sinkhorn": "OT-CFM", "pairs": "2-Rect-Flow"}
    label = couplings.get(a.get("coupling")) if method == "cfm_couplings" and not cond else None
    return "LOOM-CFM + reflow" if label == "2-Rect-Flow" and a.get("preset") == "loom-reflow" else label


def write_figures(results, path, random_features=False):
    """FID against NFE at path (OUT-fid_vs_nfe.png): one line per checkpoint, its paper's figures (each in its
    protocol) as crosses; random test features go on an axis that says so, without the papers' figures."""
    import matplotlib.pyplot as plt

    plt.switch_backend("Agg")
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, ckpt in enumerate(dict.fromkeys(r["ckpt"] for r in results if "fid" in r)):
        rows = sorted((r for r in results if r["ckpt"] == ckpt and "fid" in r), key=lambda r: r["nfe"])
        name = f"{rows[0]['label'] or rows[0]['method']} ({os.path.basename(os.path.normpath(ckpt))})"
        ax.plot([r["nfe"] for r in rows], [r["fid"] for r in rows], "o-", color=f"C{i}", label=name)
        for solver, nfe, fid in [] if random_features else PAPER_FID.get(rows[0]["label"], []):
            ax.plot(nfe, fid, "x", color=f"C{i}", ms=9, mew=2)
            ax.annotate(solver, (nfe, fid), xytext=(3, 3), textcoords="offset points", fontsize=7)
    ax.plot([], [], "kx", label="paper's figure (its protocol)") if not random_features else None
    ylabel = "distance of random test features (NOT FID)" if random_features else "FID"
    ax.set(xscale="log", yscale="log", xlabel="NFE (network calls)", ylabel=ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return [path]


def print_table(results, protocol):
    print("; ".join(f"{k} {v}" for k, v in protocol.items()))  # name, source, features, reference
    keys = ("nfe_requested", "nfe", "nfe_reported", "solver_steps", "fid", "fid_std", "kid", "is", "is_std",
            "straightness", "straightness_rel", "curvature")  # fmt: skip
    for r in results:
        vals = ", ".join(f"{k} {r[k]:.5g}" for k in keys if r.get(k) is not None)
        print(f"{r['ckpt']} ({r['method']}): {vals}", flush=True)


# --- command line ---
def sampler_kw(text):
    """'solver=dopri5,atol=1e-5,steps=4' -> {'solver': 'dopri5', 'atol': 1e-05, 'steps': 4}."""
    out = {}
    for key, sep, value in (item.partition("=") for item in text.split(",") if item):
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE,... (e.g. solver=dopri5,atol=1e-5)")
        out[key] = value
        for cast in (float, int):
            with contextlib.suppress(ValueError):
                out[key] = cast(value)
    return out


def number(cast, lo, hi=math.inf, lo_open=False):  # argparse type: a finite number in range
    def parse(s):
        v = cast(s)
        if not (math.isfinite(v) and (lo < v if lo_open else lo <= v) and v <= hi):
            raise argparse.ArgumentTypeError(f"{s} is not in {'(' if lo_open else '['}{lo}, {hi}]")
        return v

    return parse


def parse_args(argv=None):
    epilog = "protocols:\n" + "\n".join(f"  {k:<5} {v[0]}" for k, v in PROTOCOLS.items())
    epilog += "\nlatents: FID/KID/IS score the VAE-decoded images; straightness/curvature stay on the latents"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=epilog, allow_abbrev=False,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    positive = number(int, 1)
    add, words, ints = p.add_argument, lambda s: s.split(","), lambda s: [positive(v) for v in s.split(",")]
    add("--ckpt", nargs="+", required=True, help="checkpoints (.pt or run folder; EDM .pkl: convert_edm.py)")
    add("--method", help="a forked method file (path/to/file.py) that made every --ckpt")
    add("--protocol", choices=sorted(PROTOCOLS), help="a paper's evaluation as defaults (see below)")
    add("--nfe", type=ints, default=[1, 2], help="network evaluations per image, a list (default 1,2)")
    add("--num-images", type=positive, default=50000, help="images per (checkpoint, NFE, seed range) (50000)")
    add("--sampler-kw", type=sampler_kw, default={}, help="keywords for sample(): solver=dopri5,atol=1e-5")
    add("--seed", type=number(int, 0, 2**63 - 1), default=0, help="image i uses seed + i")
    add("--batch", type=number(int, 1, 2**20), default=250, help="images per batch and process (250)")
    add("--metrics", type=words, default=["fid", "kid"], help="fid,kid,is,straightness,curvature (fid,kid)")
    add("--features", default="clean-fid", choices=["clean-fid", "torcheval"], help="TF-Inception or LOOM's")
    add("--fid-seeds", type=positive, default=1, help="disjoint seed ranges (EDM, LMM: 3)")
    add("--fid-stat", default="min", choices=["min", "mean"], help="over seed ranges: EDM's min, LMM's mean")
    add("--dataset", default="cifar10", help="clean-fid reference statistics: dataset name (cifar10)")
    add("--dataset-res", type=positive, default=32, help="clean-fid reference statistics: resolution (32)")
    add("--dataset-split", default="train", help="clean-fid reference statistics: split (train)")
    add("--ref-stats", help="reference .npz with mu, sigma (and feats for KID)")
    add("--ref-data", help="reference from images: cifar10 | FILE.npy (tools/prepare_data.py) | FILE.npz")
    add("--ref-split", default="train", choices=["train", "test"], help="--ref-data cifar10 split")
    add("--ref-num", type=number(int, 0), default=0, help="draw this many, with replacement (0: all)")
    add("--data-dir", default="datasets", help="where cifar10 is looked for / downloaded")
    add("--ode-steps", type=positive, default=100, help="Heun steps of the straightness ODE (100)")
    add("--ode-grid", choices=["rho", "uniform"], help="its grid (default: rho for EDM family, else uniform)")
    add("--ode-num", type=positive, default=256, help="samples for straightness/curvature (256)")
    add("--out", help="results JSON (config, protocol, results), figures beside it")
    add("--overwrite", action="store_true", help="replace an existing --out")
    add("--no-figures", dest="figures", action="store_false", help="no FID-vs-NFE PNG beside --out")
    add("--test-features", choices=["random-cnn", "random-inception"], help=argparse.SUPPRESS)  # tests only
    args = p.parse_args(argv)
    p.set_defaults(**PROTOCOLS[args.protocol][1]) if args.protocol else None
    args = p.parse_args(argv) if args.protocol else args  # the protocol's defaults, the flags given over them
    args.features = args.test_features or args.features  # random-weight feature networks: tests only
    if unknown := set(args.metrics) - {"fid", "kid", "is", "straightness", "curvature"}:
        p.error(f"unknown metric(s) {sorted(unknown)}; choose from fid,kid,is,straightness,curvature")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        return evaluate(args)
    except OSError as e:  # a full disk, a read-only folder, a name too long: one line
        fail(f"{e.filename or args.out}: {e.strerror or e}")
    except KeyboardInterrupt:  # Ctrl-C: the rows done are in --out
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()

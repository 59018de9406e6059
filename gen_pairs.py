"""gen_pairs.py: any checkpoint -> a file of (noise, sample) pairs, for LMM and reflow.

Pair i depends only on (checkpoint, seed, i): its noise x0 ~ N(0, I) and then its class label (conditional
checkpoints, uniform) come from a torch.Generator seeded with seed + i, as `edm_teacher.py --generate` draws
image seed + i; its data x1 is the checkpoint's sampler output from that noise (`sample(net, noise, nfe,
labels)` of its method file; EDM: 18 Heun steps = 35 NFE). Batch b holds pairs b * batch ... up to the
next batch, so the file is bit-identical for any number of processes at a given --batch; another --batch
changes data at float-rounding level only (convolution kernels depend on the batch shape).

Output: an uncompressed .npz that lmm.py and cfm_couplings.py memory-map: noise, data [N, C, H, W] (float32
or float16, not quantised), label [N] int64 (conditional only), meta (JSON: the checkpoint, its training set
`dataset` (lmm.py's default --data), sampler, NFE, seed, `data`: the teacher's data meta; a teacher trained on
tools/prepare_data.py --vae latents makes latent pairs, meta data {"kind": "latents", "vae", "scale", ...}).
OUT.partial/ holds one preallocated .npy per array while it runs: each process writes its batches' rows there,
then the batch's NFE into nfe.npy (0: not yet), so a rerun after a kill makes only the missing batches. Rank 0
then zips the arrays (stored) and renames it OUT.

    python gen_pairs.py --ckpt runs/edm-shapes --num-pairs 256 --out pairs_shapes.npz --batch 64  # CPU smoke
    torchrun --standalone --nproc_per_node=8 gen_pairs.py --ckpt edm-cifar10-cond.pt --cond \\
        --num-pairs 1000000 --out pairs_cifar10_cond.npz    # LMM's pairs; the .pt: tools/convert_edm.py
"""

import argparse
import contextlib
import datetime
import fcntl
import importlib
import importlib.util
import io
import json
import math
import os
import re
import shutil
import zipfile
import zlib
from inspect import signature

import numpy as np
import torch

METHODS = ("edm_teacher", "aot_edm", "lmm", "cfm_couplings", "loom_cfm", "dansm")  # a checkpoint names one
LOCKS = {}  # --out -> its open .lock file, held by this process


@torch.no_grad()
def make_pairs(module, net, lo, hi, seed, shape, label_dim, nfe, batch, device, sample_kw=None):
    """Pairs lo..hi-1 in batches of `batch` consecutive indices -> (noise, data, label or None, NFE used).
    A stochastic sampler (EDM's S_churn) draws pair i's later noise from pair i's generator."""
    noise, data, labels, used = [], [], [], 0
    for start in range(lo, hi, batch):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(start, min(start + batch, hi))]
        x0 = torch.stack([torch.randn(shape, generator=g) for g in gens])
        y = torch.stack([torch.randint(label_dim, [], generator=g) for g in gens]) if label_dim else None
        kw = dict(sample_kw or {})
        kw.update(generator=gens) if "generator" in signature(module.sample).parameters else None
        x1, used = module.sample(net, x0.to(device), nfe, None if y is None else y.to(device), **kw)
        noise, data, labels = noise + [x0], data + [x1.float().cpu()], labels + [y]
    return torch.cat(noise), torch.cat(data), torch.cat(labels) if label_dim else None, used


def fail(msg):
    raise SystemExit(f"error: {msg}")  # one line for the user, exit code 1, no traceback


def load_method(name, path=None):
    """The method file whose build_net/sample run: the checkpoint's, from this project's list only, or a
    fork's file named by --method (a checkpoint never chooses which code runs)."""
    if path is None and name not in METHODS:
        fail(f"unknown method {name!r}; this project's are {', '.join(METHODS)} (a fork: --method FILE.py)")
    if path is None:
        return importlib.import_module(name)
    if not (path.endswith(".py") and os.path.isfile(path)):
        fail(f"--method {path} is not a .py file")
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    spec.loader.exec_module(module := importlib.util.module_from_spec(spec))
    return module


def load_model(spec, device, method=None):
    """(module, net in eval mode on device, ckpt, path): a checkpoint (or run folder) of this project,
    CRC-checked, loaded without executing code; an official EDM .pkl goes through tools/convert_edm.py."""
    url = spec.startswith(("http://", "https://"))
    if url or spec.endswith(".pkl"):
        pt = (os.path.basename(spec) if url else spec).removesuffix(".pkl") + ".pt"
        fail(f"{spec} is {'a URL' if url else 'an EDM snapshot'}: convert it first with "
             f"python tools/convert_edm.py {spec} {pt} and pass {pt}")  # fmt: skip
    path = os.path.join(spec, "latest.pt") if os.path.isdir(spec) else spec
    if not os.path.isfile(path):
        fail(f"checkpoint not found: {spec} (a .pt checkpoint or a run folder)")
    try:  # CRCs, and no member flagged a directory (torch would load uninitialised memory for it)
        with zipfile.ZipFile(path) as z:
            bad, infos = z.testzip(), z.infolist()
        bad = bad or next((i.filename for i in infos if i.is_dir() or i.external_attr & 0x10), None)
        if bad:
            fail(f"{path} is corrupt: its member {bad} is damaged (CRC or zip structure)")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a cut-off or foreign file: never unpickled unsafely
        why = (str(e) or type(e).__name__).splitlines()[0]
        fail(f"{path} is corrupt or not a weights-only torch checkpoint: {why}")
    kw = ckpt.get("net_kwargs") if isinstance(ckpt, dict) else None
    if not isinstance(kw, dict) or not {"img_channels", "img_resolution"} <= kw.keys() or "net" not in ckpt:
        fail(f"{path} is not a checkpoint of this project: no net, or no net_kwargs with the image shape")
    module = load_method(ckpt.get("method"), method)
    if not isinstance(version := ckpt.get("version", 1), int) or version > getattr(module, "VERSION", 1):
        fail(f"{spec}: a version {version} {ckpt['method']} checkpoint; this code reads <= {module.VERSION}")
    try:  # a wrong shape, an unknown arch
        net = module.build_net(kw)
        net.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["net"])
    except (TypeError, ValueError, KeyError, RuntimeError) as e:
        fail(f"{path}: its weights do not fit its network ({type(e).__name__}: {str(e).splitlines()[0]})")
    return module, net.eval().requires_grad_(False).to(device), ckpt, path


def teacher_dataset(ckpt):
    """The teacher's training set, for the pairs' meta (lmm.py's default --data): our checkpoints' --data
    (an existing path made absolute); an official EDM snapshot's from its file name
    (edm-cifar10-32x32-cond-vp.pkl -> cifar10, edm-afhqv2-64x64-uncond-vp.pkl -> afhqv2-64x64); else None."""
    args = ckpt.get("args") or {}
    if args.get("imported_from"):
        m = re.match(r"edm-([a-z0-9]+)-(\d+x\d+)-", os.path.basename(args["imported_from"]))
        return None if not m else "cifar10" if m[1] == "cifar10" else f"{m[1]}-{m[2]}"
    data = args.get("data")
    return (os.path.abspath(data) if os.path.exists(data) else data) if isinstance(data, str) else None


def generate(args):
    from tqdm import tqdm

    ddp, cuda = "RANK" in os.environ, torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if ddp:  # ranks wait for each other only at the start and at the end: a generous timeout
        torch.cuda.set_device(device) if cuda else None
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=6))
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if ddp else (0, 1)
    out, work = os.path.abspath(args.out), os.path.abspath(args.out) + ".partial"
    if rank == 0:
        if not os.access(os.path.dirname(out), os.W_OK | os.X_OK):  # a folder, writable
            fail(f"cannot write to {os.path.dirname(out)}: the folder is missing or not writable")
        if len(os.path.basename(work)) > 255:  # OUT.partial/: the longest name written
            fail(f"{out}: the name is too long (with .partial over 255 characters)")
        if out not in LOCKS:  # one writer per --out: held for the life of the process
            lock = LOCKS[out] = open(out + ".lock", "a+")  # noqa: SIM115
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                lock.seek(0), LOCKS.pop(out)
                fail(f"{out} is locked by a running job ({lock.read()}); wait for it or choose another --out")
            lock.truncate(0), lock.write(f"pid {os.getpid()} on {os.uname().nodename}"), lock.flush()
        if os.path.exists(out) and not args.overwrite:
            fail(f"{out} exists; pass --overwrite to replace it")
    # the same kernels on every rank and run (no autotuning): the pairs do not depend on the world size
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = args.precision == "tf32"
    module, net, ckpt, path = load_model(args.ckpt, device, args.method)
    model = torch.compile(net) if args.compile else net
    params = signature(module.sample).parameters
    unknown = [k for k in args.sampler_kw if k not in params or k in ("generator", "stats")]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        fail(f"{ckpt['method']}.sample takes no {unknown} (--sampler-kw); it takes {list(params)[3:]}")
    k = ckpt["net_kwargs"]
    shape, label_dim = (k["img_channels"], k["img_resolution"], k["img_resolution"]), k.get("label_dim", 0)
    if bool(label_dim) != args.cond:
        fail(f"{args.ckpt} is class-conditional ({label_dim} classes): pass --cond (labels drawn per pair)"
             if label_dim else f"--cond was given but {args.ckpt} is unconditional")  # fmt: skip
    with zipfile.ZipFile(path) as z:  # the teacher's identity: its members' CRCs, no second read
        weights = f"{zlib.crc32(str([i.CRC for i in z.infolist()]).encode()):08x}"
    settings = dict(method=ckpt["method"], weights_crc=weights, seed=args.seed, num=args.num_pairs,
                    nfe=args.nfe, batch=args.batch, dtype=args.dtype, label_dim=label_dim, shape=list(shape),
                    sampler_kw=args.sampler_kw, precision=args.precision, compile=args.compile)  # fmt: skip
    arrays = dict(noise=(args.dtype, (args.num_pairs, *shape)), data=(args.dtype, (args.num_pairs, *shape)))
    arrays.update(label=(np.int64, (args.num_pairs,))) if label_dim else None
    n_batches = -(-args.num_pairs // args.batch)
    if rank == 0:
        if os.path.isfile(f"{work}/settings.json"):
            with open(f"{work}/settings.json") as f:
                diff = {k: (v, settings[k]) for k, v in json.load(f).items() if settings.get(k) != v}
            if diff:
                fail(f"{work} was made with other settings {diff}; refusing to mix: rerun them or delete it")
        else:  # preallocated arrays, then settings.json: the folder counts only once it is complete
            os.makedirs(work, exist_ok=True)
            for key, (dtype, dims) in dict(arrays, nfe=(np.int64, (n_batches,))).items():
                np.lib.format.open_memmap(f"{work}/{key}.npy", "w+", dtype, dims)  # nfe 0: batch not made
            with open(f"{work}/settings.tmp", "w") as f:
                json.dump(settings, f)
            os.replace(f"{work}/settings.tmp", f"{work}/settings.json")
    torch.distributed.barrier() if ddp else None
    todo = np.flatnonzero(np.load(f"{work}/nfe.npy") == 0).tolist()
    torch.distributed.barrier() if ddp else None  # every rank has read nfe.npy before anyone writes it
    if rank == 0:
        print(f"{n_batches - len(todo)} of {n_batches} batches present; {world} process(es) on {device}")
    for b in tqdm(todo[rank::world], disable=rank != 0, unit="batch"):
        lo, hi = b * args.batch, min((b + 1) * args.batch, args.num_pairs)
        try:  # TypeError: a keyword sample() passes on (EDM's churn) that nobody takes
            with torch.autocast(device.type, torch.bfloat16, enabled=args.precision == "bf16"):
                x0, x1, y, used = make_pairs(module, model, lo, hi, args.seed, shape, label_dim, args.nfe,
                                             args.batch, device, args.sampler_kw)  # fmt: skip
        except (TypeError, ValueError, AssertionError) as e:  # a keyword or value it refuses, a dt underflow
            fail(f"--sampler-kw {args.sampler_kw}: {ckpt['method']}.sample refuses it ({e!r})")
        if not torch.isfinite(x1).all():
            fail(f"the teacher made non-finite samples among pairs {lo}-{hi - 1}; no pairs file was written")
        for key, rows in (("noise", x0), ("data", x1), ("label", y), ("nfe", torch.tensor([used]))):
            if key in arrays or key == "nfe":  # nfe last: the batch counts as made once its rows are on disk
                write_rows(f"{work}/{key}.npy", b if key == "nfe" else lo, rows.numpy())
    if ddp:
        torch.distributed.barrier(), torch.distributed.destroy_process_group()
    if rank == 0:
        used = np.load(f"{work}/nfe.npy")
        nfe_used = int(used[0]) if (used == used[0]).all() else round(float(used.mean()), 2)  # dopri5 varies
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        meta = dict(settings, nfe_used=nfe_used, ckpt=args.ckpt, dataset=teacher_dataset(ckpt), created=now,
                    sampler=f"{ckpt['method']}.sample", torch=torch.__version__, world=world,
                    data=ckpt.get("data", {}))  # fmt: skip
        np.save(buf := io.BytesIO(), np.array(json.dumps(meta)))
        with zipfile.ZipFile(f"{work}/pairs.npz", "w") as z:  # stored, not compressed: readers memory-map
            for key in arrays:
                z.write(f"{work}/{key}.npy", f"{key}.npy")
            z.writestr("meta.npy", buf.getvalue())
        os.replace(f"{work}/pairs.npz", out)  # a kill before this line: the rerun zips again
        shutil.rmtree(work)
        print(f"wrote {args.num_pairs} pairs to {args.out}, NFE {nfe_used} per pair")


def write_rows(path, lo, rows):
    """Rows lo... of a .npy, by pwrite: processes on other nodes never write each other's pages."""
    m = np.load(path, mmap_mode="r")
    with open(path, "r+b") as f:
        os.pwrite(f.fileno(), np.ascontiguousarray(rows, m.dtype).tobytes(), m.offset + lo * m[:1].nbytes)
        os.fsync(f.fileno())


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
    p = argparse.ArgumentParser(
        description="Make (noise, teacher sample) pairs from any checkpoint.",
        allow_abbrev=False,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add = p.add_argument
    add("--ckpt", help="the teacher: our checkpoint (.pt or run folder); EDM .pkl: tools/convert_edm.py")
    add("--method", help="a forked method file (path/to/file.py) that made --ckpt; default: the project's")
    add("--num-pairs", type=number(int, 1), default=1_000_000, help="number of pairs")
    add("--out", help="output .npz (uncompressed; OUT.partial/ while it is made)")
    add("--overwrite", action="store_true", help="replace an existing --out")
    add("--nfe", type=number(int, 1), default=35, help="network evaluations per pair (EDM: 35 = 18 Heun)")
    add("--sampler-kw", type=sampler_kw, default={}, help="keywords for sample(), e.g. solver=dopri5")
    add("--seed", type=number(int, 0, 2**63 - 1), default=0, help="pair i uses seed + i")
    add("--batch", type=number(int, 1, 2**20), default=512, help="pairs per batch (the unit of resumption)")
    add("--dtype", choices=["float32", "float16"], default="float32", help="storage dtype of noise, data")
    add("--cond", action="store_true", help="the teacher is class-conditional: draw labels")
    add("--precision", default="fp32", choices=["fp32", "tf32", "bf16"], help="the papers' fp32, tf32, bf16")
    add("--compile", action="store_true", help="torch.compile the network")
    args = p.parse_args(argv)
    if not args.ckpt or not args.out or not args.out.endswith(".npz"):
        p.error("--ckpt and --out FILE.npz are required")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        generate(args)
    except OSError as e:  # a full disk, a read-only folder, a name too long: one line
        fail(f"{e.filename or args.out}: {e.strerror or e}")
    except KeyboardInterrupt:  # Ctrl-C: the batches made stay in OUT.partial/ for a rerun
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()

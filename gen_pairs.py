"""gen_pairs.py: any checkpoint -> a file of (noise, sample) pairs, for LMM and reflow.

Pair i is fully determined by (teacher, seed, i): its noise x0 ~ N(0, I) comes from a torch.Generator seeded
with seed + i, its class label (conditional teachers) is uniform over the classes, drawn from the same
generator after the noise, and its data x1 is the teacher's deterministic sampler output from that noise
(`sample(net, noise, nfe, labels)` of the checkpoint's method file; EDM: 18 Heun steps = 35 NFE). Pairs
are made in batches of --batch consecutive indices, so the file is bit-identical for any number of processes
at a given --batch (and per-process thread count); another --batch gives the same noise and labels and data
equal to float rounding only, because convolution kernels depend on the batch shape.

The output is an uncompressed .npz: noise [N,C,H,W], data [N,C,H,W] (float32 or float16; data in
[-1, 1] up to the teacher's overshoot, not quantised), label [N] int64 (conditional only), meta (JSON: the
teacher and its sha256, its training set `dataset` (lmm.py's default --data), sampler, NFE, seed, dtype,
date). `load_pairs` memory-maps it.

Ranks write shard files of --shard-size pairs into OUT.shards/ (atomically); a rerun after a crash or kill
skips the shards present (same teacher and settings, else it refuses to mix), rank 0 then streams them into
OUT (atomically), verifies the merge and removes the shards.

Commands
  CPU smoke run (a checkpoint of edm_teacher.py):
    python gen_pairs.py --teacher runs/edm-shapes/latest.pt --num-pairs 256 --out pairs_shapes.npz --batch 64
  The LMM teacher pairs, 1M pairs from the official EDM CIFAR-10 checkpoint (converted once) on 8 GPUs:
    python tools/convert_edm.py \\
        https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-cifar10-32x32-cond-vp.pkl edm-cifar10-cond.pt
    torchrun --standalone --nproc_per_node=8 gen_pairs.py --teacher edm-cifar10-cond.pt --cond \\
        --num-pairs 1000000 --out pairs_cifar10_cond.npz
  Inspect a pairs file:
    python gen_pairs.py --inspect pairs_cifar10_cond.npz
"""

import argparse
import datetime
import glob
import hashlib
import importlib
import json
import os
import re
import shutil
import struct
import time
import zipfile
from inspect import signature

import numpy as np
import torch

VERSION = 1
METHODS = ("edm_teacher", "aot_edm", "lmm", "cfm_couplings", "loom_cfm", "dansm")  # the only modules a
# checkpoint may name: its "method" picks the file whose build_net/sample run, so nothing else is imported

# --- pairs file ---


def write_npz_stream(path, fields):
    """Write an uncompressed .npz without holding its arrays in memory, atomically.
    fields: [(name, dtype, shape, chunks)], chunks an iterable of arrays that fill shape[0] in order."""
    tmp = f"{path}.tmp{os.getpid()}"
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, dtype, shape, chunks in fields:
            dtype = np.dtype(dtype)
            header = {
                "descr": np.lib.format.dtype_to_descr(dtype),
                "fortran_order": False,
                "shape": tuple(shape),
            }
            rows = 0
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_2_0(f, header)
                for a in chunks:
                    a = np.ascontiguousarray(a, dtype=dtype)
                    f.write(a.tobytes())
                    rows += len(a) if a.ndim else 1
            if rows != (shape[0] if shape else 1):
                raise ValueError(f"{name}: wrote {rows} rows, expected {shape}")
    os.replace(tmp, path)


# --- pairs ---


def pair_inputs(indices, seed, shape, label_dim=0):
    """Pair i: noise from torch.Generator(seed + i), then its uniform label from the same generator (the same
    noise and label as edm_teacher.py --generate gives image seed + i). The generators come back too: a
    stochastic sampler (EDM's S_churn) draws pair i's later noise from its own one."""
    noise, labels, gens = [], [], []
    for i in indices:
        gens.append(torch.Generator().manual_seed(seed + int(i)))
        noise.append(torch.randn(shape, generator=gens[-1]))
        if label_dim:
            labels.append(torch.randint(label_dim, [], generator=gens[-1]))
    return torch.stack(noise), (torch.tensor(labels, dtype=torch.long) if label_dim else None), gens


@torch.no_grad()
def make_pairs(module, net, lo, hi, seed, shape, label_dim, nfe, batch, device, sample_kw=None):
    """Pairs lo..hi-1 in batches of `batch` consecutive indices -> (noise, data, label or None, NFE used)."""
    noise, data, labels, used = [], [], [], 0
    for start in range(lo, hi, batch):
        x0, y, gens = pair_inputs(range(start, min(start + batch, hi)), seed, shape, label_dim)
        kw = dict(sample_kw or {})
        if "generator" in signature(module.sample).parameters:
            kw["generator"] = gens
        x1, used = module.sample(net, x0.to(device), nfe, None if y is None else y.to(device), **kw)
        noise.append(x0)
        data.append(x1.float().cpu())
        labels.append(y)
    label = torch.cat(labels) if label_dim else None
    return torch.cat(noise), torch.cat(data), label, used


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def load_teacher(spec, cache_dir, device):
    """Any checkpoint of this project (its method file's build_net/sample); an official EDM snapshot (.pkl, or
    its URL) is converted first, once, by tools/convert_edm.py. cache_dir: unused (nothing is downloaded)."""
    import edm_teacher

    url = spec.startswith(("http://", "https://"))
    if url or spec.endswith(".pkl"):  # one safe unpickler of foreign files, in tools/convert_edm.py only
        pt = (os.path.basename(spec) if url else spec).removesuffix(".pkl") + ".pt"
        fail(
            f"{spec} is {'a URL' if url else 'an EDM snapshot'}: convert it first with "
            f"python tools/convert_edm.py {spec} {pt} and pass {pt}"
        )
    path = os.path.realpath(os.path.join(spec, "latest.pt") if os.path.isdir(spec) else spec)
    if not os.path.isfile(path):
        fail(f"teacher not found: {spec} (a .pt checkpoint or a run folder)")
    ckpt = edm_teacher.load_checkpoint(path)  # CRC-checked, weights-only
    if ckpt.get("method") not in METHODS:
        fail(f"{spec}: unknown method {ckpt.get('method')!r}; this project's are {', '.join(METHODS)}")
    module = importlib.import_module(ckpt["method"])
    net = module.build_net(ckpt["net_kwargs"])
    net.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["net"])
    return module, net.eval().requires_grad_(False).to(device), ckpt, path


def teacher_dataset(ckpt):
    """The teacher's training set, for the pairs' meta (lmm.py's default --data): our checkpoints' --data
    (an existing path made absolute); an official EDM snapshot's, from its file name
    (edm-cifar10-32x32-cond-vp.pkl -> cifar10, edm-afhqv2-64x64-uncond-vp.pkl -> afhqv2-64x64); else None."""
    args = ckpt.get("args") or {}
    if args.get("imported_from"):
        m = re.match(r"edm-([a-z0-9]+)-(\d+x\d+)-", os.path.basename(args["imported_from"]))
        if not m:
            return None
        return "cifar10" if m[1] == "cifar10" else f"{m[1]}-{m[2]}"
    data = args.get("data")
    if isinstance(data, str) and os.path.exists(data):
        return os.path.abspath(data)
    return data if isinstance(data, str) else None


# --- runtime: one-line errors, the output file, the speed flags ---


def fail(msg):
    raise SystemExit(f"error: {msg}")  # one line for the user, exit code 1, no traceback


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


def check_out(path, overwrite=False):
    """Before the work: an output file must be new (or --overwrite), its folder writable."""
    import tempfile

    if os.path.exists(path) and not overwrite:
        fail(f"{path} exists; pass --overwrite to replace it")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        fail(f"cannot write to {folder} ({e.strerror}): the folder is missing or not writable; create it")


def add_speed_args(p):
    """The speed flags of a sampling script (gen_pairs.py, evaluate.py), as the method files' trainers."""
    p.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "tf32", "bf16"],
        help="fp32 (the papers'); tf32: TF32 matmuls/convs (Ampere+ GPUs); bf16: torch.autocast around the "
        "network (its preconditioning stays fp32)",
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


class FastNet(torch.nn.Module):
    """net as a sampler calls it under the speed flags: same parameters, same call signature, float32 output.
    Autocast wraps the whole forward: the preconditioning (elementwise on float32 inputs) stays float32."""

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
    """The module to call for --precision/--compile/--channels-last: net itself for plain fp32 (the papers'
    computation exactly), else a FastNet around it. tf32 is a global switch of the CUDA backends."""
    if args.precision == "tf32" and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if args.precision != "bf16" and not args.compile and not args.channels_last:
        return net
    return FastNet(net, args)


# --- distributed (generation only: no training state) ---


def dist_setup():
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # generous timeout: ranks wait for each other only at the start and around rank 0's merge
    torch.distributed.init_process_group(
        "nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=6)
    )
    return torch.distributed.get_rank(), torch.distributed.get_world_size(), device


def barrier():
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


# --- generation ---


def shard_name(shard_dir, c):
    return os.path.join(shard_dir, f"shard-{c:06d}.npz")


def check_shards(shard_dir, n_shards, fingerprint, fail):
    """Indices of the shards already made; refuses shards made with another teacher or other settings."""
    done = []
    for c in range(n_shards):
        path = shard_name(shard_dir, c)
        if os.path.isfile(path):
            with np.load(path) as f:
                theirs = json.loads(str(f["meta"]))
            diff = {k: (theirs.get(k), v) for k, v in fingerprint.items() if theirs.get(k) != v}
            if diff:
                fail(
                    f"{path} was made with other settings {diff}; refusing to mix. Use the same settings "
                    f"or delete {shard_dir}"
                )
            done.append(c)
    return done


def merge(out, shard_dir, n_shards, num, shape, dtype, label_dim, meta):
    """Stream the shards into one uncompressed .npz, verify it against them, and only then name it `out`:
    a run killed while merging or verifying leaves the shards, and the next run merges again."""
    paths = [shard_name(shard_dir, c) for c in range(n_shards)]

    def column(key):
        for p in paths:
            with np.load(p) as f:
                yield f[key]

    fields = [
        ("noise", dtype, (num, *shape), column("noise")),
        ("data", dtype, (num, *shape), column("data")),
    ]
    if label_dim:
        fields.append(("label", np.int64, (num,), column("label")))
    text = json.dumps(meta)
    fields.append(("meta", f"<U{len(text)}", (), [np.array(text)]))
    merging = out + ".merging"
    write_npz_stream(merging, fields)
    pairs, lo = load_pairs(merging), 0
    for p in paths:
        with np.load(p) as f:
            hi = lo + len(f["noise"])
            for key in ("noise", "data", "label") if label_dim else ("noise", "data"):
                if not np.array_equal(pairs[key][lo:hi], f[key]):
                    raise RuntimeError(
                        f"merge verification failed for {p} ({key}); shards kept in {shard_dir}"
                    )
            lo = hi
    del pairs
    os.replace(merging, out)
    shutil.rmtree(shard_dir)


def generate(args):
    from tqdm import tqdm

    out = os.path.abspath(args.out)
    rank, world, device = dist_setup()
    if rank == 0:  # one writer per --out for the life of the run; then what a killed run left goes
        if not os.access(os.path.dirname(out), os.W_OK):
            fail(f"cannot write to {os.path.dirname(out)}: the folder is missing or not writable")
        hold_lock(out + ".lock")
        check_out(out, args.overwrite)
        for leftover in glob.glob(glob.escape(out) + ".tmp*") + glob.glob(glob.escape(out) + ".merging*"):
            os.remove(leftover)
        for leftover in glob.glob(os.path.join(glob.escape(out + ".shards"), "*.tmp*")):
            os.remove(leftover)
    barrier()
    # the same kernels on every rank and run (no autotuning, no tf32): pairs do not depend on the world size
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    module, net, ckpt, teacher_path = load_teacher(args.teacher, None, device)
    params = signature(module.sample).parameters
    unknown = [k for k in args.sampler_kw if k not in params or k in ("generator", "stats")]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in params.values()):
        fail(f"{ckpt['method']}.sample takes no {unknown} (--sampler-kw); it takes {list(params)[3:]}")
    net = prepare_net(net, args, device)  # --precision, --compile, --channels-last (fp32: net itself)
    k = ckpt["net_kwargs"]
    if "img_channels" not in k:
        fail(f"{args.teacher}: its net_kwargs have no image shape (img_channels, img_resolution)")
    shape, label_dim = (k["img_channels"], k["img_resolution"], k["img_resolution"]), k.get("label_dim", 0)
    if label_dim and not args.cond:
        fail(
            f"{args.teacher} is class-conditional ({label_dim} classes): pass --cond (labels drawn per pair)"
        )
    if args.cond and not label_dim:
        fail(f"--cond was given but {args.teacher} is unconditional")
    fingerprint = dict(
        teacher_sha256=sha256_file(teacher_path),
        method=ckpt["method"],
        seed=args.seed,
        num=args.num,
        nfe=args.nfe,
        dtype=args.dtype,
        shard_size=args.shard_size,
        label_dim=label_dim,
        shape=list(shape),
        version=VERSION,
        sampler_kw=args.sampler_kw,
    )
    # the speed flags change the pairs' bits; None for the default, as in the shards of earlier versions
    speed = dict(precision=args.precision, compile=args.compile, channels_last=args.channels_last)
    fingerprint["speed"] = (
        None if speed == dict(precision="fp32", compile=False, channels_last=False) else speed
    )
    shard_dir = out + ".shards"
    n_shards = -(-args.num // args.shard_size)
    if rank == 0:
        os.makedirs(shard_dir, exist_ok=True)
    barrier()
    done = check_shards(shard_dir, n_shards, fingerprint, fail)
    barrier()  # every rank has listed the shards before any new one appears
    done = set(done)
    mine = [c for c in range(n_shards) if c not in done][rank::world]
    ranges = [(c * args.shard_size, min((c + 1) * args.shard_size, args.num)) for c in mine]
    if rank == 0:
        print(
            f"{args.num} pairs from {ckpt['method']} teacher {args.teacher}: {len(done)} of {n_shards} "
            f"shards present, {world} process(es) on {device}",
            flush=True,
        )
    t0, nfe_used = time.time(), None
    bar = tqdm(total=sum(hi - lo for lo, hi in ranges), disable=rank != 0, unit="pair", smoothing=0.1)
    for c, (lo, hi) in zip(mine, ranges, strict=True):
        try:
            x0, x1, y, nfe_used = make_pairs(
                module,
                net,
                lo,
                hi,
                args.seed,
                shape,
                label_dim,
                args.nfe,
                args.batch,
                device,
                args.sampler_kw,
            )
        except TypeError as e:  # a keyword the sampler passes on (EDM's churn options) but nobody takes
            if not args.sampler_kw:
                raise  # a bug in the method's sampler, not bad input: keep its traceback
            fail(f"--sampler-kw {args.sampler_kw}: {ckpt['method']}.sample refuses it ({e})")
        if not torch.isfinite(x1).all():  # before the shard (and so the pairs file) exists
            fail(f"the teacher made non-finite samples among pairs {lo}-{hi - 1}; nothing was written")
        arrays = dict(
            noise=x0.numpy().astype(args.dtype),
            data=x1.numpy().astype(args.dtype),
            meta=np.array(json.dumps(dict(fingerprint, nfe_used=nfe_used))),
        )
        if y is not None:
            arrays["label"] = y.numpy()
        tmp = shard_name(shard_dir, c) + f".tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, shard_name(shard_dir, c))
        bar.update(hi - lo)
        bar.set_postfix(all_ranks_pairs_per_s=f"{bar.n * world / max(time.time() - t0, 1e-9):.1f}")
    bar.close()
    barrier()
    if rank == 0:
        if nfe_used is None:  # every shard was already there: read the NFE from one
            with np.load(shard_name(shard_dir, 0)) as f:
                nfe_used = json.loads(str(f["meta"]))["nfe_used"]
        meta = dict(
            fingerprint,
            nfe_used=nfe_used,
            teacher=args.teacher,
            dataset=teacher_dataset(ckpt),
            sampler=f"{ckpt['method']}.sample",
            created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            torch=torch.__version__,
            world_size=world,
            batch=args.batch,
        )
        merge(out, shard_dir, n_shards, args.num, shape, args.dtype, label_dim, meta)
        dt = time.time() - t0
        made = sum(hi - lo for lo, hi in ranges) * world
        print(
            f"wrote {args.num} pairs to {args.out} ({os.path.getsize(out) / 2**30:.2f} GiB, NFE {nfe_used} "
            f"per pair); about {made} made now in {dt:.1f} s ({made / max(dt, 1e-9):.1f} pairs/s)",
            flush=True,
        )
    barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def inspect(path):
    """Print N, shapes, dtypes, the label histogram, meta and statistics of a pairs file (in chunks)."""
    p = load_pairs(path)
    n = len(p["noise"])
    print(f"{path}: {n} pairs")
    for key in ("noise", "data", "label"):
        if key in p:
            print(f"  {key}: shape {tuple(p[key].shape)} dtype {p[key].dtype}")
    if "label" in p:
        print(f"  label histogram: {np.bincount(np.asarray(p['label'])).tolist()}")
    print(f"  meta: {json.dumps(p.get('meta', {}))}")
    for key in ("noise", "data"):
        s = s2 = outside = 0.0
        for lo in range(0, n, 4096):
            a = np.asarray(p[key][lo : lo + 4096], dtype=np.float64)
            s, s2, outside = s + a.sum(), s2 + (a * a).sum(), outside + (np.abs(a) > 1).sum()
        count = p[key][0].size * n
        mean = s / count
        line = f"  {key}: mean {mean:.4f} std {np.sqrt(max(s2 / count - mean**2, 0)):.4f}"
        print(line + (f", outside [-1, 1]: {outside / count:.2%}" if key == "data" else ""))


def sampler_kw(text):
    """'solver=dopri5,atol=1e-5' -> {'solver': 'dopri5', 'atol': 1e-05}; None if malformed."""
    out = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            return None
        for cast in (int, float, str):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                pass
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description="Make (noise, teacher sample) pairs from any checkpoint.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--teacher",
        help="our checkpoint (.pt or run folder); an EDM snapshot (.pkl) converted by tools/convert_edm.py",
    )
    p.add_argument(
        "--num-pairs",
        "--num",
        dest="num",
        type=int,
        default=1_000_000,
        help="number of pairs (under torchrun write --num-pairs: torchrun takes --num for --numa-binding)",
    )
    p.add_argument("--out", help="output .npz (uncompressed)")
    p.add_argument(
        "--nfe", type=int, default=35, help="network evaluations per pair (EDM: 35 = 18 Heun steps)"
    )
    p.add_argument(
        "--sampler-kw",
        type=sampler_kw,
        default={},
        help="extra keywords for the method's sample(), e.g. solver=dopri5 for a flow teacher (reflow)",
    )
    p.add_argument("--seed", type=int, default=0, help="pair i uses seed + i")
    p.add_argument("--batch", type=int, default=512, help="pairs per sampling batch on each process")
    p.add_argument("--dtype", choices=["float32", "float16"], default="float32", help="storage dtype")
    p.add_argument("--cond", action="store_true", help="the teacher is class-conditional: draw labels")
    p.add_argument("--shard-size", type=int, default=8192, help="pairs per shard (the unit of resumption)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--inspect", metavar="FILE", help="print a pairs file's contents and statistics, then exit"
    )
    add_speed_args(p)
    args = p.parse_args(argv)
    if not args.inspect:
        if args.sampler_kw is None:
            p.error("--sampler-kw takes KEY=VALUE[,KEY=VALUE...], e.g. solver=dopri5")
        if not args.teacher or not args.out:
            p.error("--teacher and --out are required (or --inspect FILE)")
        if not args.out.endswith(".npz"):
            p.error("--out must end in .npz")
        for name, flag in (
            ("num", "--num-pairs"),
            ("nfe", "--nfe"),
            ("batch", "--batch"),
            ("shard_size", "--shard-size"),
        ):
            if getattr(args, name) <= 0:
                p.error(f"{flag} must be positive, got {getattr(args, name)}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.inspect:
        if not os.path.isfile(args.inspect):
            fail(f"pairs file not found: {args.inspect}")
        try:
            inspect(args.inspect)
        except (ValueError, KeyError, zipfile.BadZipFile) as e:
            fail(f"{args.inspect} is not a readable pairs file: {e}")
    else:
        generate(args)


# === shared below this line: identical in every file; the method is above ===


# --- shared: pairs reader (identical in gen_pairs, lmm, cfm_couplings) ---


def load_pairs(path):
    """Memory-map the arrays of an uncompressed .npz (noise, data, label): nothing is read into RAM until
    indexed. Returns a dict of np.memmap, with 'meta' decoded from JSON."""
    out = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
        for info in zf.infolist():
            if not info.filename.endswith(".npy"):
                continue
            if info.compress_type != zipfile.ZIP_STORED:
                raise ValueError(f"{path}: {info.filename} is compressed; pairs files must be uncompressed")
            f.seek(info.header_offset)
            name_len, extra_len = struct.unpack("<HH", f.read(30)[26:30])  # zip local file header
            f.seek(info.header_offset + 30 + name_len + extra_len)
            major, _ = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
            )
            shape, fortran, dtype = read_header(f)
            if dtype.hasobject:
                raise ValueError(f"{path}: {info.filename} holds Python objects; refusing to load it")
            key = info.filename[:-4]
            if shape == ():
                out[key] = np.frombuffer(f.read(dtype.itemsize), dtype)[0]
            else:
                order = "F" if fortran else "C"
                out[key] = np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=shape, order=order)
    if "meta" in out:
        out["meta"] = json.loads(str(out["meta"]))
    return out


def scan_pairs(pairs, path, rows=1 << 14):
    """None if the arrays are usable, else what is wrong: noise/data floating point, at least one pair, every
    value finite, labels non-negative integers. Reads the memory map in chunks of `rows` (RAM O(chunk))."""
    if len(pairs["noise"]) == 0:
        return f"{path} holds zero pairs"
    for key in ("noise", "data"):
        if pairs[key].dtype not in (np.float16, np.float32, np.float64):
            return f"{path}: '{key}' is {pairs[key].dtype}, not float16/32/64 (make pairs with gen_pairs.py)"
    lab = pairs.get("label")
    if lab is not None and not np.issubdtype(lab.dtype, np.integer):
        return f"{path}: 'label' is {lab.dtype}, not an integer class index"
    for lo in range(0, len(pairs["noise"]), rows):
        for key in ("noise", "data"):
            ok = np.isfinite(pairs[key][lo : lo + rows]).reshape(-1, pairs[key][0].size).all(1)
            if not ok.all():
                return f"{path}: '{key}' is not finite (NaN/inf) in pair {lo + int(np.argmin(ok))}"
        if lab is not None and (lab[lo : lo + rows] < 0).any():
            return f"{path}: negative labels near pair {lo}"
    return None


# --- end shared: pairs reader ---


if __name__ == "__main__":
    main()

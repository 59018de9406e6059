"""Official EDM snapshots (.pkl) -> our checkpoint (.pt), which loads with torch.load(weights_only=True).

EDM's snapshots are pickles in which every layer is rebuilt by torch_utils.persistence's
_reconstruct_persistent_obj(meta), which EXECUTES meta["module_src"]. We never do: our only unpickler of
foreign files resolves an allow-list of globals, keeps persistent objects as inert metadata (each module read
once), and loads the EMA weights by key into edm_teacher's UNet (EDM's keys).
Supported: EDMPrecond over SongUNet DDPM++ (EDM's "-vp" snapshots -> arch ddpmpp), SongUNet NCSN++ ("-ve"
-> ncsnpp) and DhariwalUNet (ImageNet-64's "-adm" -> adm). The .pt: a student's --init, a --ckpt anywhere.

Commands
  python tools/convert_edm.py edm-cifar10-32x32-cond-vp.pkl checkpoints/edm-cifar10-cond.pt
  python tools/convert_edm.py edm-cifar10-32x32-cond-ve.pkl checkpoints/edm-cifar10-cond-ve.pt --overwrite
  python tools/convert_edm.py \
    https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/edm-imagenet-64x64-cond-adm.pkl in64.pt  # via --cache-dir
"""

import argparse
import collections
import io
import json
import os
import pickle
import shutil
import sys
import types
import urllib.request
import warnings

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EDM_URL = "https://nvlabs-fi-cdn.nvidia.com/edm/pretrained/"
# EDM's train.py --arch settings of SongUNet (DDPM++ are SongUNet's own defaults); anything else is refused
SONGUNET_KEYS = "embedding_type encoder_type decoder_type channel_mult_noise resample_filter channel_mult_emb"
SONGUNET = {
    "ddpmpp": ("positional", "standard", "standard", 1, [1, 1], 4),
    "ncsnpp": ("fourier", "residual", "standard", 2, [1, 3, 3, 1], 4),
}
# model_channels, channel_mult, num_blocks, attn_resolutions: each class's defaults in EDM's networks.py
WIDTHS = {"SongUNet": (128, [1, 2, 2, 2], 4, [16]), "DhariwalUNet": (192, [1, 2, 3, 4], 3, [32, 16, 8])}


def fail(msg):
    raise SystemExit(f"error: {msg}")


class _Persistent:
    """Stands in for an EDM persistent object: only its metadata (class name, state) is kept."""

    def __init__(self, meta):
        self.meta = meta


def _numpy_scalar(dtype, data):
    if dtype.hasobject:  # an object scalar would be built from raw pointer bytes
        raise pickle.UnpicklingError("refusing a numpy object scalar")
    return np.frombuffer(data, dtype=dtype)[0]


class EDMUnpickler(pickle.Unpickler):
    """Resolves only the globals an EDM snapshot needs; refuses everything else (os.system, eval, ...)."""

    SAFE = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("numpy", "dtype"): np.dtype,
        ("builtins", "set"): set,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch.storage", "_load_from_bytes"): lambda blob: torch.load(io.BytesIO(blob), weights_only=True),
        ("numpy.core.multiarray", "scalar"): _numpy_scalar,
        ("numpy._core.multiarray", "scalar"): _numpy_scalar,
        ("torch_utils.persistence", "_reconstruct_persistent_obj"): _Persistent,
        ("dnnlib.util", "EasyDict"): dict,
    }

    def find_class(self, module, name):
        if module == "torch.nn.modules.container" and name in ("ModuleDict", "ModuleList", "Sequential"):
            return types.SimpleNamespace  # inert: keeps the pickled __dict__
        if (module, name) in self.SAFE:
            return self.SAFE[(module, name)]
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name} (not on the allow-list)")


def _edm_state_dict(obj, prefix="", out=None, seen=None):
    """Walk the pickled module tree: parameters and persistent buffers by key, as nn.Module.state_dict().
    Each module once: a crafted graph of shared children would otherwise take 2**depth steps."""
    out, seen = ({}, set()) if out is None else (out, seen)
    if id(obj) in seen:
        raise pickle.UnpicklingError(f"module {prefix[:-1]} appears twice: not a tree of modules")
    seen.add(id(obj))
    state = obj.meta["state"] if isinstance(obj, _Persistent) else obj.__dict__
    skip = state.get("_non_persistent_buffers_set", set())
    for key, t in [*state.get("_parameters", {}).items(), *state.get("_buffers", {}).items()]:
        if t is not None and key not in skip:
            out[prefix + key] = t.detach().clone() if isinstance(t, torch.Tensor) else t
    for key, child in state.get("_modules", {}).items():
        if child is not None:
            _edm_state_dict(child, f"{prefix}{key}.", out, seen)
    return out


def fetch_file(url, cache_dir):
    """Download url once into cache_dir (atomic) and return the local path."""
    dest = os.path.join(cache_dir, os.path.basename(url))
    if os.path.isfile(dest):
        return dest
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{dest}.tmp{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            shutil.copyfileobj(r, f)
    except OSError as e:
        fail(f"cannot download {url} ({type(e).__name__}: {e}); fetch it elsewhere and put it at {dest}")
    os.replace(tmp, dest)
    return dest


def import_edm_pickle(path):
    """An official EDM snapshot (.pkl) -> a checkpoint dict in our format, with the EMA weights.
    Every failure (a bad opcode, a missing key, a recursion bomb, ...) ends in one line naming the file."""
    if not os.path.isfile(path):
        fail(f"EDM snapshot not found: {path} (official ones: {EDM_URL}edm-cifar10-32x32-cond-vp.pkl)")
    try:
        return _import_edm_pickle(path)
    except Exception as e:  # fail() raises SystemExit, which passes through with its own message
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        fail(f"{path} is not a loadable EDM snapshot ({type(e).__name__}{': ' + msg if msg else ''})")


def _import_edm_pickle(path):
    with open(path, "rb") as f, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # TypedStorage deprecation inside torch's rebuild
        snapshot = EDMUnpickler(f).load()
    ema = snapshot.get("ema") if isinstance(snapshot, dict) else None
    if not isinstance(ema, _Persistent) or ema.meta.get("type") != "class":
        fail(f"{path} has no EDM network under 'ema' (is it an EDM training snapshot?)")
    name, kw = ema.meta.get("class_name"), dict(ema.meta["state"].get("_init_kwargs", {}))
    if name != "EDMPrecond":
        fail(f"{path}: preconditioning {name if isinstance(name, str) else type(name)} is not supported")
    flat = (int, float, str, type(None))  # EDM's values: numbers, names, lists of them (nothing deep to walk)
    for v in kw.values():
        if not isinstance(v, flat) and not (type(v) in (list, tuple) and all(isinstance(x, flat) for x in v)):
            fail(f"{path}: EDMPrecond's init kwargs hold other values than numbers, names and lists of them")
    model_type = kw.get("model_type", "DhariwalUNet")  # EDMPrecond's default is ADM's DhariwalUNet
    if model_type == "SongUNet":
        config = tuple(kw.get(k, v) for k, v in zip(SONGUNET_KEYS.split(), SONGUNET["ddpmpp"], strict=True))
        arch = next((a for a, c in SONGUNET.items() if c == config), None)
        if arch is None:
            variant = dict(zip(SONGUNET_KEYS.split(), config, strict=True))
            fail(f"{path}: SongUNet variant {variant} is not supported (only EDM's ddpmpp and ncsnpp)")
    elif model_type == "DhariwalUNet":
        arch = "adm"
        if kw.get("channel_mult_emb", 4) != 4:
            fail(f"{path}: DhariwalUNet variant channel_mult_emb={kw['channel_mult_emb']} is not supported")
    else:
        fail(f"{path}: network {model_type!r} is not supported (only SongUNet and DhariwalUNet)")
    w = WIDTHS[model_type]
    net_kwargs = dict(arch=arch, img_resolution=kw["img_resolution"], img_channels=kw["img_channels"],
                      label_dim=kw.get("label_dim", 0), sigma_data=kw.get("sigma_data", 0.5),
                      augment_dim=kw.get("augment_dim", 0), model_channels=kw.get("model_channels", w[0]),
                      channel_mult=list(kw.get("channel_mult", w[1])), num_blocks=kw.get("num_blocks", w[2]),
                      attn_resolutions=list(kw.get("attn_resolutions", w[3])),
                      dropout=kw.get("dropout", 0.10))  # fmt: skip
    state_dict = _edm_state_dict(ema)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import edm_teacher

    try:
        edm_teacher.build_net(net_kwargs).load_state_dict(state_dict, strict=True)
    except (RuntimeError, ValueError) as e:  # missing or extra keys, other shapes; an arch it does not build
        fail(f"{path}: weights do not match the {arch} network: {str(e).splitlines()[0]}")
    return dict(method="edm_teacher", version=1, args=dict(imported_from=os.path.abspath(path)),
                net_kwargs=net_kwargs, net=state_dict, ema=state_dict, opt=None, step=0, kimg=0.0,
                state=dict(source="EDM snapshot", edm_init_kwargs=json.loads(json.dumps(kw))))  # fmt: skip


def main(argv=None):
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "edm")
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("snapshot", help="EDM snapshot .pkl, or its URL (downloaded once into --cache-dir)")
    p.add_argument("out", help="our checkpoint .pt to write")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    p.add_argument("--cache-dir", default=cache, help="where a URL's file is kept (default: %(default)s)")
    args = p.parse_args(argv)
    if os.path.exists(args.out) and not args.overwrite:
        fail(f"{args.out} exists; pass --overwrite to replace it")
    path = fetch_file(args.snapshot, args.cache_dir) if "://" in args.snapshot else args.snapshot
    ckpt = import_edm_pickle(path)
    try:  # a full disk, a read-only folder, a name too long (torch.save: RuntimeError): one line
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        torch.save(ckpt, tmp := f"{args.out}.tmp{os.getpid()}")
        os.replace(tmp, args.out)
    except (OSError, RuntimeError) as e:
        fail(f"cannot write {args.out}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    kw, n = ckpt["net_kwargs"], sum(t.numel() for t in ckpt["ema"].values())
    print(f"{args.out}: {kw['arch']} at {kw['img_resolution']}px, label_dim {kw['label_dim']}, {n:,} weights")


if __name__ == "__main__":
    main()

"""Image folders, EDM dataset zips and ImageNet-64 -> one uint8 [N, H, W, C] array (.npy), made once; with
--vae, Stable Diffusion autoencoder latents instead: float16 [N, 4, H/8, W/8].

The method files memory-map the result (`np.load(OUT.npy, mmap_mode="r")`). Beside OUT.npy: OUT.labels.npy
(int64 [N] classes from 0, when the source has labels), OUT.json (source, kind, n, resolution, channels,
classes; latents: the VAE, posterior mean or sample, scale). --vae encodes [-1, 1] images --batch at a time; a
stopped run resumes (OUT.npy.partial + .json); --scale 1 is DANSM's "no scaling" (docs/latents.md: LOOM's).

Sources: a folder or .zip of .png/.jpg images in the order of their sorted relative paths, with EDM's
optional dataset.json labels ({"labels": [[file, label], ...]}, as EDM's dataset_tool.py writes them); palette
and alpha images become RGB, grayscale (8 or 16 bit) one 8-bit channel; all square and, unless --resolution
resizes them (PIL's LANCZOS, no crop), of one size, checked before the work. Or downsampled ImageNet
(Imagenet64_train_npz: train_data_batch_*.npz, 'data' [N, 3*64*64] uint8 CHW flattened, 'labels' from 1):
a folder of those files (in natural order: 1, 2, ..., 10) or one of them.

Commands
  python tools/prepare_data.py datasets/cifar10-32x32.zip datasets/cifar10.npy
  python tools/prepare_data.py datasets/Imagenet64_train_npz datasets/imagenet64.npy
  python tools/prepare_data.py my_images/ datasets/my64.npy --resolution 64 --overwrite
  python tools/prepare_data.py datasets/bedroom256/ datasets/bedroom-sd.npy --vae stabilityai/sd-vae-ft-mse
"""

import argparse
import io
import json
import os
import pathlib
import re
import zipfile

import numpy as np
from PIL import Image
from tqdm import tqdm


def fail(msg):
    raise SystemExit(f"error: {msg}")


def fit(x, res):
    """uint8 [H, W, C] -> [res, res, C] with PIL's LANCZOS filter (x is square; res None: unchanged)."""
    if not res or x.shape[0] == res:
        return x
    img = Image.fromarray(x[..., 0] if x.shape[2] == 1 else x)
    return np.atleast_3d(np.asarray(img.resize((res, res), Image.Resampling.LANCZOS)))


def decode(data, name):
    """An image's bytes -> uint8 [H, W, C]: palette, alpha -> RGB (never indices); 16-bit gray -> v / 257."""
    try:
        img = Image.open(io.BytesIO(data))
        if img.mode.startswith("I"):  # I;16, I: 16-bit grayscale (PIL's convert would clip it at 255)
            return np.round(np.asarray(img, np.float64) / 257).clip(0, 255).astype(np.uint8)[..., None]
        return np.atleast_3d(np.asarray(img if img.mode in ("L", "RGB") else img.convert("RGB")))
    except Exception as e:
        fail(f"cannot read image {name} ({type(e).__name__}: {e})")


def dataset_json(data, files, src):
    """EDM's dataset.json -> int64 labels of `files` in order, or None where it says "labels": null."""
    try:
        table = json.loads(data)["labels"]
        table = None if table is None else {name: label for name, label in table}
    except (ValueError, TypeError, KeyError) as e:
        fail(f"{src}/dataset.json is not EDM's {{'labels': [[file, label], ...]}} ({type(e).__name__}: {e})")
    if table is None:
        return None
    if missing := [f for f in files if f not in table]:
        fail(f"{src}/dataset.json has no label for {len(missing)} image(s), e.g. {missing[0]}")
    if bad := [table[f] for f in files if type(table[f]) is not int or not 0 <= table[f] < 2**16]:
        fail(f"{src}/dataset.json: labels must be class indices 0, 1, ... below 2**16; found {bad[0]!r}")
    return np.asarray([table[f] for f in files], np.int64)


def image_source(src, res):
    """A folder or zip of images -> (n, hwc, chunks: an iterator of uint8 [1, H, W, C], labels or None)."""
    if os.path.isdir(src):
        walk = ((d, f) for d, _, fs in os.walk(src) for f in fs)
        names = sorted(os.path.relpath(os.path.join(d, f), src).replace(os.sep, "/") for d, f in walk)
        read = lambda name: pathlib.Path(src, name).read_bytes()  # noqa: E731
    else:
        z = zipfile.ZipFile(src)
        names, read = sorted(z.namelist()), z.read
    files = [f for f in names if f.lower().endswith((".png", ".jpg", ".jpeg"))]
    if not files:
        fail(f"no .png/.jpg images found in {src}")
    labels = dataset_json(read("dataset.json"), files, src) if "dataset.json" in names else None

    def header(name):  # (width, height, channels) from the file's header: every image checked before the work
        try:
            with Image.open(io.BytesIO(read(name))) as img:
                return (*img.size, 1 if img.mode == "L" or img.mode.startswith("I") else 3)
        except Exception as e:  # a cut-off file or zip member, not an image
            fail(f"cannot read image {src}/{name} ({type(e).__name__}: {e})")

    shapes = [header(f) for f in tqdm(files, unit="img", desc="sizes", disable=len(files) < 10000)]
    w0, _, c0 = shapes[0]
    if bad := [i for i, (w, h, c) in enumerate(shapes) if w != h or c != c0 or not res and w != w0]:
        fail(f"{src}/{files[bad[0]]} is {shapes[bad[0]]} (W, H, C), {files[0]} {shapes[0]}: images must be "
             "square and must share one size (--resolution R resizes them all) and colour mode")  # fmt: skip
    hwc = fit(decode(read(files[0]), f"{src}/{files[0]}"), res).shape
    chunks = (fit(decode(read(name), f"{src}/{name}"), res)[None] for name in files)
    return len(files), hwc, chunks, labels


def npy_header(f):
    """(shape, fortran_order, dtype) of the .npy stream f, which is left at the first byte of the data."""
    fmt = np.lib.format
    return (fmt.read_array_header_1_0 if fmt.read_magic(f) == (1, 0) else fmt.read_array_header_2_0)(f)


def imagenet_source(src, res, chunk=1024):
    """Downsampled-ImageNet .npz batches -> (n, hwc, chunks of uint8 [b, H, W, C], 0-based labels). The
    'data' arrays are streamed out of the zip containers: memory O(chunk), not O(file)."""
    paths = [src]
    if os.path.isdir(src):
        natural = lambda f: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", f)]  # noqa: E731
        paths = [os.path.join(src, f) for f in sorted(os.listdir(src), key=natural) if f.endswith(".npz")]
    sizes, labels = [], []
    for path in paths:
        try:
            with np.load(path) as f:
                y = f["labels"].reshape(-1)
            with zipfile.ZipFile(path) as z, z.open("data.npy") as f:
                shape, fortran, dtype = npy_header(f)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            fail(f"{path} is not an ImageNet-64 batch with 'data' and 'labels' ({type(e).__name__}: {e})")
        side = int(round((shape[-1] / 3) ** 0.5)) if len(shape) == 2 else 0
        if dtype != np.uint8 or fortran or len(shape) != 2 or 3 * side * side != shape[1]:
            fail(f"{path}: 'data' must be C-ordered uint8 [N, 3*S*S] (CHW flattened); got {dtype} {shape}")
        if sizes and side != sizes[0][1]:
            fail(f"{path} holds {side}x{side} images but {paths[0]} holds {sizes[0][1]}x{sizes[0][1]}")
        if len(y) != shape[0] or y.dtype.kind not in "iu" or len(y) and not 0 < y.min() <= y.max() <= 2**16:
            fail(f"{path}: 'labels' must be {shape[0]} integer classes 1..65536 (ImageNet's, counted from 1)")
        sizes.append((shape[0], side))
        labels.append(y.astype(np.int64) - 1)

    def chunks():
        for path, (n, side) in zip(paths, sizes, strict=True):
            with zipfile.ZipFile(path) as z, z.open("data.npy") as f:
                npy_header(f)
                for i in range(0, n, chunk):
                    b = min(chunk, n - i)
                    x = np.frombuffer(f.read(b * 3 * side * side), np.uint8).reshape(b, 3, side, side)
                    yield np.stack([fit(im, res) for im in x.transpose(0, 2, 3, 1)])

    side = res or sizes[0][1]
    return sum(n for n, _ in sizes), (side, side, 3), chunks(), np.concatenate(labels)


def load_vae(name):
    """diffusers' AutoencoderKL from a folder (config.json, weights) or a model id (Hugging Face cache)."""
    from diffusers import AutoencoderKL
    from diffusers.utils import logging
    from huggingface_hub.constants import HF_HUB_CACHE

    logging.set_verbosity_error()
    for local in (True, False):  # the cache first, then a download
        try:
            return AutoencoderKL.from_pretrained(name, local_files_only=local).eval()
        except Exception as e:  # missing, unreadable or not a VAE: one line with the reason
            why = type(e).__name__
    fail(f"cannot load the VAE {name} ({why}): offline, put its config.json and .safetensors in a folder and "
         f"pass --vae FOLDER, or in {HF_HUB_CACHE}/models--{name.replace('/', '--')}")  # fmt: skip


def batches(chunks, size):
    buf = []
    for x in chunks:
        buf += list(x)
        while len(buf) >= size:
            yield np.stack(buf[:size])
            buf = buf[size:]
    yield from [np.stack(buf)] if buf else []


def encode_latents(vae, chunks, n, hwc, args, part):
    """Images -> latents float16 [n, 4, H/8, W/8] in `part`, resumable; -> (shape, meta of the encoding)."""
    import torch

    shape = (n, vae.config.latent_channels, hwc[0] // 8, hwc[1] // 8)
    spec = dict(vae=args.vae, posterior=args.posterior, scale=args.scale, seed=args.seed, shape=list(shape))
    try:  # a stopped run of the same settings: go on after its last written batch
        with open(f"{part}.json") as f:
            state = json.load(f)
        same = state["spec"] == spec and os.path.isfile(part)
        done, scale = (state["done"], state["scale"]) if same else (0, 0)
    except (OSError, ValueError, KeyError):
        done = scale = 0
    if not done:
        np.lib.format.open_memmap(part, mode="w+", dtype=np.float16, shape=shape)
    offset, row, pos = np.load(part, mmap_mode="r").offset, 2 * int(np.prod(shape[1:])), 0
    with open(part, "r+b") as f, tqdm(total=n, initial=done, unit="img", desc=os.path.basename(part)) as bar:
        for b in batches(chunks, args.batch):
            pos += len(b)
            if pos <= done:
                continue
            y = torch.from_numpy(b).permute(0, 3, 1, 2).float().expand(-1, 3, -1, -1) / 127.5 - 1
            with torch.no_grad():  # the posterior N(mean, std^2); image i's draw from (seed, i)
                post, z, i0 = vae.encode(y).latent_dist, 0, args.seed * 1_000_003 + pos - len(b)
                if args.posterior == "sample":
                    z = torch.stack([torch.randn(shape[1:], generator=torch.Generator().manual_seed(i0 + i))
                                     for i in range(len(b))]) * post.std  # fmt: skip
                z = post.mean + z
            scale = scale or (1 / z.float().std().item() if args.scale == "std" else float(args.scale))
            f.seek(offset + (pos - len(b)) * row)
            f.write((z * scale).to(torch.float16).numpy().tobytes())
            f.flush()
            with open(f"{part}.json.tmp", "w") as g:
                json.dump(dict(spec=spec, done=pos, scale=scale), g)
            os.replace(f"{part}.json.tmp", f"{part}.json")
            bar.update(len(b))
    meta = dict(vae=args.vae, posterior=args.posterior, scale=scale, image_resolution=hwc[0])
    return (*shape[2:], shape[1]), meta


def scale(s):  # --scale: "std" or a positive finite number
    return s if s == "std" or 0 < float(s) < float("inf") else float("x")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = p.add_argument
    add("source", help="image folder, EDM dataset .zip, or downsampled-ImageNet .npz batch(es)")
    add("out", help="OUT.npy to write; OUT.labels.npy and OUT.json go beside it")
    add("--resolution", type=int, metavar="R", help="resize all to R x R (PIL LANCZOS, no crop)")
    add("--overwrite", action="store_true", help="replace an existing OUT.npy")
    add("--vae", metavar="ID_OR_DIR", help="encode to latents with this VAE (stabilityai/sd-vae-ft-mse)")
    add("--posterior", default="mean", choices=["mean", "sample"], help="--vae: the latent of an image")
    add("--scale", default="1", type=scale, help="--vae: multiply latents by this (1: DANSM's; std: 1/std)")
    add("--batch", type=int, default=64, help="--vae: images per encoder pass")
    add("--seed", type=int, default=0, help="--vae --posterior sample: draw i from (seed, i)")
    args = p.parse_args(argv)
    src, out, res = args.source, args.out, args.resolution
    if not out.endswith(".npy"):
        p.error(f"OUT must end in .npy: {out}")
    if res is not None and res < 1 or not 1 <= args.batch <= 2**20 or not 0 <= args.seed < 2**40:
        p.error(f"--resolution, --batch must be in [1, 2**20], --seed in [0, 2**40): {res}, {args.batch}")
    if not os.path.exists(src):
        fail(f"source not found: {src} (an image folder, an EDM dataset .zip or ImageNet-64 .npz batches)")
    if os.path.exists(out) and not args.overwrite:
        fail(f"{out} exists; pass --overwrite to replace it")
    folder, longest = os.path.dirname(os.path.abspath(out)), len(os.path.basename(out)) + 18
    if not os.access(folder, os.W_OK | os.X_OK) or longest > 255:  # + 18: OUT.labels.npy.tmpPID
        fail(f"cannot write {out}: its folder is missing or read-only, or the name is too long")
    npz_dir = os.path.isdir(src) and any(f.endswith(".npz") for f in os.listdir(src))
    if src.endswith(".npz") or npz_dir:
        kind, (n, hwc, chunks, labels) = "imagenet64", imagenet_source(src, res)
    elif os.path.isdir(src) or zipfile.is_zipfile(src):
        kind, (n, hwc, chunks, labels) = "images", image_source(src, res)
    else:
        fail(f"{src} is neither a folder, a .zip of images nor an .npz of downsampled ImageNet")
    if n == 0:
        fail(f"{src} holds no images")
    if args.vae and hwc[0] % 8:
        fail(f"{src}: the VAE needs a side divisible by 8, the images are {hwc[0]}x{hwc[1]} (--resolution R)")

    stem, tmp, vae = out[:-4], f"{out}.partial" if args.vae else f"{out}.tmp{os.getpid()}", {}
    try:  # open_memmap writes the header and sizes the file; the data go in by plain writes (memory O(chunk))
        if args.vae:
            kind, (hwc, vae) = "latents", encode_latents(load_vae(args.vae), chunks, n, hwc, args, tmp)
        else:
            offset = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(n, *hwc)).offset
            with open(tmp, "r+b") as f, tqdm(total=n, unit="img", desc=os.path.basename(out)) as bar:
                f.seek(offset)
                for x in chunks:
                    f.write(np.ascontiguousarray(x, np.uint8).tobytes())
                    bar.update(len(x))
        if labels is not None:
            with open(f"{stem}.labels.npy.tmp{os.getpid()}", "wb") as f:
                np.save(f, labels)
            os.replace(f.name, f"{stem}.labels.npy")
        elif os.path.exists(f"{stem}.labels.npy"):  # an overwritten labelled array's labels
            os.remove(f"{stem}.labels.npy")
        classes = int(labels.max()) + 1 if labels is not None else 0
        meta = dict(source=os.path.abspath(src), kind=kind, n=n, resolution=hwc[0], channels=hwc[2])
        meta.update(labelled=labels is not None, classes=classes, **vae)
        with open(f"{stem}.json.tmp{os.getpid()}", "w") as f:
            json.dump(meta, f, indent=1)
        os.replace(f.name, f"{stem}.json")
        os.replace(tmp, out)
        if args.vae:
            os.remove(f"{tmp}.json")
    except OSError as e:  # a full disk, a read-only folder: one line
        fail(f"{e.filename or out}: {e.strerror or e}")
    except (zipfile.BadZipFile, EOFError, ValueError) as e:  # a source damaged or cut off after its header
        fail(f"{src} is damaged or cut off ({type(e).__name__}: {e})")
    finally:
        if os.path.exists(tmp) and not args.vae:  # a stopped encoding stays, to be resumed
            os.remove(tmp)
    lab = f", {len(labels)} labels of {classes} classes" if labels is not None else ""
    what = f"latents {hwc[2]}x{hwc[0]}x{hwc[1]} float16" if vae else f"images {hwc[0]}x{hwc[1]}x{hwc[2]}"
    print(f"{out}: {n} {what}{lab}")


if __name__ == "__main__":
    main()

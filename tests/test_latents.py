"""Training on Stable Diffusion latents (tools/prepare_data.py --vae) with a tiny random-weight AutoencoderKL:
the trainers read the float array as it is, record the data's meta, and --generate decodes with that VAE."""

import json
import os
import sys

import numpy as np
import torch

import edm_teacher as E
from conftest import TINY_FLAGS, run_script, tiny_vae


def latent_data(tmp_path, n=16):
    """16 random 32 px images, 2 classes -> tmp/lat.npy: float16 latents [16, 4, 4, 4] + labels + meta."""
    images = np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    os.makedirs(tmp_path / "src")
    from PIL import Image

    for i, x in enumerate(images):
        Image.fromarray(x).save(tmp_path / "src" / f"{i:03d}.png")
    vae = tiny_vae(tmp_path / "vae")
    r = run_script([sys.executable, "tools/prepare_data.py", str(tmp_path / "src"), str(tmp_path / "lat.npy"),
                    "--vae", str(tmp_path / "vae"), "--scale", "std"])  # fmt: skip
    assert r.returncode == 0, r.stderr
    return str(tmp_path / "lat.npy"), vae


def test_edm_teacher_trains_on_latents_and_generate_decodes_them(tmp_path):
    data, vae = latent_data(tmp_path)
    meta = json.loads((tmp_path / "lat.json").read_text())
    x, labels = E.load_data(data)
    assert x.dtype == np.float16 and x.shape == (16, 4, 4, 4) and labels is None
    y, _ = E.get_batch(x, None, torch.tensor([3, 16 + 3]), torch.device("cpu"))
    assert torch.equal(y[0], torch.from_numpy(np.array(x[3])).float())  # as they are: no [-1, 1] scaling
    assert torch.equal(y[1], y[0].flip(2))  # index i + N: the mirror image (--xflip)
    args = E.parse_args(["--data", data])
    assert args.augment == 0 and args.augment_dim == 0  # latents: no augmentation unless asked
    assert E.parse_args(["--data", "shapes"]).augment == 0.12
    out = tmp_path / "run"
    E.main(["--data", data, "--outdir", str(out), "--batch", "4", "--duration", str(8 / 1e6), "--lr-rampup", "0",
            "--grid", "4", "--log-every", "1", "--channel-mult", "1,2", *TINY_FLAGS[:2], *TINY_FLAGS[4:]])  # fmt: skip
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert ckpt["data"] == meta and ckpt["net_kwargs"]["img_channels"] == 4
    assert ckpt["net_kwargs"]["img_resolution"] == 4
    assert not any(f.startswith("grid") for f in os.listdir(out))  # no 4-channel "images"
    E.main(["--generate", "3", "--ckpt", str(out), "--out", str(tmp_path / "s.npz"), "--nfe", "3"])
    with np.load(tmp_path / "s.npz") as f:
        images, latents = f["images"], f["latents"]
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8 and latents.shape == (3, 4, 4, 4)
    with torch.no_grad():
        decoded = vae.decode(torch.from_numpy(latents) / meta["scale"]).sample
    assert np.abs((decoded * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)
                  - images.astype(int)).max() <= 1  # fmt: skip

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# pyproject.toml runs two workers (two cores): one torch thread each, not two each that thrash
if os.environ.get("PYTEST_XDIST_WORKER"):
    import torch

    torch.set_num_threads(1)

# The tests' tiny UNet, as command-line flags and as net_kwargs.
TINY_FLAGS = ["--model-channels", "16", "--channel-mult", "1,2", "--num-blocks", "1", "--attn-res", "8"]
TINY_NET = dict(model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8])


@pytest.fixture
def npz_data(tmp_path):
    """A small synthetic dataset in the --data FILE.npz format: 32 RGB 16x16 images with 3 classes."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 16, 16, 3), dtype=np.uint8)
    labels = np.arange(32) % 3
    path = tmp_path / "data.npz"
    np.savez(path, images=images, labels=labels)
    return str(path)


def read_log(outdir):
    """The records of a run's log.jsonl, one dict per logged step."""
    import json

    with open(os.path.join(outdir, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def run_script(args, timeout=300):
    """Run a command in a fresh interpreter from the repository root; returns CompletedProcess."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def teacher_ckpt(tmp_path):
    """A class-conditional tiny EDM checkpoint (random weights, visibly non-trivial outputs)."""
    import torch

    import edm_teacher

    torch.manual_seed(0)
    kw = dict(img_resolution=16, img_channels=3, label_dim=3, dropout=0.0, **TINY_NET)
    net = edm_teacher.build_net(kw)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    sd = net.state_dict()
    ckpt = dict(
        method="edm_teacher",
        version=1,
        args={},
        net_kwargs=kw,
        net=sd,
        ema=sd,
        opt=None,
        step=0,
        kimg=0.0,
        state={},
    )
    path = tmp_path / "teacher.pt"
    torch.save(ckpt, path)
    return str(path)


@pytest.fixture
def one_thread():
    """Run in-process work with one intra-op thread, as the torchrun/subprocess runs do (OMP_NUM_THREADS=1):
    CPU results are bit-reproducible for a fixed thread count."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_edm_dataset(root, images, labels, zipped):
    """EDM's dataset format (its dataset_tool.py): img<idx>.png files in 1000-image folders + dataset.json."""
    import io
    import json
    import zipfile

    from PIL import Image

    names = [f"{i // 1000:05d}/img{i:08d}.png" for i in range(len(images))]
    meta = json.dumps({"labels": [[name, int(y)] for name, y in zip(names, labels, strict=True)]})
    if zipped:
        with zipfile.ZipFile(root, "w") as z:
            for name, img in zip(names, images, strict=True):
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="png")
                z.writestr(name, buf.getvalue())
            z.writestr("dataset.json", meta)
    else:
        for name, img in zip(names, images, strict=True):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(root / name)
        (root / "dataset.json").write_text(meta)


def tiny_vae(path):
    """A random-weight diffusers AutoencoderKL with SD's layout (4 latent channels, sides / 8), saved to a folder."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    blocks = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4)
    kinds = dict(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    vae = AutoencoderKL(**kinds, **blocks)
    vae.save_pretrained(path)
    return vae.eval()

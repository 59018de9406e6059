"""Training on Stable Diffusion latents (tools/prepare_data.py --vae) with a tiny random-weight AutoencoderKL:
the trainers read the float array as it is, record the data's meta, and --generate decodes with that VAE."""

import json
import os
import sys

import numpy as np
import pytest
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


def decoded(vae, latents, scale):
    """What --generate writes for latent samples: the VAE's decoding of latents / scale as uint8 NHWC."""
    with torch.no_grad():
        x = vae.decode(torch.from_numpy(latents) / scale).sample
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy().astype(int)


def test_aot_edm_trains_on_latents_and_generate_decodes_them(tmp_path):
    import aot_edm as A

    data, vae = latent_data(tmp_path)
    meta = json.loads((tmp_path / "lat.json").read_text())
    args = A.parse_args(["--data", data])
    assert args.augment == 0 and args.augment_dim == 0 and A.parse_args(["--data", "shapes"]).augment == 0.12
    out = tmp_path / "run"
    A.main(["--data", data, "--outdir", str(out), "--batch", "4", "--aot-pairs", "8", "--duration", str(12 / 1e6),
            "--lr-rampup", "0", "--grid", "4", "--tiny"])  # fmt: skip
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert ckpt["data"] == meta and ckpt["net_kwargs"]["img_channels"] == 4 and ckpt["step"] == 3
    assert not any(f.startswith("grid") for f in os.listdir(out))
    A.main(["--generate", "3", "--ckpt", str(out), "--out", str(tmp_path / "s.npz"), "--nfe", "3"])
    with np.load(tmp_path / "s.npz") as f:
        images, latents = f["images"], f["latents"]
    assert images.shape == (3, 32, 32, 3) and latents.shape == (3, 4, 4, 4)
    assert np.abs(decoded(vae, latents, meta["scale"]) - images).max() <= 1


def test_gen_pairs_and_lmm_on_latents(tmp_path):
    import gen_pairs
    import lmm

    data, vae = latent_data(tmp_path)
    meta = json.loads((tmp_path / "lat.json").read_text())
    teacher, pairs = tmp_path / "edm", str(tmp_path / "pairs.npz")
    E.main(["--data", data, "--outdir", str(teacher), "--batch", "4", "--duration", str(4 / 1e6), "--lr-rampup",
            "0", "--grid", "0", "--channel-mult", "1,2", *TINY_FLAGS[:2], *TINY_FLAGS[4:]])  # fmt: skip
    gen_pairs.main(["--ckpt", str(teacher), "--num-pairs", "8", "--batch", "4", "--nfe", "3", "--out", pairs])
    p = lmm.load_pairs(pairs)[0]
    assert p["noise"].shape == p["data"].shape == (8, 4, 4, 4) and p["meta"]["data"] == meta  # latent units
    out, flags = tmp_path / "lmm", ["--pairs", pairs, "--tiny", "--batch", "4", "--duration", str(8 / 1e6)]
    with pytest.raises(SystemExit, match="error: .* are latents of .*--loss l2 --adv-start off"):
        lmm.main([*flags, "--outdir", str(out)])  # LPIPS and the discriminator are defined on images
    lmm.main([*flags, "--outdir", str(out), "--loss", "l2", "--adv-start", "off", "--grid", "4"])
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert ckpt["data"] == meta and ckpt["net_kwargs"]["img_channels"] == 4 and ckpt["step"] == 2
    assert not any(f.startswith("grid") for f in os.listdir(out))
    lmm.main(["--generate", "3", "--ckpt", str(out), "--out", str(tmp_path / "s.npz"), "--nfe", "2"])
    with np.load(tmp_path / "s.npz") as f:
        images, latents = f["images"], f["latents"]
    assert images.shape == (3, 32, 32, 3) and latents.shape == (3, 4, 4, 4)
    assert np.abs(decoded(vae, latents, meta["scale"]) - images).max() <= 1


def test_dansm_trains_on_latents_reports_and_generate_decodes_them(tmp_path):
    import dansm as D

    data, vae = latent_data(tmp_path)
    meta = json.loads((tmp_path / "lat.json").read_text())
    assert D.parse_args(["--data", data]).xflip == "off"  # latents: mirrored only if asked
    assert D.parse_args(["--data", "shapes"]).xflip == "copies"
    x = D.load_data(data)
    y = D.get_batch(x, torch.tensor([3, 19]), "cpu")  # as they are; 16 + 3: mirrored
    assert torch.equal(y[0], torch.from_numpy(np.array(x[3])).float()) and torch.equal(y[1], y[0].flip(2))
    out = tmp_path / "run"
    D.main(["--data", data, "--outdir", str(out), "--batch", "4", "--match-size", "8", "--duration", str(12 / 1e6),
            "--grid", "4", "--tiny"])  # fmt: skip
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert ckpt["data"] == meta and ckpt["net_kwargs"]["img_channels"] == 4 and ckpt["step"] == 3
    assert ckpt["net_kwargs"]["img_resolution"] == 4
    assert not any(f.startswith("grid") for f in os.listdir(out))  # no 4-channel "images"
    rows = D.main(["--report", "--data", data, "--match-sizes", "4", "--paths", "8", "--ckpt", str(out)])
    assert [r["paths"] for r in rows] == ["random", "ms 4", "preferable"] and rows[0]["pools"] == 1
    D.main(["--generate", "3", "--ckpt", str(out), "--out", str(tmp_path / "s.npz"), "--nfe", "2"])
    with np.load(tmp_path / "s.npz") as f:
        images, latents = f["images"], f["latents"]
    assert images.shape == (3, 32, 32, 3) and latents.shape == (3, 4, 4, 4)
    assert np.abs(decoded(vae, latents, meta["scale"]) - images).max() <= 1


def test_loom_cfm_trains_on_latents_and_generate_decodes_them(tmp_path):
    import loom_cfm as L

    data, vae = latent_data(tmp_path)
    meta = json.loads((tmp_path / "lat.json").read_text())
    out = tmp_path / "run"
    L.main(["--data", data, "--outdir", str(out), "--batch", "4", "--duration", str(12 / 1e6), "--tiny"])
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert ckpt["data"] == meta and ckpt["net_kwargs"]["img_channels"] == 4 and ckpt["step"] == 3
    assert ckpt["state"]["n_data"] == 16  # --xflip off: no mirrored latents
    L.main(["--generate", "3", "--ckpt", str(out), "--out", str(tmp_path / "s.npz"), "--nfe", "2", "--gen-batch",
            "2"])  # fmt: skip
    with np.load(tmp_path / "s.npz") as f:
        images, latents = f["images"], f["latents"]
    assert images.shape == (3, 32, 32, 3) and latents.shape == (3, 4, 4, 4)
    assert np.abs(decoded(vae, latents, meta["scale"]) - images).max() <= 1


def test_evaluate_scores_decoded_latent_samples_and_names_a_missing_vae(tmp_path, monkeypatch):
    import pytest

    import evaluate as V

    data, vae = latent_data(tmp_path)
    meta = json.loads((tmp_path / "lat.json").read_text())
    run, ref = tmp_path / "edm", str(tmp_path / "ref.npz")
    E.main(["--data", data, "--outdir", str(run), "--batch", "4", "--duration", str(4 / 1e6), "--lr-rampup", "0",
            "--grid", "0", "--channel-mult", "1,2", *TINY_FLAGS[:2], *TINY_FLAGS[4:]])  # fmt: skip
    np.savez(ref, images=np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    seen, build = [], V.build_extractor

    def recording(*args, **kw):  # the feature network's inputs, recorded
        extract = build(*args, **kw)

        def record(images):
            seen.append(torch.as_tensor(images).clone())
            return extract(images)

        record.dim = extract.dim
        return record

    monkeypatch.setattr(V, "build_extractor", recording)
    flags = ["--ckpt", str(run), "--nfe", "3", "--num-images", "3", "--batch", "2", "--ref-data", ref,
             "--test-features", "random-cnn", "--metrics", "fid,curvature", "--ode-num", "2", "--ode-steps", "2"]  # fmt: skip
    rows = V.main(flags)  # the reference is 32 px: the decoded images' size, not the latents' 4
    samples = [x for x in seen if x.dtype != torch.uint8]  # reference images go in as uint8 NHWC
    assert [tuple(x.shape) for x in samples] == [(2, 3, 32, 32), (1, 3, 32, 32)]
    module, ckpt = V.load_checkpoint(str(run))
    net = module.build_net(ckpt["net_kwargs"])
    net.load_state_dict(ckpt["ema"])
    noise, _, gens = V.inputs_for_seeds(range(3), (4, 4, 4))
    with torch.no_grad():
        expect = vae.decode(V.run_sampler(module, net.eval(), noise, 3, None, gens)[0] / meta["scale"]).sample
    assert torch.allclose(torch.cat(samples), expect, atol=1e-5)
    assert np.isfinite(rows[0]["fid"]) and np.isfinite(rows[1]["curvature"])  # curvature: on the latents
    os.rename(tmp_path / "vae", tmp_path / "gone")  # offline, no VAE: one line naming where it goes
    calls = len(seen)
    with pytest.raises(SystemExit, match="cannot load the VAE") as e:
        V.main(flags)
    assert meta["vae"] in str(e.value) and "models--" in str(e.value) and len(seen) == calls  # before work

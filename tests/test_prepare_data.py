"""tools/prepare_data.py: image folders, EDM dataset zips and ImageNet-64 batches become one uint8 NHWC .npy
(+ int64 labels) that np.load(mmap_mode="r") reads back as exactly the source pixels; one-line errors."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, run_script, tiny_vae, write_edm_dataset

TOOL = os.path.join(ROOT, "tools", "prepare_data.py")
_spec = importlib.util.spec_from_file_location("prepare_data", TOOL)
P = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(P)


def read_back(out):
    """As the method files read a prepared array: memory-mapped images, labels beside them if any."""
    images = np.load(out, mmap_mode="r")
    labels_path = str(out)[:-4] + ".labels.npy"
    labels = np.load(labels_path) if os.path.exists(labels_path) else None
    return images, labels


def write_imagenet_batch(path, images, labels):
    """Downsampled ImageNet's batch layout: 'data' [N, 3*S*S] uint8 (CHW flattened), 'labels' from 1."""
    np.savez(path, data=images.transpose(0, 3, 1, 2).reshape(len(images), -1), labels=labels + 1)


def test_image_folder_becomes_the_exact_array_in_sorted_path_order(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
    names = ["a/2.png", "a/10.png", "b.png", "c/d/e.png", "c/x.jpg.png", "z.png", "Z.png"]
    for name, img in zip(names, images, strict=True):
        (tmp_path / "src" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(tmp_path / "src" / name)
    (tmp_path / "src" / "notes.txt").write_text("not an image")
    P.main([str(tmp_path / "src"), str(tmp_path / "out.npy")])
    x, y = read_back(tmp_path / "out.npy")
    order = sorted(range(len(names)), key=lambda i: names[i])
    assert x.dtype == np.uint8 and x.shape == (7, 8, 8, 3) and x.flags.c_contiguous and y is None
    assert isinstance(x, np.memmap) and np.array_equal(x, images[order])
    meta = json.loads((tmp_path / "out.json").read_text())
    assert meta == dict(
        source=str(tmp_path / "src"), kind="images", n=7, resolution=8, channels=3, labelled=False, classes=0
    )
    assert sorted(os.listdir(tmp_path)) == ["out.json", "out.npy", "src"]  # nothing temporary left


@pytest.mark.parametrize("zipped", [False, True])
def test_edm_dataset_with_labels_becomes_array_and_labels(tmp_path, zipped):
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (1003, 4, 4, 3), dtype=np.uint8), rng.integers(0, 10, 1003)
    root = tmp_path / ("d.zip" if zipped else "d")
    if not zipped:
        root.mkdir()
    write_edm_dataset(root, images, labels, zipped)
    P.main([str(root), str(tmp_path / "out.npy")])
    x, y = read_back(tmp_path / "out.npy")
    assert np.array_equal(x, images) and y.dtype == np.int64 and np.array_equal(y, labels)
    meta = json.loads((tmp_path / "out.json").read_text())
    assert meta["labelled"] is True and meta["classes"] == labels.max() + 1 and meta["n"] == 1003


def test_edm_dataset_with_null_labels_is_unlabelled(tmp_path):
    (tmp_path / "d").mkdir()
    write_edm_dataset(tmp_path / "d", np.zeros((2, 4, 4, 3), np.uint8), [0, 0], zipped=False)
    (tmp_path / "d" / "dataset.json").write_text('{"labels": null}')  # dataset_tool.py's unlabelled form
    P.main([str(tmp_path / "d"), str(tmp_path / "out.npy")])
    assert read_back(tmp_path / "out.npy")[1] is None


def test_imagenet64_batches_become_array_and_zero_based_labels(tmp_path):
    rng = np.random.default_rng(2)
    parts = [  # natural order 1, 2, 10; batch 10 crosses the 1024-image read chunk
        (
            f"train_data_batch_{k}.npz",
            rng.integers(0, 256, (n, 64, 64, 3), dtype=np.uint8),
            rng.integers(0, 1000, n),
        )
        for k, n in [(10, 1030), (2, 3), (1, 5)]
    ]
    (tmp_path / "in64").mkdir()
    for name, images, labels in parts:
        write_imagenet_batch(tmp_path / "in64" / name, images, labels)
    P.main([str(tmp_path / "in64"), str(tmp_path / "out.npy")])
    x, y = read_back(tmp_path / "out.npy")
    order = [2, 1, 0]
    assert x.shape == (1038, 64, 64, 3) and np.array_equal(x, np.concatenate([parts[i][1] for i in order]))
    assert y.dtype == np.int64 and np.array_equal(y, np.concatenate([parts[i][2] for i in order]))
    meta = json.loads((tmp_path / "out.json").read_text())
    assert meta["kind"] == "imagenet64" and meta["resolution"] == 64 and meta["channels"] == 3
    # one batch file on its own
    P.main([str(tmp_path / "in64" / "train_data_batch_2.npz"), str(tmp_path / "one.npy")])
    x, y = read_back(tmp_path / "one.npy")
    assert np.array_equal(x, parts[1][1]) and np.array_equal(y, parts[1][2])


def test_writing_holds_only_a_chunk_in_memory(tmp_path):
    (tmp_path / "in64").mkdir()
    for k in range(2):  # 2 x 8192 x 64 x 64 x 3 = 201 MB
        images = np.broadcast_to(
            (np.arange(8192) % 251).astype(np.uint8)[:, None, None, None], (8192, 64, 64, 3)
        )
        write_imagenet_batch(
            tmp_path / "in64" / f"train_data_batch_{k + 1}.npz", images, np.arange(8192) % 1000
        )
    del images
    # the tool in a fresh interpreter, reporting how much its peak RSS grew past what importing it took
    code = (
        "import importlib.util as u, resource, sys; s = u.spec_from_file_location('p', sys.argv[1]); "
        "m = u.module_from_spec(s); s.loader.exec_module(m); peak = lambda: resource.getrusage(0).ru_maxrss; "
        "base = peak(); m.main(sys.argv[2:]); print((peak() - base) // 1024)"
    )
    r = run_script([sys.executable, "-c", code, TOOL, str(tmp_path / "in64"), str(tmp_path / "out.npy")])
    assert r.returncode == 0, r.stderr
    line, grew_mb = r.stdout.splitlines()
    assert int(grew_mb) < 80, f"peak RSS grew by {grew_mb} MB while writing 201 MB"
    assert line == f"{tmp_path / 'out.npy'}: 16384 images 64x64x3, 16384 labels of 1000 classes"
    x, y = read_back(tmp_path / "out.npy")
    assert np.array_equal(x[::1000, 5, 7, 2], np.tile(np.arange(8192) % 251, 2)[::1000])
    assert np.array_equal(y, np.tile(np.arange(8192) % 1000, 2))


def test_palette_becomes_rgb_and_grayscale_stays_one_channel(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:4] = (200, 10, 30)
    (tmp_path / "p").mkdir()
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "p" / "a.png")
    P.main([str(tmp_path / "p"), str(tmp_path / "p.npy")])
    assert np.array_equal(read_back(tmp_path / "p.npy")[0][0], rgb)
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8)
    (tmp_path / "g").mkdir()
    Image.fromarray(gray).save(tmp_path / "g" / "a.png")
    P.main([str(tmp_path / "g"), str(tmp_path / "g.npy")])
    assert np.array_equal(read_back(tmp_path / "g.npy")[0], gray[None, :, :, None])


def test_resolution_resizes_every_image_with_lanczos(tmp_path):
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    (tmp_path / "mixed").mkdir()
    Image.fromarray(a).save(tmp_path / "mixed" / "a.png")
    Image.fromarray(b).save(tmp_path / "mixed" / "b.png")
    with pytest.raises(SystemExit, match="must share one size.*--resolution") as e:
        P.main([str(tmp_path / "mixed"), str(tmp_path / "out.npy")])
    assert "\n" not in str(e.value) and sorted(os.listdir(tmp_path)) == ["mixed"]  # the partial array is gone
    P.main([str(tmp_path / "mixed"), str(tmp_path / "out.npy"), "--resolution", "8"])
    x, _ = read_back(tmp_path / "out.npy")
    assert np.array_equal(x[0], np.asarray(Image.fromarray(a).resize((8, 8), Image.Resampling.LANCZOS)))
    assert np.array_equal(x[1], b)


def test_an_existing_output_is_never_overwritten_without_the_flag(tmp_path):
    (tmp_path / "d").mkdir()
    write_edm_dataset(tmp_path / "d", np.zeros((3, 4, 4, 3), np.uint8), [0, 1, 2], zipped=False)
    P.main([str(tmp_path / "d"), str(tmp_path / "out.npy")])
    before = (tmp_path / "out.npy").read_bytes()
    os.remove(tmp_path / "d" / "dataset.json")
    (tmp_path / "d" / "00000" / "img00000000.png").unlink()
    with pytest.raises(SystemExit, match="exists; pass --overwrite") as e:
        P.main([str(tmp_path / "d"), str(tmp_path / "out.npy")])
    assert "\n" not in str(e.value) and (tmp_path / "out.npy").read_bytes() == before
    P.main([str(tmp_path / "d"), str(tmp_path / "out.npy"), "--overwrite"])
    x, y = read_back(tmp_path / "out.npy")
    assert len(x) == 2 and y is None  # the earlier labels went with the earlier images


def test_bad_sources_give_one_line_errors(tmp_path):
    def folder(name, files):
        (tmp_path / name).mkdir()
        for f, content in files.items():
            if isinstance(content, np.ndarray):
                Image.fromarray(content).save(tmp_path / name / f)
            else:
                (tmp_path / name / f).write_text(content)

    img = np.zeros((8, 8, 3), np.uint8)
    folder("empty", {"readme.txt": "nothing"})
    folder("mixed", {"a.png": img, "b.png": np.zeros((16, 16, 3), np.uint8)})
    folder("modes", {"a.png": img, "b.png": img[..., 0]})
    folder("wide", {"a.png": np.zeros((8, 12, 3), np.uint8)})
    folder("broken", {"a.png": "not a png"})
    folder("badjson", {"a.png": img, "dataset.json": "{not json"})
    folder("listjson", {"a.png": img, "dataset.json": '[["a.png", 0]]'})
    folder("missing", {"a.png": img, "b.png": img, "dataset.json": '{"labels": [["a.png", 0]]}'})
    folder("floatlabel", {"a.png": img, "dataset.json": '{"labels": [["a.png", 0.5]]}'})
    folder("neglabel", {"a.png": img, "dataset.json": '{"labels": [["a.png", -1]]}'})
    (tmp_path / "in64").mkdir()
    np.savez(tmp_path / "in64" / "train_data_batch_1.npz", data=np.zeros((2, 12288), np.uint8))
    np.savez(tmp_path / "zero.npz", data=np.zeros((2, 12288), np.uint8), labels=np.array([1, 0]))
    np.savez(tmp_path / "odd.npz", data=np.zeros((2, 1000), np.uint8), labels=np.array([1, 1]))
    np.savez(tmp_path / "nothing.npz", data=np.zeros((0, 12288), np.uint8), labels=np.zeros(0, int))
    (tmp_path / "file.txt").write_text("x")
    cases = {
        "does-not-exist": "source not found",
        "empty": "no .png/.jpg images",
        "mixed": "must share one size",
        "modes": "colour mode",
        "wide": "must be square",
        "broken": "cannot read image",
        "badjson": "dataset.json is not EDM's",
        "listjson": "dataset.json is not EDM's",
        "missing": "no label for 1 image.*b.png",
        "floatlabel": "class indices",
        "neglabel": "class indices",
        "in64": "train_data_batch_1.npz is not an ImageNet-64 batch",
        "zero.npz": "counted from 1",
        "odd.npz": r"3\*S\*S",
        "nothing.npz": "holds no images",
        "file.txt": "neither a folder",
    }
    for name, words in cases.items():
        with pytest.raises(SystemExit, match=words) as e:
            P.main([str(tmp_path / name), str(tmp_path / "out.npy")])
        assert str(e.value).startswith("error: ") and "\n" not in str(e.value), name
        assert str(tmp_path / name) in str(e.value), (name, str(e.value))
        assert not (tmp_path / "out.npy").exists() and not any(".tmp" in f for f in os.listdir(tmp_path)), (
            name
        )


@pytest.fixture
def image_folder(tmp_path):
    images = np.random.default_rng(2).integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    write_edm_dataset(tmp_path / "src", images, np.arange(10) % 2, zipped=False)
    return tmp_path / "src", images


def test_vae_latents_are_the_encoders_posterior_mean_and_decode_to_images(tmp_path, image_folder):
    import torch

    src, images = image_folder
    vae = tiny_vae(tmp_path / "vae")
    P.main([str(src), str(tmp_path / "lat.npy"), "--vae", str(tmp_path / "vae"), "--batch", "3"])
    z, y = read_back(tmp_path / "lat.npy")
    assert z.dtype == np.float16 and z.shape == (10, 4, 4, 4) and isinstance(z, np.memmap)
    assert np.array_equal(y, np.arange(10) % 2)
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
        post = vae.encode(x).latent_dist
        assert torch.allclose(torch.from_numpy(np.array(z)).float(), post.mean, atol=2e-3, rtol=1e-3)
        assert vae.decode(torch.from_numpy(np.array(z)).float()).sample.shape == (10, 3, 32, 32)
    meta = json.loads((tmp_path / "lat.json").read_text())
    assert meta["kind"] == "latents" and meta["channels"] == 4 and meta["resolution"] == 4
    assert meta["vae"] == str(tmp_path / "vae") and meta["posterior"] == "mean" and meta["scale"] == 1
    assert meta["image_resolution"] == 32 and meta["classes"] == 2
    assert sorted(os.listdir(tmp_path)) == ["lat.json", "lat.labels.npy", "lat.npy", "src", "vae"]
    # a posterior sample per image, from (seed, i) whatever the batch; --scale std scales by 1 / std
    for batch in ("4", "10"):
        P.main([str(src), str(tmp_path / f"s{batch}.npy"), "--vae", str(tmp_path / "vae"), "--batch", batch,
                "--posterior", "sample"])  # fmt: skip
    s4, s10 = np.load(tmp_path / "s4.npy"), np.load(tmp_path / "s10.npy")
    assert np.allclose(s4, s10, atol=2e-3) and not np.allclose(s4, z, atol=1e-2)
    P.main(
        [
            str(src),
            str(tmp_path / "std.npy"),
            "--vae",
            str(tmp_path / "vae"),
            "--scale",
            "std",
            "--batch",
            "10",
        ]
    )
    scale = json.loads((tmp_path / "std.json").read_text())["scale"]
    assert scale == pytest.approx(1 / post.mean.std().item(), rel=1e-4)
    assert np.allclose(np.load(tmp_path / "std.npy"), np.asarray(z, np.float32) * scale, atol=1e-2)


def test_vae_encoding_resumes_after_a_stop_with_the_same_file(tmp_path, image_folder, monkeypatch):
    src, _ = image_folder
    tiny_vae(tmp_path / "vae")
    flags = ["--vae", str(tmp_path / "vae"), "--batch", "3", "--posterior", "sample"]
    P.main([str(src), str(tmp_path / "full.npy"), *flags])
    batches = P.batches

    def stop_after_two(chunks, size):
        for i, b in enumerate(batches(chunks, size)):
            if i == 2:
                raise KeyboardInterrupt
            yield b

    monkeypatch.setattr(P, "batches", stop_after_two)
    with pytest.raises(KeyboardInterrupt):
        P.main([str(src), str(tmp_path / "part.npy"), *flags])
    assert json.loads((tmp_path / "part.npy.partial.json").read_text())["done"] == 6
    assert not (tmp_path / "part.npy").exists()
    monkeypatch.setattr(P, "batches", batches)
    P.main([str(src), str(tmp_path / "part.npy"), *flags])
    assert np.array_equal(np.load(tmp_path / "part.npy"), np.load(tmp_path / "full.npy"))
    assert not any("partial" in f for f in os.listdir(tmp_path))


def test_a_missing_vae_is_one_line_naming_it_and_its_folder(tmp_path, image_folder):
    src, _ = image_folder
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, TOOL, str(src), str(tmp_path / "o.npy"), "--vae", "org/no-such-vae"],
                       capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert "org/no-such-vae" in last and str(tmp_path / "hf") in last and "--vae FOLDER" in last
    r = subprocess.run([sys.executable, TOOL, str(src), str(tmp_path / "o.npy"), "--scale", "nan"],
                       capture_output=True, text=True, env=env, cwd=ROOT)  # fmt: skip
    assert r.returncode == 2 and "--scale" in r.stderr


def test_sixteen_bit_grayscale_becomes_eight_bit_by_rounding_not_clipping(tmp_path):
    (tmp_path / "g16").mkdir()
    v = (np.arange(64, dtype=np.uint16) * 1031).reshape(8, 8)  # 0 ... 64953
    Image.fromarray(v).save(tmp_path / "g16" / "a.png")  # mode I;16: a 16-bit PNG
    assert Image.open(tmp_path / "g16" / "a.png").mode.startswith("I")
    P.main([str(tmp_path / "g16"), str(tmp_path / "g.npy")])
    assert np.array_equal(read_back(tmp_path / "g.npy")[0][0, ..., 0], np.round(v / 257).astype(np.uint8))


def test_labels_sizes_and_damage_are_found_before_the_work_in_one_line(tmp_path, monkeypatch):
    img = np.zeros((8, 8, 3), np.uint8)
    (tmp_path / "big").mkdir()
    Image.fromarray(img).save(tmp_path / "big" / "a.png")
    (tmp_path / "big" / "dataset.json").write_text(json.dumps({"labels": [["a.png", 2**40]]}))
    np.savez(tmp_path / "in.npz", data=np.zeros((2, 12288), np.uint8), labels=np.array([1, 2**40]))
    (tmp_path / "late").mkdir()  # the last image has another size: found before any image is decoded
    for name, x in (("a.png", img), ("b.png", img), ("c.png", np.zeros((16, 16, 3), np.uint8))):
        Image.fromarray(x).save(tmp_path / "late" / name)
    write_edm_dataset(tmp_path / "d.zip", np.zeros((3, 8, 8, 3), np.uint8), [0, 1, 2], zipped=True)
    data = bytearray((tmp_path / "d.zip").read_bytes())
    at = data.index(b"IDAT", data.index(b"img00000002.png")) + 8  # inside the third image's stored bytes
    data[at : at + 4] = b"\xff\xff\xff\xff"  # its CRC no longer holds
    (tmp_path / "damaged.zip").write_bytes(bytes(data))
    decoded = []
    monkeypatch.setattr(P, "decode", lambda *a: decoded.append(1))
    cases = {"big": "below 2\\*\\*16", "in.npz": "1..65536", "late": "must share one size",
             "damaged.zip": "cannot read image .*img00000002.png.*(CRC|BadZipFile)"}  # fmt: skip
    for name, words in cases.items():
        with pytest.raises(SystemExit, match=words) as e:
            P.main([str(tmp_path / name), str(tmp_path / "out.npy")])
        assert "\n" not in str(e.value) and not decoded, name
    assert sorted(os.listdir(tmp_path)) == ["big", "d.zip", "damaged.zip", "in.npz", "late"]


def test_output_problems_and_bad_numbers_are_one_line_before_the_work(tmp_path):
    (tmp_path / "src").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "src" / "a.png")
    (tmp_path / "file").write_text("")
    for out in (
        tmp_path / "file" / "o.npy",
        tmp_path / ("o" * 240 + ".npy"),
    ):  # a folder that is a file; OUT.labels.npy.tmpPID too long
        with pytest.raises(SystemExit, match="cannot write") as e:
            P.main([str(tmp_path / "src"), str(out)])
        assert "\n" not in str(e.value)
    for flag, value in (("--batch", str(2**20 + 1)), ("--seed", "-1"), ("--resolution", "0")):
        with pytest.raises(SystemExit) as e:
            P.main([str(tmp_path / "src"), str(tmp_path / "o.npy"), flag, value])
        assert e.value.code == 2, flag

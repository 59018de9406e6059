"""The data readers. The shared data block (in aot_edm and the other files that still hold it): arrays and
EDM-format image folders/zips read per batch (memory O(batch)), their labels, and one-line errors for data
that is not what it claims to be. edm_teacher's own reader (load_data, get_batch): a 200 MB array streams too."""

import contextlib
import ctypes

import numpy as np
import pytest
import torch
from PIL import Image

import aot_edm as A
import edm_teacher as E
from conftest import write_edm_dataset


def rss_mb():
    """Resident memory, after glibc hands freed heap memory back (freed batches are not the reader's)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def write_npy(path, n):
    """uint8 [n, 64, 64, 3] as tools/prepare_data.py writes it; every pixel of image i is i % 251."""
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(n, 64, 64, 3))
    for i in range(0, n, 2048):
        arr[i : i + 2048] = (np.arange(i, min(i + 2048, n)) % 251)[:, None, None, None]
    del arr
    return str(path)


def read_npy(module, path, n):
    """(images, labels) of an .npy through `module`'s reader, checked for what that reader promises."""
    if module == "edm_teacher":  # its own reader: uint8 NHWC (memory-mapped); get_batch reads the batch
        images, labels = E.load_data(path)
        assert images.shape == (n, 64, 64, 3) and images.dtype == np.uint8
        return images, labels
    images, labels = A.load_images(path)  # the shared data block
    assert isinstance(images, A.LazyImages) and images.shape == (n, 3, 64, 64)
    return images, labels


@pytest.mark.parametrize("module", ["aot_edm", "edm_teacher"])
def test_a_200_mb_npy_streams_with_little_memory(tmp_path, module):
    M = E if module == "edm_teacher" else A
    n = 16384  # 16384 x 64 x 64 x 3 = 201 MB
    path = write_npy(tmp_path / "big.npy", n)
    # Warm up on another, small file: the allocator's and torch's first-use memory is not the reader's, and
    # the big file stays untouched (mapped file pages come in large chunks: one batch can map 100+ MB).
    small, _ = read_npy(module, write_npy(tmp_path / "small.npy", 256), 256)
    for step in range(4):
        M.get_batch(small, None, M.batch_indices(256, 128, step, seed=1), "cpu")
    before = rss_mb()
    images, labels = read_npy(module, path, n)
    assert labels is None
    peak = before
    for step in range(n // 128):  # one epoch of shuffled batches of 128 (6 MB as floats)
        idx = M.batch_indices(n, 128, step, seed=0)
        y, _ = M.get_batch(images, None, idx, "cpu")
        assert y.shape == (128, 3, 64, 64) and y.dtype == torch.float32
        assert torch.equal(y[:, 0, 0, 0], ((idx % 251).float() / 127.5 - 1))  # the right images
        peak = max(peak, rss_mb())
    assert peak - before < 60, f"RSS grew by {peak - before:.0f} MB while reading a 201 MB file"


def test_npz_stored_is_lazy_and_compressed_is_read_whole(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8), np.arange(10) % 4
    np.savez(tmp_path / "a.npz", images=images, labels=labels)
    np.savez_compressed(tmp_path / "b.npz", images=images, labels=labels)
    a, la = A.load_images(str(tmp_path / "a.npz"))
    b, lb = A.load_images(str(tmp_path / "b.npz"))
    assert isinstance(a, A.LazyImages) and isinstance(b, torch.Tensor)
    ref = torch.from_numpy(images).permute(0, 3, 1, 2)
    assert torch.equal(a[torch.tensor([3, 0, 3])], ref[[3, 0, 3]]) and torch.equal(b, ref)
    assert torch.equal(a[2:5], ref[2:5]) and torch.equal(la, lb) and la.dtype == torch.int64


@pytest.mark.parametrize("zipped", [False, True])
def test_edm_format_folder_and_zip_read_per_batch_with_labels(tmp_path, zipped):
    rng = np.random.default_rng(1)
    images, labels = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8), rng.integers(0, 5, 12)
    root = tmp_path / ("d.zip" if zipped else "d")
    if not zipped:
        root.mkdir()
    write_edm_dataset(root, images, labels, zipped)
    x, y = A.load_images(str(root))
    assert isinstance(x, A.LazyImages) and len(x) == 12 and torch.equal(y, torch.from_numpy(labels))
    assert torch.equal(x[torch.arange(12)], torch.from_numpy(images).permute(0, 3, 1, 2))


def test_palette_png_is_read_as_colours_not_indices(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[:4] = (200, 10, 30)
    (tmp_path / "d").mkdir()
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "d" / "a.png")
    x, _ = A.load_images(str(tmp_path / "d"))
    assert x.shape == (1, 3, 8, 8) and x[0][:, 0, 0].tolist() == [200, 10, 30]


def test_bad_data_gives_one_line_errors(tmp_path):
    (tmp_path / "mixed").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "mixed" / "a.png")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "mixed" / "b.png")
    (tmp_path / "badjson").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "badjson" / "a.png")
    (tmp_path / "badjson" / "dataset.json").write_text("{not json")
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "neg.npz", images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.array([0, -1]))
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 8, 8, 3), np.float32))
    cases = {
        "empty.npz": "holds no images",
        "neg.npz": "class indices",
        "float.npz": "uint8",
        "badjson": "dataset.json",
        "missing.zip": "not found",
    }
    for name, words in cases.items():
        with pytest.raises(SystemExit, match=words) as e:
            A.load_images(str(tmp_path / name))
        assert "\n" not in str(e.value)
    images, _ = A.load_images(str(tmp_path / "mixed"))
    with pytest.raises(SystemExit, match="image 1 has shape") as e:
        images[torch.tensor([0, 1])]
    assert "\n" not in str(e.value)

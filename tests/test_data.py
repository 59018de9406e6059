"""The data readers of edm_teacher and aot_edm (load_data, get_batch): a 200 MB prepared array streams with
memory O(batch), and data that is not what it claims to be is a one-line error. Image folders and EDM zips are
tools/prepare_data.py's (tests/test_prepare_data.py)."""

import contextlib
import ctypes
import re

import numpy as np
import pytest
import torch

import aot_edm as A
import edm_teacher as E

MODULES = {"aot_edm": A, "edm_teacher": E}


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
    """(images, labels) of an .npy through `module`'s reader: uint8 NHWC, memory-mapped."""
    images, labels = MODULES[module].load_data(path)
    assert images.shape == (n, 64, 64, 3) and images.dtype == np.uint8
    return images, labels


@pytest.mark.parametrize("module", MODULES)
def test_a_200_mb_npy_streams_with_little_memory(tmp_path, module):
    M = MODULES[module]
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


@pytest.mark.parametrize("module", MODULES)
def test_bad_data_gives_one_line_errors(tmp_path, module):
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "neg.npz", images=np.zeros((2, 8, 8, 3), np.uint8), labels=np.array([0, -1]))
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 8, 8, 3), np.float32))
    np.savez(tmp_path / "oblong.npz", images=np.zeros((2, 8, 6, 3), np.uint8))
    cases = {
        "empty.npz": "(0, 8, 8, 3)",
        "neg.npz": "class indices",
        "float.npz": "float32",
        "oblong.npz": "square",
        "missing.npz": "not found",
    }
    for name, words in cases.items():
        with pytest.raises(SystemExit, match=re.escape(words)) as e:
            MODULES[module].load_data(str(tmp_path / name))
        assert "\n" not in str(e.value) and name in str(e.value)

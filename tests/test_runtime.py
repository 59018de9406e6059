"""The shared runtime block: data order, EMA, seeding, checkpoints, the fenced blocks themselves."""

import glob
import os

import pytest
import torch

import edm_teacher as E
from conftest import ROOT


@pytest.mark.parametrize("n,batch", [(12, 4), (10, 4), (5, 8)])
def test_batch_stream_is_a_permutation_per_epoch(n, batch):
    steps = 7 * n // batch + 2
    stream = torch.cat([E.batch_indices(n, batch, s, seed=3) for s in range(steps)])
    for e in range(len(stream) // n):
        assert sorted(stream[e * n : (e + 1) * n].tolist()) == list(range(n))
    assert not torch.equal(stream[:n], stream[n : 2 * n])  # a new order each epoch
    assert torch.equal(
        E.batch_indices(n, batch, 5, seed=3), stream[5 * batch : 6 * batch]
    )  # step-addressable
    assert not torch.equal(E.batch_indices(n, batch, 0, seed=4), stream[:batch])  # the seed matters


def test_edm_ema_half_life():
    assert E.edm_ema_beta(512, 0, 500, 0.05) == 0.0  # first step: EMA = weights
    beta = E.edm_ema_beta(512, 10**9, 500, 0.05)  # past ramp-up: half-life 500 kimg
    assert beta ** (500_000 / 512) == pytest.approx(0.5, rel=1e-9)
    ramp = E.edm_ema_beta(512, 1_000_000, 500, 0.05)  # ramp-up: half-life = 0.05 * 1 Mimg = 50 kimg
    assert ramp ** (50_000 / 512) == pytest.approx(0.5, rel=1e-9)
    net, ema = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    w_net, w_ema = net.weight.detach().clone(), ema.weight.detach().clone()
    E.ema_update(ema, net, 0.9)
    torch.testing.assert_close(ema.weight, 0.9 * w_ema + 0.1 * w_net)


def test_seed_step_depends_on_seed_rank_and_step_only():
    def draw(*a):
        E.seed_step(*a)
        return torch.randn(3)

    assert torch.equal(draw(0, 0, 1, 5), draw(0, 0, 1, 5))
    assert (
        len({tuple(draw(*a).tolist()) for a in [(0, 0, 1, 5), (0, 0, 1, 6), (1, 0, 1, 5), (0, 3, 4, 5)]}) == 4
    )
    # DESIGN 8: the per-rank stream is seed * world_size + rank
    assert torch.equal(draw(1, 0, 1, 5), draw(0, 1, 1, 5))


def test_checkpoint_save_is_atomic_and_latest_points_at_newest(tmp_path):
    E.save_checkpoint({"step": 1, "w": torch.ones(2)}, str(tmp_path), 1)
    E.save_checkpoint({"step": 2, "w": torch.zeros(2)}, str(tmp_path), 2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt-0000001.pt", "ckpt-0000002.pt", "latest.pt"]
    assert E.load_checkpoint(str(tmp_path))["step"] == 2
    assert E.load_checkpoint(str(tmp_path / "ckpt-0000001.pt"))["step"] == 1


class Evil:
    def __reduce__(self):
        return (open, ("/tmp/edm_teacher_pwned", "w"))


def test_checkpoint_loader_never_executes_pickled_code(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"net": Evil()}, path)
    if os.path.exists("/tmp/edm_teacher_pwned"):
        os.remove("/tmp/edm_teacher_pwned")
    with pytest.raises(SystemExit, match="weights-only") as e:
        E.load_checkpoint(str(path))
    assert "\n" not in str(e.value)
    assert not os.path.exists("/tmp/edm_teacher_pwned")
    with pytest.raises(SystemExit, match="not found"):
        E.load_checkpoint(str(tmp_path / "missing.pt"))


FENCES = ["UNet", "runtime"]


def read(path):
    with open(path) as f:
        return f.read()


def shared_block(path, name):
    text = read(path)
    start = f"# --- shared: {name} (identical in every method file) ---\n"
    end = f"# --- end shared: {name} ---\n"
    assert text.count(start) == 1 and text.count(end) == 1, f"{path}: fence of the {name} block"
    return text[text.index(start) : text.index(end) + len(end)]


def test_fenced_shared_blocks_are_byte_identical_across_method_files():
    method_files = [p for p in sorted(glob.glob(os.path.join(ROOT, "*.py"))) if "# --- shared: " in read(p)]
    assert os.path.join(ROOT, "edm_teacher.py") in method_files
    for name in FENCES:
        ref = shared_block(os.path.join(ROOT, "edm_teacher.py"), name)
        assert len(ref.splitlines()) > 20
        for path in method_files:
            assert shared_block(path, name) == ref, f"{os.path.basename(path)}: shared {name} block drifted"

"""The speed flags. Every trainer's own: --precision and --compile only (bf16 = torch.autocast around the
loss; fused Adam on CUDA, torch's default Adam on CPU; dansm and loom_cfm: torch's default Adam everywhere, as their public codes)."""

import importlib
import os

import pytest
import torch

import aot_edm as A
import cfm_couplings as C
import edm_teacher as E
from conftest import TINY_NET, read_log

TRAINERS = ["edm_teacher", "aot_edm", "lmm", "cfm_couplings", "loom_cfm", "dansm"]
OWN = TRAINERS  # every trainer has its own --precision and --compile only


@pytest.mark.parametrize("name", [*TRAINERS, "gen_pairs"])  # evaluate.py: the papers' fp32 only
def test_every_script_shows_precision_and_compile_in_its_help(name, capsys):
    with pytest.raises(SystemExit):
        importlib.import_module(name).parse_args(["--help"])
    out = capsys.readouterr().out
    assert "--precision {fp32,tf32,bf16}" in out and "--compile " in out
    if name in (*OWN, "gen_pairs"):  # its speed flags are these two only
        assert not any(f in out for f in ("--channels-last", "--fused-adam", "--compile-backend"))
        return
    assert "--channels-last" in out
    assert ("--fused-adam" in out) == (name in TRAINERS)


def edm_flags(data, outdir, steps, *extra):
    ema = ["--ema-halflife", "0.05", "--augment", "0"]
    return ["--data", data, "--outdir", str(outdir), "--batch", "8", "--duration", str(steps * 8 / 1e6)] + [
        "--lr-rampup",
        "0",
        *ema,
        "--grid",
        "0",
        "--log-every",
        "1",
        "--tiny",
        *extra,
    ]


def record_autocast(monkeypatch):
    """Whether CPU autocast was on at each call of edm_teacher's network (a list that fills as it trains)."""
    seen, forward = [], E.EDMPrecond.forward

    def spy(self, *a, **k):
        seen.append(torch.is_autocast_enabled("cpu"))
        return forward(self, *a, **k)

    monkeypatch.setattr(E.EDMPrecond, "forward", spy)
    return seen


def test_fp32_training_never_enters_autocast(npz_data, tmp_path, monkeypatch, one_thread):
    seen = record_autocast(monkeypatch)
    E.main(edm_flags(npz_data, tmp_path / "fp32", 1))
    assert seen and not any(seen), "autocast entered in an fp32 run"
    group = torch.load(tmp_path / "fp32" / "latest.pt", weights_only=True)["opt"]["param_groups"][0]
    assert group["fused"] is None and group["foreach"] is None  # torch's default Adam on CPU, as before


def assert_same_run(a, b):
    for key in ("net", "ema"):
        for k, t in a[key].items():
            assert t.dtype == torch.float32 and torch.equal(t, b[key][k]), (key, k)
    for i, state in a["opt"]["state"].items():  # the optimizer state stays float32 too
        assert all(
            v.dtype == torch.float32 and torch.equal(v, b["opt"]["state"][i][k]) for k, v in state.items()
        )


def test_bf16_edm_trains_and_resumes_bit_exactly(npz_data, tmp_path, monkeypatch, one_thread):
    seen = record_autocast(monkeypatch)
    bf16 = ["--precision", "bf16"]
    E.main(edm_flags(npz_data, tmp_path / "a", 4, *bf16))
    assert seen and all(seen)  # every training forward under autocast
    E.main(edm_flags(npz_data, tmp_path / "b", 2, *bf16))
    E.main(edm_flags(npz_data, tmp_path / "b", 4, *bf16, "--resume", str(tmp_path / "b")))
    a, b = (torch.load(tmp_path / r / "latest.pt", weights_only=True) for r in "ab")
    assert a["step"] == b["step"] == 4 and a["args"]["precision"] == "bf16"
    assert_same_run(a, b)
    E.main(edm_flags(npz_data, tmp_path / "fp32", 1))  # same seed and batch in fp32: bf16 really ran
    loss_bf16, loss_fp32 = read_log(tmp_path / "a")[0]["loss"], read_log(tmp_path / "fp32")[0]["loss"]
    assert loss_bf16 != loss_fp32 and abs(loss_bf16 - loss_fp32) < 0.05 * loss_fp32


def test_bf16_aot_edm_trains_and_resumes_bit_exactly(npz_data, tmp_path, one_thread):
    """aot_edm's own training loop under --precision bf16 (rounds of 16 pairs: the resume is mid-round)."""
    bf16 = ["--precision", "bf16", "--aot-pairs", "16"]
    A.main(edm_flags(npz_data, tmp_path / "a", 3, *bf16))
    A.main(edm_flags(npz_data, tmp_path / "b", 1, *bf16))
    A.main(edm_flags(npz_data, tmp_path / "b", 3, *bf16, "--resume", str(tmp_path / "b")))
    a, b = (torch.load(tmp_path / r / "latest.pt", weights_only=True) for r in "ab")
    assert a["step"] == b["step"] == 3 and a["args"]["precision"] == "bf16"
    assert a["opt"]["param_groups"][0]["fused"] is None  # torch's default Adam on the CPU
    assert_same_run(a, b)
    # the same run in fp32: bf16 really ran. Step 1's loss can round to the same float32 (the tiny net's last
    # conv starts near 0), so compare step 2's, after one bf16 gradient step
    A.main(edm_flags(npz_data, tmp_path / "fp32", 2, "--aot-pairs", "16"))
    loss_bf16, loss_fp32 = read_log(tmp_path / "a")[1]["loss"], read_log(tmp_path / "fp32")[1]["loss"]
    assert loss_bf16 != loss_fp32 and abs(loss_bf16 - loss_fp32) < 0.05 * loss_fp32


def cfm_flags(data, outdir, steps, *extra):
    return ["--data", data, "--outdir", str(outdir), "--batch", "8", "--duration", str(steps * 8 / 1e6)] + [
        "--tiny",
        "--log-every",
        "1",
        "--grid",
        "0",
        "--lr-rampup",
        "16e-6",
        "--coupling",
        "ot",
        *extra,
    ]


def test_compiled_bf16_cfm_resumes_bit_exactly_and_loads_into_an_eager_net(
    npz_data, tmp_path, one_thread, monkeypatch
):
    # the "eager" backend runs dynamo's capture without inductor's C++ build: the compile path in seconds
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda model, **kw: compile_(model, backend="eager"))
    fast = ["--compile", "--precision", "bf16"]
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    C.main(cfm_flags(npz_data, tmp_path / "a", 3, *fast))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # dynamo captured the forward
    C.main(cfm_flags(npz_data, tmp_path / "b", 1, *fast))
    C.main(cfm_flags(npz_data, tmp_path / "b", 3, *fast, "--resume", str(tmp_path / "b")))
    a, b = (torch.load(tmp_path / r / "latest.pt", weights_only=True) for r in "ab")
    assert a["step"] == b["step"] == 3 and a["args"]["compile"]
    assert_same_run(a, b)
    net = C.build_net(a["net_kwargs"])
    assert set(a["ema"]) == set(net.state_dict())  # plain keys: no _orig_mod., no net. prefix
    net.load_state_dict(a["ema"])
    x, nfe = C.sample(net.eval(), torch.randn(2, 3, 16, 16), 2)
    assert nfe == 2 and torch.isfinite(x).all()
    assert a["net_kwargs"]["model_channels"] == TINY_NET["model_channels"]
    assert not any(f.endswith(".tmp") for f in os.listdir(tmp_path / "a"))


def test_gen_pairs_refuses_to_mix_fp32_and_bf16_batches(teacher_ckpt, tmp_path, monkeypatch):
    from test_gen_pairs import interrupted_run, pairs_flags

    import gen_pairs as G

    out = tmp_path / "p.npz"
    for first, then in (("fp32", "bf16"), ("bf16", "fp32")):
        interrupted_run([*pairs_flags(teacher_ckpt, out, num=8), "--precision", first], monkeypatch)
        with pytest.raises(SystemExit, match="precision.*refusing to mix"):
            G.main([*pairs_flags(teacher_ckpt, out, num=8), "--precision", then])
        G.main([*pairs_flags(teacher_ckpt, out, num=8), "--precision", first])  # its own settings: it resumes
        os.remove(out)

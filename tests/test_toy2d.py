"""toy2d.py: a short run of every method on mix128 (table, JSON, figure), the --quick run of the methods the
papers' qualitative claims are about (with the analytic checks), and the claims on it; plus closed-form
checks of the toy's own metrics and its eight-Gaussian source."""

import json
import math

import pytest
import torch

import toy2d

# The methods the claims below are about (rf1, rf2's teacher, and edm, lmm's, are trained too) on --quick's
# budget (200 steps, 500 evaluation samples, a 20-step fine ODE, 30-step reflow pairs). Measured ratios to
# I-CFM (limits): 2-RF straightness 0.045 (0.2), LMM 0.51 (0.7), BOT-CFM 128 / 256 0.75 / 0.73 (0.9), LMM
# one-step SW2 0.28 (0.5) at seed 0; 0.042, 0.53, 0.76 / 0.73, 0.27 at seed 2.
CLAIMS = ["--quick", "--methods", "edm,lmm,icfm,bot128,bot256,rf2"]
# Every method through the whole pipeline (training, sampling, metrics, table, JSON, figure) on a tiny
# budget: what it proves is the plumbing, not the numbers.
EVERY = ["--train-steps", "10", "--num-train", "1024", "--num-eval", "256", "--num-pairs", "512"]
EVERY += ["--ode-steps", "4", "--reflow-steps", "4", "--no-checks", "--dpi", "40"]


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One intra-op thread: these nets are small, and on a 2-core CI runner (or a loaded machine) two threads
    per op are slower, often several times slower, than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        every, claims = tmp_path_factory.mktemp("every"), tmp_path_factory.mktemp("claims")
        result = toy2d.main([*EVERY, "--outdir", str(every)])
        rows = {r["method"]: r for r in result["problems"]["mix128"]["rows"]}
        claimed = toy2d.main([*CLAIMS, "--outdir", str(claims)])
        claim_rows = {r["method"]: r for r in claimed["problems"]["mix128"]["rows"]}
    finally:
        torch.set_num_threads(threads)
    return dict(every=(every, result, rows), claims=(claims, claimed, claim_rows))


def test_quick_run_writes_table_json_and_figures_with_finite_values(quick):
    out, result, rows = quick["every"]
    assert set(rows) == set(toy2d.METHODS)
    saved = json.loads((out / "results.json").read_text())
    assert saved["problems"]["mix128"]["rows"][0]["method"] == "edm"
    assert all(set(r["quality"]) == {"1", "2", "4", "8", "fine"} for r in saved["problems"]["mix128"]["rows"])
    assert (out / "mix128.png").stat().st_size > 10_000
    for r in rows.values():
        values = [r["straightness"], r["straightness_rel"], r["curvature"]]
        values += [v for q in r["quality"].values() for v in (q["sw2"], q["energy"], q["mode0"])]
        assert all(math.isfinite(v) for v in values), r["method"]


def test_analytic_checks_hold_on_the_quick_grid(quick):
    _, result, _ = quick["claims"]
    eq4, eq20, length = result["checks"]
    assert eq4["value"] <= 0.15  # LOOM Eq. 4: the trained I-CFM field within 15% (relative L2)
    assert all(c["similarity"] <= c["bound"] for c in eq20["grid"])  # LMM Eq. 20 in every (d, n) cell
    assert len(eq20["grid"]) == 6 and eq20["passed"]
    assert length["value"] <= 0.01 and abs(length["predicted"] - math.sqrt(2 * 2.01 + 126 * 2)) < 0.1


def test_papers_claims_hold_on_the_quick_run(quick):
    _, _, rows = quick["claims"]
    assert set(rows) == {"edm", "lmm", "icfm", "bot128", "bot256", "rf2"}
    icfm = rows["icfm"]["straightness"]
    assert rows["rf2"]["straightness"] < 0.2 * icfm  # LMM Table 1: 2-Rect-Flow and LMM stand out
    assert rows["lmm"]["straightness"] < 0.7 * icfm
    for bot in ("bot128", "bot256"):  # BatchOT is straighter than independent pairs, moderately (App. A.2)
        assert rows[bot]["straightness"] < 0.9 * icfm
    sw2 = lambda m: rows[m]["quality"]["1"]["sw2"]  # noqa: E731
    assert sw2("lmm") < 0.5 * sw2("icfm")  # one LMM step lands near the target, one I-CFM step at the mean


def test_eight_gaussian_source_is_exact():
    z = torch.randn(80_000, 2, generator=torch.Generator().manual_seed(0))
    x = toy2d.Problem("moons").source(z)
    angles = torch.arange(8) * math.pi / 4
    centres = 2 * torch.stack([angles.cos(), angles.sin()], 1)
    k = torch.cdist(x, centres).argmin(1)
    counts = k.bincount(minlength=8).float() / len(x)
    assert (counts - 1 / 8).abs().max() < 0.01
    offset = (x - centres[k]) / 0.1
    assert offset.mean(0).abs().max() < 0.02 and (offset.std(0) - 1).abs().max() < 0.02
    assert abs(torch.corrcoef(offset.T)[0, 1]) < 0.02


def test_sliced_w2_of_a_shift_and_energy_distance():
    a = torch.randn(1000, 8, generator=torch.Generator().manual_seed(1))
    shift = torch.tensor([3.0, 0, 0, 0, 0, 0, 0, 0])
    assert toy2d.sliced_w2(a, a) == 0 and abs(toy2d.energy_distance(a, a)) < 1e-9
    # projections shift by s.theta, so SW2^2 = E[(s.theta)^2] = |s|^2 / D over uniform directions
    # (exactly, whatever the sample size: sorting commutes with the shift; 4000 directions make it ~1%)
    assert toy2d.sliced_w2(a, a + shift, n_dirs=4000) == pytest.approx(3 / math.sqrt(8), rel=0.05)
    assert toy2d.energy_distance(a, a + shift) > 1.0


def test_the_toy_draws_with_the_files_defaults():
    import aot_edm
    import gen_pairs
    import loom_cfm

    assert loom_cfm.parse_args(["--data", "shapes"]).caches == toy2d.LOOM_CACHES
    assert aot_edm.parse_args(["--data", "shapes"]).aot_pairs == toy2d.AOT_ROUND
    assert gen_pairs.parse_args(["--ckpt", "c.pt", "--out", "p.npz"]).nfe == toy2d.LMM_TEACHER_NFE


def test_unknown_method_or_problem_is_refused(capsys):
    bad = (["--methods", "icfm,nope"], ["--problem", "swiss"], ["--batch", "300"], ["--num-train", "300"])
    for argv in (*bad, ["--lr", "nan"], ["--eq4-tol", "inf"], ["--train-steps", "0"]):
        with pytest.raises(SystemExit):
            toy2d.parse_args(argv)
        assert "error" in capsys.readouterr().err

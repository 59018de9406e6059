"""toy2d.py: one quick run of every method on mix128 (about a minute), the analytic checks, and the papers'
qualitative claims on it; plus closed-form checks of the toy's own metrics and its eight-Gaussian source."""

import json
import math

import pytest
import torch

import toy2d


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    result = toy2d.main(["--quick", "--out", str(out)])
    return out, result, {r["method"]: r for r in result["problems"]["mix128"]["rows"]}


def test_quick_run_writes_table_json_and_figures_with_finite_values(quick):
    out, result, rows = quick
    assert set(rows) == set(toy2d.METHODS)
    saved = json.loads((out / "results.json").read_text())
    assert saved["problems"]["mix128"]["rows"][0]["method"] == "edm"
    assert len((out / "results.csv").read_text().splitlines()) == 1 + len(rows) * (len(toy2d.NFES) + 1)
    for png in ("mix128.png", "batch_ot_bound.png"):
        assert (out / png).stat().st_size > 10_000
    for r in rows.values():
        values = [r["straightness"], r["straightness_rel"], r["curvature"]]
        values += [v for q in r["quality"].values() for v in (q["sw2"], q["energy"], q["mode0"])]
        assert all(math.isfinite(v) for v in values), r["method"]


def test_analytic_checks_hold_on_the_quick_grid(quick):
    _, result, _ = quick
    eq4, eq20, length = result["checks"]
    assert eq4["value"] <= 0.15  # LOOM Eq. 4: the trained I-CFM field within 15% (relative L2)
    assert all(c["similarity"] <= c["bound"] for c in eq20["grid"])  # LMM Eq. 20 in every (d, n) cell
    assert len(eq20["grid"]) == 6 and eq20["passed"]
    assert length["value"] <= 0.01 and abs(length["predicted"] - math.sqrt(2 * 2.01 + 126 * 2)) < 0.1


def test_papers_claims_hold_on_the_quick_run(quick):
    _, _, rows = quick
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
    a = torch.randn(4000, 8, generator=torch.Generator().manual_seed(1))
    shift = torch.tensor([3.0, 0, 0, 0, 0, 0, 0, 0])
    assert toy2d.sliced_w2(a, a) == 0 and abs(toy2d.energy_distance(a, a)) < 1e-9
    # projections shift by s.theta, so SW2^2 = E[(s.theta)^2] = |s|^2 / D over uniform directions
    assert toy2d.sliced_w2(a, a + shift, n_dirs=4000) == pytest.approx(3 / math.sqrt(8), rel=0.05)
    assert toy2d.energy_distance(a, a + shift) > 1.0


def test_unknown_method_or_problem_is_refused(capsys):
    for argv in (["--methods", "icfm,nope"], ["--problem", "swiss"], ["--batch", "300"]):
        with pytest.raises(SystemExit):
            toy2d.parse_args(argv)
        assert "error" in capsys.readouterr().err

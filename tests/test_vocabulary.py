"""One command-line vocabulary, checked on every script's --help: the same word means
the same thing in every file, and every number a flag takes is finite."""

import argparse
import contextlib
import functools
import importlib
import importlib.util
import io
import os

import pytest

from conftest import ROOT

TRAINERS = ("edm_teacher", "aot_edm", "lmm", "cfm_couplings", "loom_cfm", "dansm")
SAMPLERS = (*TRAINERS, "gen_pairs", "evaluate")  # the scripts that run a method's sampler for the user
SCRIPTS = (*SAMPLERS, "toy2d", "tools/convert_edm", "tools/prepare_data")
EMA = dict(edm_teacher="--ema-halflife", aot_edm="--ema-halflife", lmm="--ema-decay", cfm_couplings="--ema-decay",
           loom_cfm="--ema-decay", dansm="--ema-decay")  # fmt: skip
TEST_ONLY = {"lmm": ("--lpips-random-trunk", "--disc-random-weights"), "evaluate": ("--test-features",)}
# Other words for the same things: each concept has one flag.
SYNONYMS = dict(
    ema=("--ema",),
    nfe=("--steps", "--num-steps", "--n-steps", "--sample-steps", "--sampling-steps", "--heun-steps"),
    ckpt=("--checkpoint", "--model", "--teacher", "--network", "--net", "--load", "--pkl", "--weights"),
    num=("--samples", "--num-samples", "--npairs", "--nimages", "--num-imgs", "--n-images", "--n-pairs"),
    xflip=("--flip", "--hflip", "--mirror", "--random-flip", "--xflip-copies", "--no-xflip"),
    cond=("--conditional", "--class-cond", "--uncond", "--use-labels", "--labels"),
)


def load(script):
    if "/" not in script:
        return importlib.import_module(script)
    path = os.path.join(ROOT, script + ".py")
    spec = importlib.util.spec_from_file_location(os.path.basename(script), path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def cli(script):
    """(parser, --help text, {flag: action}) of a script: its parse_args (or main) run on --help, in-process,
    with the parser recorded on its way through argparse."""
    module, seen, out = load(script), [], io.StringIO()
    original = argparse.ArgumentParser.parse_known_args

    def record(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    argparse.ArgumentParser.parse_known_args = record
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
            getattr(module, "parse_args", module.main)(["--help"])
    finally:
        argparse.ArgumentParser.parse_known_args = original
    assert e.value.code == 0 and seen, f"{script} --help did not exit 0 through argparse"
    flags = {opt: a for a in seen[0]._actions for opt in a.option_strings}
    return seen[0], out.getvalue(), flags


def is_switch(action):
    return action.nargs == 0 and action.const is True


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_visible_flag_and_no_synonym(script):
    _, text, flags = cli(script)
    assert [f for f, a in flags.items() if a.help != argparse.SUPPRESS and f not in text] == []
    assert {k: sorted(set(v) & set(flags)) for k, v in SYNONYMS.items() if set(v) & set(flags)} == {}
    assert [f for f in flags if f.startswith("--n-")] == []  # counts are --num-...


@pytest.mark.parametrize("script", TRAINERS)
def test_every_trainer_names_its_ema_unit_and_has_tiny_and_one_xflip(script):
    _, _, flags = cli(script)
    other = "--ema-decay" if EMA[script] == "--ema-halflife" else "--ema-halflife"
    assert EMA[script] in flags and other not in flags
    assert "--tiny" in flags and is_switch(flags["--tiny"])
    xflip = flags.get("--xflip")
    assert xflip is not None and xflip.nargs is None and "off" in (xflip.choices or ())
    assert set(xflip.choices) <= {"off", "random", "copies"}


@pytest.mark.parametrize("script", SAMPLERS)
def test_samplers_take_nfe_and_ckpt(script):
    _, _, flags = cli(script)
    assert "--nfe" in flags and "network evaluations" in (flags["--nfe"].help or "")
    assert "--ckpt" in flags


@pytest.mark.parametrize("script", SCRIPTS)
def test_cond_and_xflip_have_one_form_wherever_they_appear(script):
    _, _, flags = cli(script)
    assert "--cond" not in flags or is_switch(flags["--cond"])  # labels from the data: a plain switch
    if "--xflip" in flags:
        assert set(flags["--xflip"].choices or ()) <= {"off", "random", "copies"} and flags["--xflip"].choices


def test_counts_are_num_pairs_and_num_images():
    assert "--num-pairs" in cli("gen_pairs")[2] and "--num-images" in cli("evaluate")[2]


@pytest.mark.parametrize("script", SCRIPTS)
def test_test_only_switches_are_hidden(script):
    _, text, flags = cli(script)
    for flag in TEST_ONLY.get(script, ()):  # random-weight feature networks: the tests' stand-ins
        assert flag in flags and flags[flag].help == argparse.SUPPRESS and flag not in text
    looks_test_only = [f for f in flags if "random-" in f or f.startswith("--test-")]
    assert [f for f in looks_test_only if flags[f].help != argparse.SUPPRESS] == []


def numeric(action):
    """A flag whose argparse type turns text into a number (or a list of numbers)."""
    for text in ("1", "2", "0.5"):
        try:
            v = action.type(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            continue
        v = v if isinstance(v, list | tuple) else [v]
        return bool(v) and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
    return False


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_number_flag_refuses_nan_and_inf(script, capsys):
    parser, _, flags = cli(script)
    accepted = []
    for flag in [f for f, a in flags.items() if a.type is not None and numeric(a)]:
        for value in ("nan", "inf", "-inf"):  # --flag=value: "-inf" would otherwise read as another flag
            try:
                parser.parse_known_args([f"{flag}={value}"])
                accepted.append(f"{flag} {value}")
            except SystemExit as e:  # argparse's error names the flag: its type refused the value
                if e.code != 2 or flag not in capsys.readouterr().err:
                    accepted.append(f"{flag} {value}")
    assert accepted == []

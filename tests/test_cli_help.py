"""The command line's help, the settings docstrings and the README describe the presets that run;
``-v``/``--quiet`` work before and after every sub-command; ``register`` without inputs is an error."""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import pytest

import avsm.settings as settings_module
from avsm.cli.main import build_parser, log_level, main, parse_args
from avsm.cli.register import iterations_help, options_from_args
from avsm.settings import PRESETS, RegistrationSettings, describe_preset, preset

ROOT = Path(__file__).resolve().parents[1]

#: the fewest arguments each sub-command parses with (a new sub-command without required options needs none)
REQUIRED = {
    "register": ["--out-dir", "out"],
    "warp": ["--moving", "m.nii.gz", "--reference", "f.nii.gz", "--transform", "t.mat", "--out", "o.nii.gz"],
    "jacobian": ["--transform", "t.mat", "--reference", "f.nii.gz", "--out", "o.nii.gz"],
    "evaluate": ["--pairs", "pairs.csv", "--out-dir", "out"],
    "status": ["out"],
}


def _squash(text: str) -> str:
    """``text`` without whitespace (argparse re-wraps help, breaking lines at spaces and hyphens)."""
    return re.sub(r"\s+", "", text)


def _level(scale: float) -> str:
    f = Fraction(scale).limit_denominator(1024)
    return str(f.numerator) if f.denominator == 1 else f"{f.numerator}/{f.denominator}"


def _schedules(s: RegistrationSettings) -> dict[str, str]:
    """Each stage's iteration schedule, written here from the settings objects (not by describe_preset)."""
    return {key: f"{'/'.join(str(i) for i in c.iterations)} iterations at {', '.join(_level(x) for x in c.scales)}"
            for key in ("affine", "vsvf", "refine", "linear") for c in (getattr(s, key),)}


def _register_help() -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return sub.choices["register"].format_help()


@pytest.fixture(autouse=True)
def _restore_avsm_log_level() -> Iterator[None]:
    logger = logging.getLogger("avsm")
    level = logger.level
    yield
    logger.setLevel(level)


# ---------------------------------------------------------------------- presets in help, docstrings, README


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_described_from_its_settings(name: str) -> None:
    s = preset(name)
    described = describe_preset(name)
    for key, schedule in _schedules(s).items():
        assert schedule in described, (key, schedule, described)
    vs = s.vsvf
    assert (f"{vs.squarings} squarings" if vs.integrator == "ss" else f"{vs.time_steps} steps") in described
    assert f"{min(vs.sigmas):g}–{max(vs.sigmas):g}" in described
    affine_part = next(p for p in described.split("; ") if p.startswith("affine-opt:"))
    assert ("(early stop)" in affine_part) == (s.affine.tol > 0)
    assert ("the image's own spacing" in described) == (s.spacing == "native")
    # PRESETS, the --preset help and both docstrings carry the generated text, not a hand-written one
    assert described in PRESETS[name]
    assert _squash(PRESETS[name]) in _squash(_register_help())
    for doc in (settings_module.__doc__, preset.__doc__):
        assert doc is not None and f"* ``{name}``: {PRESETS[name]}" in doc


def test_iteration_options_help_lists_every_presets_counts() -> None:
    help_text = _squash(_register_help())
    for name in PRESETS:
        s = preset(name)
        for key in ("affine", "linear", "vsvf", "refine"):
            c = getattr(s, key)
            counts = f"{name}{','.join(str(i) for i in c.iterations)}at{','.join(_level(x) for x in c.scales)}"
            assert counts in help_text, (name, key, counts)


def test_help_has_no_iteration_count_that_no_preset_runs() -> None:
    """Every iteration schedule written in ``avsm register --help`` is one that some preset runs."""
    run = {sep.join(str(i) for i in getattr(preset(n), k).iterations)
           for n in PRESETS for k in ("affine", "linear", "vsvf", "refine") for sep in ("/", ",")}
    help_text = " ".join(_register_help().split())
    written = set(re.findall(r"\b\d+(?:[/,]\d+)+(?= iterations| at)", help_text))
    written |= set(re.findall(r"(?<![\d/,])(\d+) (?:iterations )?at\b", help_text))
    assert written and written <= run, sorted(written - run)


def test_descriptions_follow_a_changed_preset(monkeypatch: pytest.MonkeyPatch) -> None:
    """A preset whose counts change is described with the new counts (no number is written twice)."""
    real = settings_module.preset

    def changed(name: str, **kw: object) -> RegistrationSettings:
        s = real(name, **kw)
        return s.replace(vsvf=dataclasses.replace(s.vsvf, iterations=(7, 8, 9), scales=(0.25, 0.5, 1.0)))

    monkeypatch.setattr(settings_module, "preset", changed)
    assert "7/8/9 iterations at 1/4, 1/2, 1" in describe_preset("fast")
    assert "fast 7,8,9 at 1/4, 1/2, 1" in iterations_help("vsvf")


def test_readme_preset_table_is_generated_from_the_settings() -> None:
    readme = _squash((ROOT / "README.md").read_text(encoding="utf-8"))
    for name in PRESETS:
        assert _squash(describe_preset(name)) in readme, (
            f"README: the {name!r} row of the preset table is out of date; regenerate it with "
            "python -c \"import avsm.settings as s; print(s.presets_markdown())\"")
    assert _squash(settings_module.presets_markdown()) in readme


def test_method_help_and_docstring_say_auto_runs_opt() -> None:
    assert "auto(default):opt" in _squash(_register_help())
    doc = RegistrationSettings.__doc__ or ""
    assert "runs ``opt`` on every input" in doc and "``net+opt`` for inputs" not in doc


# ---------------------------------------------------------------------- -v / --quiet on every sub-command


def _subcommands() -> list[str]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return list(sub.choices)


@pytest.mark.parametrize("name", _subcommands())
def test_verbosity_before_and_after_every_subcommand(name: str) -> None:
    req = REQUIRED.get(name, [])
    assert parse_args([name, *req]).verbose == 0
    assert parse_args(["-v", name, *req]).verbose == 1
    assert parse_args([name, *req, "-v"]).verbose == 1
    assert parse_args([name, "-vv", *req]).verbose == 2
    assert parse_args(["--verbose", name, *req, "--verbose"]).verbose == 2
    assert parse_args(["-v", name, *req, "-v"]).verbose == 2
    for argv in (["--quiet", name, *req], [name, *req, "--quiet"]):
        args = parse_args(argv)
        assert args.quiet and args.verbose == 0, argv
    assert not parse_args([name, *req]).quiet
    with pytest.raises(SystemExit) as e:
        parse_args(["-v", name, *req, "--quiet"])
    assert e.value.code == 2


@pytest.mark.parametrize("argv, level", [
    ([], logging.WARNING),
    (["-v"], logging.INFO),
    (["-vv"], logging.DEBUG),
    (["-vvv"], logging.DEBUG),
    (["--quiet"], logging.WARNING),
])
@pytest.mark.parametrize("where", ["before", "after"])
def test_verbosity_sets_the_log_level(argv: list[str], level: int, where: str, tmp_path: Path,
                                      caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    base = ["register", "--out-dir", str(out)]
    line = [*argv, *base] if where == "before" else [*base, *argv]
    assert log_level(parse_args(line)) == level
    rc = main(line)  # no inputs: an error, after logging is configured
    assert rc == 2 and not out.exists()
    assert logging.getLogger("avsm").getEffectiveLevel() == level
    caplog.clear()
    logging.getLogger("avsm.test_cli_help").info("an info message")
    logging.getLogger("avsm.test_cli_help").debug("a debug message")
    logging.getLogger("avsm.test_cli_help").warning("a warning")
    got = {r.levelno for r in caplog.records if r.name == "avsm.test_cli_help"}
    assert got == {lv for lv in (logging.DEBUG, logging.INFO, logging.WARNING) if lv >= level}


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_switches_progress_bars_off(where: str) -> None:
    base = ["register", "--out-dir", "out"]
    args = parse_args(["--quiet", *base] if where == "before" else [*base, "--quiet"])
    assert options_from_args(args)["progress"] is False
    assert options_from_args(parse_args(base))["progress"] is True


# ---------------------------------------------------------------------- register without inputs


@pytest.mark.parametrize("given, missing", [
    ([], ["--fixed", "--moving"]),
    (["--fixed", "f.nii.gz"], ["--moving"]),
    (["--moving", "m.nii.gz"], ["--fixed"]),
])
def test_register_without_inputs_names_what_is_missing(given: list[str], missing: list[str], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    rc = main(["register", *given, "--out-dir", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("avsm: error: missing "), err
    named = err[0].split(":")[2]
    assert all(m in named for m in missing) and all(m not in named for m in {"--fixed", "--moving"} - set(missing))
    assert "avsm demo" in err[0] and "--pairs" in err[0]
    assert not out.exists()  # the demo did not run


def test_register_without_out_dir_names_it(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["register"]) == 2
    err = capsys.readouterr().err
    assert "missing --fixed, --moving and --out-dir" in err
    assert main(["register", "--pairs", "pairs.csv"]) == 2
    err = capsys.readouterr().err
    assert "missing --out-dir" in err and "--fixed" not in err.split(":")[2]


def test_every_preset_that_preset_builds_is_listed() -> None:
    """A preset added to :func:`avsm.settings.preset` but not to ``PRESET_PURPOSES`` would be missing from
    ``--preset``'s choices, its help and the README."""
    import inspect

    built = set(re.findall(r"name == [\"'](\w[\w+-]*)[\"']", inspect.getsource(settings_module.preset)))
    assert built and built <= set(PRESETS), sorted(built - set(PRESETS))
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    choices = next(a for a in sub.choices["register"]._actions if a.dest == "preset").choices
    assert tuple(choices) == tuple(PRESETS)

"""Each method declares its options once (a dataclass of `option` fields); the CLI flags, their help,
the run config's `growth.<method>` keys and every bound check derive from it."""
import dataclasses

import pytest

from scalegrow.cli import build_parser, main
from scalegrow.errors import InputError
from scalegrow.methods import registry as methods
from scalegrow.methods.ligo import LigoOptions
from scalegrow.methods.options import option
from scalegrow.operators.identity import Identity
from scalegrow.train.config import load_run_config


def subcommand(name: str):
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[name]


def flag_help(command: str, flag: str) -> str:
    return next(a.help for a in subcommand(command)._actions if flag in a.option_strings)


def test_every_method_option_is_a_flag_with_its_help_and_default():
    for kind in (methods.GROW, methods.SHRINK):
        for name in methods.names(kind):
            options = methods.METHODS[name].options
            for f in dataclasses.fields(options) if options else []:
                flag = f.metadata["flag"] or "--" + ("no-" if f.default is True else "") + f.name.replace("_", "-")
                help_text = flag_help(kind, flag)
                assert name in help_text and f.metadata["help"] in help_text
                shown = "off" if f.default is False else f.default
                assert f.default is True or f.default is None or f"default: {shown}" in help_text


def test_flags_given_become_the_methods_options():
    a = build_parser().parse_args(["grow", "--src", "s", "--dst", "d", "--target", "t", "--method", "ligo",
                                   "--steps", "7", "--width-init", "random", "--granularity", "2"])
    assert methods.options_from_flags("ligo", methods.GROW, vars(a)) == LigoOptions(steps=7, width_init="random")
    assert methods.options_from_flags("upcycle", methods.GROW, vars(a)).granularity == 2
    a = build_parser().parse_args(["shrink", "--src", "s", "--dst", "d", "--target", "t", "--no-rescale",
                                   "--calib-tokens", "512"])
    opts = methods.options_from_flags("subclone", methods.SHRINK, vars(a))
    assert (opts.tokens, opts.rescale) == (512, False)
    assert methods.options_from_flags("prune-experts", methods.SHRINK, vars(a)).tokens == 512


@pytest.mark.parametrize("argv, message", [
    (["--method", "ligo", "--steps", "0"], "--steps: must be >= 1, got 0"),
    (["--method", "ligo", "--width-noise", "-1"], "--width-noise: must be >= 0, got -1.0"),
    (["--method", "ligo", "--width-init", "zeros"], "argument --width-init: invalid choice: 'zeros'"),
    (["--method", "upcycle", "--noise", "-0.5"], "--noise: must be >= 0, got -0.5"),
])
def test_bad_option_values_name_the_flag(tmp_path, capsys, argv, message):
    code = main(["grow", "--src", str(tmp_path / "src"), "--dst", str(tmp_path / "dst"), "--target", "t.yaml",
                 *argv])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_run_config_growth_sections_come_from_the_options(tmp_path):
    cfg = load_run_config(None, ["growth.ligo.steps=3", "growth.ligo.width_init=random", "growth.upcycle.noise=0.1"])
    assert cfg.growth.ligo == LigoOptions(steps=3, width_init="random") and cfg.growth.upcycle.noise == 0.1
    assert set(cfg.growth.sections) == {n.replace("-", "_") for n in methods.names(methods.GROW)
                                        if methods.METHODS[n].options}
    with pytest.raises(InputError, match="growth.ligo.width_noise: must be >= 0, got -1"):
        load_run_config(None, ["growth.ligo.width_noise=-1"])
    with pytest.raises(InputError, match="growth.ligo.width_init: 'zeros' is not one of select, random"):
        load_run_config(None, ["growth.ligo.width_init=zeros"])
    with pytest.raises(InputError, match=r"growth.ligo.stepz: unknown key \(known: depth_noise, lr, steps"):
        load_run_config(None, ["growth.ligo.stepz=3"])


def test_a_new_methods_options_reach_the_cli_with_no_cli_change(monkeypatch):
    @dataclasses.dataclass(frozen=True)
    class CopyOptions:
        passes: int = option(2, "how many times to copy", minimum=1)

    monkeypatch.setitem(methods.METHODS, "copy", methods.Method("copy", methods.GROW, Identity, CopyOptions))
    assert "copy: how many times to copy (default: 2)" in flag_help("grow", "--passes")
    a = build_parser().parse_args(["grow", "--src", "s", "--dst", "d", "--target", "t", "--passes", "5"])
    assert methods.options_from_flags("copy", methods.GROW, vars(a)) == CopyOptions(passes=5)

"""A method's options, declared once: a frozen dataclass whose fields are made by `option` (default,
help, CLI flag, bounds). The `scalegrow grow/shrink` flags, the run config's `growth.<method>` keys,
their help and their checks all derive from it; nothing else lists a method's options."""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from typing import Any

from scalegrow.errors import InputError


def option(default: Any, help: str, *, flag: str | None = None, minimum: float | None = None,
           choices: tuple | None = None, metavar: str | None = None):
    """A method option: its default, its help, its CLI flag (default: `--field-name`; a switch for a
    bool: `--no-field-name` when it defaults to true), and what values it accepts."""
    return dataclasses.field(default=default, metadata={"help": help, "flag": flag, "minimum": minimum,
                                                        "choices": choices, "metavar": metavar})


@dataclass(frozen=True)
class Flag:
    """How one option is spelled on the command line."""

    name: str  # --calib-tokens
    field: str  # tokens
    type: Any  # int, float, str, or bool for a switch
    help: str
    default: Any
    choices: tuple | None = None
    metavar: str | None = None

    @property
    def dest(self) -> str:
        return self.name.removeprefix("--").replace("-", "_")

    @property
    def switch(self) -> bool:
        return self.type is bool


def flags(options: type) -> list[Flag]:
    """The CLI flags of an options dataclass."""
    hints = typing.get_type_hints(options)
    out = []
    for f in fields(options):
        kind = next((a for a in typing.get_args(hints[f.name]) if a is not type(None)), hints[f.name])
        name = f.metadata.get("flag") or "--" + ("no-" if kind is bool and f.default else "") + f.name.replace("_", "-")
        out.append(Flag(name, f.name, kind, f.metadata["help"], f.default, f.metadata.get("choices"),
                        f.metadata.get("metavar")))
    return out


def from_flags(options: type, given: dict[str, Any]) -> Any:
    """The options made from the flags given (argparse dests; a flag left out keeps its default)."""
    spelled = {flag.field: flag for flag in flags(options)}
    made = options(**{field: (not flag.default) if flag.switch else given[flag.dest]
                      for field, flag in spelled.items() if flag.dest in given})
    check(made, lambda field: spelled[field].name)
    return made


def check(opts: Any, spelled=lambda name: name) -> None:
    """Every option within its bounds and choices; the error names it as `spelled(field)` does
    (a CLI flag, or a run config key)."""
    for f in fields(opts):
        value, minimum, choices = getattr(opts, f.name), f.metadata.get("minimum"), f.metadata.get("choices")
        if minimum is not None and value is not None and value < minimum:
            raise InputError(f"{spelled(f.name)}: must be >= {minimum}, got {value}")
        if choices is not None and value not in choices:
            raise InputError(f"{spelled(f.name)}: {value!r} is not one of {', '.join(map(str, choices))}")

"""The methods scalegrow grows and shrinks with, by name (`--method`, `growth.method`).

A `Method` says how to build its operator and, where the operator needs something learned from the
source first, the prepare step that learns it (LiGO trains its operator, subcloning calibrates) and
the corpus it reads. Its options dataclass (`methods/options.py`) is the one place its options are
written: the CLI's flags and the run config's `growth.<method>` sections derive from it. Adding a
method: an operator in `scalegrow/operators/`, a prepare step here if it needs one, and one line in
`METHODS`.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, fields
from typing import Any, Callable, ContextManager

from scalegrow.core.config import ModelConfig
from scalegrow.errors import InputError
from scalegrow.methods import experts, ligo, stack, subclone, upcycle
from scalegrow.methods.base import Context
from scalegrow.methods.options import Flag, check, flags, from_flags
from scalegrow.operators.base import Operator
from scalegrow.operators.experts import MoreExperts, PruneExperts
from scalegrow.operators.identity import Identity
from scalegrow.operators.lemon import LemonGrowth
from scalegrow.operators.ligo import LigoGrowth
from scalegrow.operators.peers import Bert2BertAKI, HyperCloning, LlamaPro, Stack
from scalegrow.operators.subclone import DropLayers, Subclone

GROW, SHRINK = "grow", "shrink"
DEFAULT = {GROW: "lemon", SHRINK: "subclone"}


@dataclass(frozen=True)
class Corpus:
    """The data a prepare step reads, as the command line asks for it."""

    flag: str  # --data, --calib-data
    what: str  # its use, for the help


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # GROW or SHRINK
    operator: type[Operator]
    options: type | None = None  # the options dataclass (None: the method takes none)
    prepare: Callable[[Operator, Any, Context], dict] | None = None  # returns details to record
    make: Callable[[ModelConfig, ModelConfig, int, Any], Operator] | None = None  # default: operator(src, dst, seed)
    seq_length: int = 128  # token windows of the prepare data, when scalegrow tokenizes it itself
    corpus: Corpus | None = None  # the prepare step's data

    def default_options(self):
        return self.options() if self.options is not None else None

    def build(self, src: ModelConfig, dst: ModelConfig, seed: int, options) -> Operator:
        if self.make is not None:
            return self.make(src, dst, seed, options)
        return self.operator(src, dst, seed=seed)


CALIBRATION = Corpus("--calib-data", "calibration corpus")
METHODS: dict[str, Method] = {m.name: m for m in (
    Method("lemon", GROW, LemonGrowth),
    Method("ligo", GROW, LigoGrowth, ligo.LigoOptions, ligo.train_operator, ligo.make_operator,
           corpus=Corpus("--data", "training corpus")),
    Method("identity", GROW, Identity),
    Method("stack", GROW, Stack, stack.StackOptions, make=stack.make_operator),
    Method("llama-pro", GROW, LlamaPro),
    Method("hypercloning", GROW, HyperCloning),
    Method("bert2bert-aki", GROW, Bert2BertAKI),
    Method("upcycle", GROW, upcycle.Upcycle, upcycle.UpcycleOptions, make=upcycle.make_operator),
    Method("more-experts", GROW, MoreExperts),
    Method("subclone", SHRINK, Subclone, subclone.SubcloneOptions, subclone.fit_selection, seq_length=256,
           corpus=CALIBRATION),
    Method("drop-layers", SHRINK, DropLayers),
    Method("prune-experts", SHRINK, PruneExperts, experts.PruneExpertsOptions, experts.fit_experts,
           corpus=CALIBRATION),
)}


def names(kind: str) -> list[str]:
    return sorted(name for name, m in METHODS.items() if m.kind == kind)


def get(name: str, kind: str) -> Method:
    method = METHODS.get(name)
    if method is None or method.kind != kind:
        what = "growth" if kind == GROW else "shrink"
        raise InputError(f"--method: unknown {what} method {name!r} (valid: {', '.join(names(kind))})")
    return method


def command_flags(kind: str) -> dict[str, tuple[Flag, list[str]]]:
    """Every method option of `kind`'s methods as a CLI flag -> (the flag, the methods that take it).
    Methods that share a flag (`--calib-tokens`) must spell the same option alike."""
    out: dict[str, tuple[Flag, list[str]]] = {}
    for name in names(kind):
        for flag in flags(METHODS[name].options) if METHODS[name].options else []:
            seen = out.setdefault(flag.name, (flag, []))
            assert seen[0].type == flag.type and seen[0].field == flag.field, f"{flag.name}: two meanings"
            seen[1].append(name)
    return out


def corpora(kind: str) -> dict[str, str]:
    """The corpus flags of `kind`'s prepare steps -> what each is, for whom ("subclone: calibration corpus")."""
    uses: dict[str, dict[str, list[str]]] = {}
    for name in names(kind):
        corpus = METHODS[name].corpus
        if corpus is not None:
            uses.setdefault(corpus.flag, {}).setdefault(corpus.what, []).append(name)
    return {flag: "; ".join(f"{', '.join(who)}: {what}" for what, who in whats.items()) for flag, whats in uses.items()}


def options_from_flags(name: str, kind: str, given: dict[str, Any]):
    """Method `name`'s options from the command line's flags (argparse dests of those given); flags of
    other methods are not its business. None for a method that takes none."""
    method = get(name, kind)
    return from_flags(method.options, given) if method.options else None


def options_with(name: str, kind: str, **values):
    """Method `name`'s options with `values` for the fields it has (other methods' are ignored);
    None for a method that takes none."""
    method = get(name, kind)
    if method.options is None:
        return None
    known = {f.name for f in fields(method.options)}
    options = method.options(**{k: v for k, v in values.items() if k in known})
    check(options)
    return options


def build_operator(name: str, kind: str, src: ModelConfig, dst: ModelConfig, *, seed: int = 0, options=None,
                   context: Callable[[Method, Operator], ContextManager[Context]] | None = None,
                   where: str = "--target") -> tuple[Operator, dict]:
    """The operator of method `name` from `src` to `dst`, prepared, with the details to record.
    Targets are checked before any heavy work (bad ones are `InputError`s prefixed by `where`); the
    prepare step then runs in `context(method, operator)`, which may check more before it opens its
    data (the output layout, disk space). Without a context (a dry run) it is skipped."""
    method = get(name, kind)
    options = options if options is not None else method.default_options()
    try:
        op = method.build(src, dst, seed, options)
    except ValueError as exc:
        raise InputError(f"{where}: {exc}") from exc
    details = {"seed": seed}
    if method.prepare is not None and context is not None:
        with context(method, op) as ctx:
            details.update(method.prepare(op, options, ctx))
    return op, details


def ready(ctx: Context) -> Callable[[Method, Operator], ContextManager[Context]]:
    """A `context` argument for a context that already exists (e.g. a training run's)."""
    return lambda method, op: contextlib.nullcontext(ctx)

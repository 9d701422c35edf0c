"""Stacking's options: a layer map (depth up-scaling as SOLAR and mergekit's passthrough slices
write it) and whether repeated layers start as identities. The operator is `operators/peers.Stack`."""
from __future__ import annotations

from dataclasses import dataclass

from scalegrow.core.config import ModelConfig
from scalegrow.errors import InputError
from scalegrow.methods.options import option
from scalegrow.operators.peers import Stack


@dataclass(frozen=True)
class StackOptions:
    layers: str | list | None = option(
        None, "the source layers to stack, in order, as inclusive ranges: 0-19,10-29 is SOLAR's map of a "
        "30-layer model (a YAML list in a run config: [0-19, 10-29]); it sets the depth "
        "(default: target layer j copies source layer j mod L)", metavar="MAP")
    zero_copies: bool = option(False, "every repeat of a source layer after its first starts as an identity "
                               "block (zero linear_proj and linear_fc2, as llama-pro): with a map that lists "
                               "every layer first in order, the stack computes the source's function")


def parse_layers(spec: str | list) -> tuple[int, ...]:
    """'0-19,10-29' (or ['0-19', '10-29'], or [0, 1, 2]) -> the source layer of each target layer."""
    items = spec.split(",") if isinstance(spec, str) else spec
    order: list[int] = []
    for item in items:
        text = str(item).strip()
        first, dash, last = text.partition("-")
        try:
            a, b = int(first), int(last if dash else first)
        except ValueError:
            raise InputError(f"--layers: {text!r} is not a layer or an inclusive range like 10-29") from None
        if b < a:
            raise InputError(f"--layers: {text!r} runs backwards (write ranges low-high)")
        order.extend(range(a, b + 1))
    if not order:
        raise InputError("--layers: empty layer map")
    return tuple(order)


def make_operator(src: ModelConfig, dst: ModelConfig, seed: int, options: StackOptions) -> Stack:
    order = parse_layers(options.layers) if options.layers is not None else None
    return Stack(src, dst, seed, order=order, zero_copies=options.zero_copies)

"""Growth and shrink operators, looked up by name (`--method`)."""
from __future__ import annotations

from scalegrow.errors import InputError
from scalegrow.growth.base import GrowthOperator
from scalegrow.growth.identity import Identity
from scalegrow.growth.lemon import LemonGrowth
from scalegrow.growth.ligo import LigoGrowth
from scalegrow.growth.peers import Bert2BertAKI, HyperCloning, LlamaPro, Stack
from scalegrow.growth.subclone import DropLayers, Subclone

REGISTRY: dict[str, type[GrowthOperator]] = {
    LemonGrowth.name: LemonGrowth,
    Identity.name: Identity,
    LigoGrowth.name: LigoGrowth,
    Stack.name: Stack,
    LlamaPro.name: LlamaPro,
    HyperCloning.name: HyperCloning,
    Bert2BertAKI.name: Bert2BertAKI,
}


SHRINKERS: dict[str, type[GrowthOperator]] = {
    Subclone.name: Subclone,
    DropLayers.name: DropLayers,
}


def get_shrinker(name: str) -> type[GrowthOperator]:
    try:
        return SHRINKERS[name]
    except KeyError:
        raise InputError(f"--method: unknown shrink method {name!r} (valid: {', '.join(sorted(SHRINKERS))})") from None


def get_operator(name: str) -> type[GrowthOperator]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"--method: unknown growth method {name!r} (valid: {', '.join(sorted(REGISTRY))})") from None

"""Growth operators, looked up by name (`--method`)."""
from __future__ import annotations

from scalegrow.errors import InputError
from scalegrow.growth.base import GrowthOperator
from scalegrow.growth.identity import Identity
from scalegrow.growth.lemon import LemonGrowth
from scalegrow.growth.ligo import LigoGrowth

REGISTRY: dict[str, type[GrowthOperator]] = {
    LemonGrowth.name: LemonGrowth,
    Identity.name: Identity,
    LigoGrowth.name: LigoGrowth,
}


def get_operator(name: str) -> type[GrowthOperator]:
    try:
        return REGISTRY[name]
    except KeyError:
        raise InputError(f"--method: unknown growth method {name!r} (valid: {', '.join(sorted(REGISTRY))})") from None

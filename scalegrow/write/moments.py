"""Adam's state, grown with the weights (Staged Training, Shen et al., ICML 2022, §3.2: grow the whole
training state). The derivation is in docs/METHODS.md, "Grown optimizer state"; in short:

A function-preserving growth maps weights by an affine map, W' = T(W) + n (n: the symmetry-breaking
noise). Where the grown model's gradient is symmetric over the copies (exactly so without noise), the
chain rule through L' ∘ T = L gives its gradient as G(g) = T(D⁻¹ g) with D = diag(TᵀT): every copy of a
source entry carries the source's gradient divided by D, the sum of its copies' squared coefficients
(weights that read copied units are split 1/c, and their gradient is the source's whole; weights that
produce copied units are copied, and their gradient is split 1/c). So

    m' = G(m),   v' = G(√v)²   (v' is exact when every past gradient mapped by G; entry-wise maps),

and Adam's step count carries over (its bias correction must not restart: m/(1-β₁^t) at t = 1 would
multiply a carried m by 1/(1-β₁)). Entries with no source (D = 0: a new block's zeroed output
projections, LEMON's residue channels) start at zero. Tᵀ is taken by autograd through the operator
itself (its linear part, T(x) - T(0)), so every operator gets its own exact adjoint.
"""
from __future__ import annotations

import torch

from scalegrow.core import arch
from scalegrow.errors import InputError
from scalegrow.formats.optimizer import AdamMoments
from scalegrow.operators.base import Operator
from scalegrow.write.executor import apply


def _linear(op: Operator, state: dict[str, torch.Tensor], offset: dict[str, torch.Tensor]) -> dict:
    """T(x) - T(0), the operator without its constant part (noise, a zero-centred norm's gain of 1),
    on the tensors that are live at the growth point: a new identity block's are zero."""
    dormant = tuple(f"{arch.layer_key(j, '')}" for j in op.identity_layers())
    return {k: torch.zeros_like(v) if dormant and k.startswith(dormant) else v - offset[k]
            for k, v in apply(op, state).items()}


def copy_weights(op: Operator, like: dict[str, torch.Tensor], offset: dict[str, torch.Tensor]) -> dict:
    """D = diag(TᵀT), per source entry: Tᵀ(T(1)) by autograd through the operator's linear part
    (`offset`: T(0)). Exact for entry-wise maps, where TᵀT is diagonal."""
    with torch.enable_grad():
        ones = {k: torch.ones_like(v, requires_grad=True) for k, v in like.items()}
        grown = [t for t in _linear(op, ones, offset).values() if t.requires_grad]  # not: zeroed (new) tensors
        torch.autograd.backward(grown, [t.detach() for t in grown])
    return {k: v.grad if v.grad is not None else torch.zeros_like(v) for k, v in ones.items()}


def gradient_map(op: Operator, like: dict[str, torch.Tensor]):
    """G(g) = T(D⁻¹ g), the grown model's gradient for a source gradient `g` (entries with D = 0: 0)."""
    with torch.no_grad():
        offset = apply(op, {k: torch.zeros_like(v) for k, v in like.items()})
    d = copy_weights(op, like, offset)
    inverse = {k: torch.where(v > 0, 1.0 / v.clamp(min=torch.finfo(v.dtype).tiny), 0.0) for k, v in d.items()}

    def grad_map(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return _linear(op, {k: g[k].float() * inverse[k] for k in like}, offset)
    return grad_map


def grow(op: Operator, moments: AdamMoments) -> AdamMoments:
    """The source's Adam state mapped onto the grown model's parameters (module docstring)."""
    grad_map = gradient_map(op, moments.exp_avg)
    first = grad_map(moments.exp_avg)
    roots = grad_map({k: v.clamp(min=0).sqrt() for k, v in moments.exp_avg_sq.items()})
    second = {k: v.square() for k, v in roots.items()}
    return AdamMoments(first, second, moments.step)


# ---- what a growth of Adam's state needs: one refusal each, for every command and run config key ----
def require_held(src, key: str) -> None:
    """`src` (a reader) must hold Adam's state: a DeepSpeed checkpoint's, or an `optimizer_state.pt`."""
    if not src.holds_optimizer_state:
        raise InputError(f"{key}: {src.root} is a {src.format} checkpoint that holds no optimizer state scalegrow "
                         f"reads; point it at the DeepSpeed checkpoints of the run that trained it (its "
                         f"output.dir/checkpoints), or at a `scalegrow grow --optimizer-state` output")


def require_entrywise(op: Operator, key: str, method: str) -> None:
    """The moment map is exact only for copy-and-split operators (`Operator.entrywise`)."""
    if not op.entrywise:
        raise InputError(f"{key}: {method}'s operator mixes source entries, and Adam's moments grow exactly only "
                         f"through copies and splits (lemon, hypercloning, stack, ...)")

r"""Per-atom attributions of a trained model's prediction, and how faithful they are.

One call, many methods (Captum-style: one :func:`attribute` per method name, baselines stated)::

    from abp_core.explain import attribute, faithfulness
    a = attribute(model, batch, method="rollout", target=0)   # [num_atoms], >= 0, sums to 1 per molecule
    f = faithfulness(model, batch, a)                         # deletion curves vs random orders
    print(f.to_frame().relative_area.mean())                  # > 1: better than a random order

Every method works on the **readout input** :math:`H = (h_1, \dots, h_n)` (the backbone's per-atom
features), so all readouts are explained at the same place and the backbone runs once, without gradients.
With :math:`y(H)` the model's output ``target`` for one molecule:

``"weights"`` (WA, OWA, ABP)
    The readout's own weights: the WA/OWA softmax, or ABP's PMA attention averaged over heads and seeds
    (:meth:`AtomisticModel.atom_weights`). For ABP these are nearly uniform: the encoder SABs mix every
    atom into every other first, so the PMA weights say which *mixed* rows are read, not which atoms.
``"rollout"`` (ABP)
    Attention rollout (Abnar and Zuidema, 2020) from the PMA back through the encoder:
    :math:`R = P \, \tilde A_L \cdots \tilde A_1` with :math:`P` the PMA attention ``[k, n]`` and
    :math:`\tilde A_l = (A_l + I)/2` the residual-corrected attention of encoder SAB :math:`l`, heads
    averaged (last block first); the atom's attribution is :math:`R` averaged over the ``k`` seeds.
    For ISAB encoders :math:`A_l = A^{(2)}_l A^{(1)}_l` goes through the induced points. ``head=`` /
    ``seed=`` select one PMA head / one seed instead of the average.
``"gradient"``
    :math:`\lVert \partial y / \partial h_i \rVert_2` (Captum ``Saliency``).
``"input_x_gradient"``
    :math:`|\sum_c h_{ic} \, \partial y / \partial h_{ic}|` (Captum ``InputXGradient``, summed over features).
``"integrated_gradients"``
    :math:`|\sum_c \mathrm{IG}_{ic}|` with a **zero baseline** at the readout input,
    ``n_steps=50`` Gauss-Legendre steps by default (Captum ``IntegratedGradients``); the unsigned sum over
    atoms equals :math:`y(H) - y(0)` up to the quadrature error.
``"occlusion"``
    :math:`|y(H) - y(H \setminus h_i)|`: atom ``i`` is *removed from the set* (not zeroed: a zeroed row
    would still take part in a softmax). Exact for every readout, since a readout is a set function.

Every attribution is then made non-negative and divided by its molecule's total, so it sums to 1 within
each molecule (a molecule whose total is 0, e.g. a single atom under occlusion, gets uniform weights).
All methods explain a whole batch at once, in eval mode, on the batch's device, and leave the model's
parameters, their ``.grad`` and its train/eval mode as they were. The gradient methods run one batched
backward (molecules are independent in every readout); occlusion loops over atom positions, not molecules.

:func:`faithfulness` removes atoms at the readout input in the attribution's order, most important first,
and records :math:`|y - y_k|` after ``k`` removals (the deletion curve); its area, against the areas of
random orders of the same molecule, says whether the prediction really depends on the atoms the
attribution points at (an orbital-like map that does not drive the prediction scores ~1).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor
from torch_geometric.utils import to_dense_batch

from .readouts import (AttentionPooling, InducedSetAttentionBlock, MultiheadAttentionBlock, Readout,
                       WeightedAveragePooling)

__all__ = [
    "METHODS",
    "GRADIENT_METHODS",
    "attribute",
    "explanation",
    "supported_methods",
    "default_method",
    "check_method",
    "readout_kind",
    "attention_rollout",
    "DeletionCurves",
    "faithfulness",
]

#: Every method :func:`attribute` knows, in the order tables show them.
METHODS = ("weights", "rollout", "gradient", "input_x_gradient", "integrated_gradients", "occlusion")
GRADIENT_METHODS = ("gradient", "input_x_gradient", "integrated_gradients")
#: Default Gauss-Legendre steps of ``"integrated_gradients"``.
IG_STEPS = 50

# The default shown per readout. ABP's default is the method the committed evidence
# (results/explain/) finds both most orbital-like and most faithful; see default_method().
# Sum and mean: dy/dh_i is the same vector for every atom (y = head(sum_i h_i)), so "gradient" is uniform
# by construction; occlusion is their exact leave-one-out.
_DEFAULTS = {"abp": "rollout", "wa": "weights", "owa": "weights", "sum": "occlusion", "mean": "occlusion",
             "max": "occlusion"}


def readout_kind(model_or_readout) -> str:
    """``"abp"``, ``"owa"``, ``"wa"``, ``"sum"``, ``"mean"``, ``"max"`` (or the class name) of a model's readout."""
    from .readouts import READOUTS

    readout = getattr(model_or_readout, "readout", model_or_readout)
    for name, cls in READOUTS.items():
        if type(readout) is cls:
            return name
    return type(readout).__name__


def supported_methods(model) -> List[str]:
    """The methods :func:`attribute` accepts for this model's readout."""
    readout = getattr(model, "readout", model)
    out = []
    if isinstance(readout, (WeightedAveragePooling, AttentionPooling)):
        out.append("weights")
    if isinstance(readout, AttentionPooling):
        out.append("rollout")
    return out + list(GRADIENT_METHODS) + ["occlusion"]


def default_method(readout: str) -> str:
    """The attribution shown by default for a readout name (``"abp"`` -> ``"rollout"``, ``"wa"``/``"owa"`` ->
    ``"weights"``, sum/mean/max -> ``"occlusion"``)."""
    try:
        return _DEFAULTS[readout.lower()]
    except KeyError:
        raise ValueError(f"unknown readout {readout!r}; choose one of {sorted(_DEFAULTS)}") from None


def check_method(method: str, readout: Optional[str] = None) -> str:
    """``method`` if it is known (and, given a readout name, available for it), else a ``ValueError`` naming the
    choices (for notebook and command-line parameters, before anything is trained)."""
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {list(METHODS)}")
    if readout is not None:
        allowed = [m for m in METHODS if m not in ("weights", "rollout")]
        if readout.lower() in ("wa", "owa", "abp"):
            allowed.insert(0, "weights")
        if readout.lower() == "abp":
            allowed.insert(1, "rollout")
        if method not in allowed:
            raise ValueError(f"method {method!r} is not available for the {readout} readout; choose one of {allowed}")
    return method


# ------------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _readout_input(model, batch):
    """Backbone features ``h [N, C]`` (no gradients), batch vector and number of molecules."""
    if getattr(batch, "z", None) is None or batch.z.numel() == 0:
        raise ValueError("attribute() got an empty batch (no atoms)")
    with torch.no_grad():
        h, vec = model.atom_features(batch)
    num_molecules = int(vec[-1]) + 1
    return h.detach(), vec, num_molecules


def _output_fn(model, batch: Tensor, num_molecules: int, target: int) -> Callable[[Tensor], Tensor]:
    """``y(h) [R * M]`` for ``h`` holding ``R`` stacked copies of the batch's atoms (Captum stacks them)."""
    n = batch.numel()

    def forward(h: Tensor) -> Tensor:
        reps = h.size(0) // n
        vec = batch if reps == 1 else (batch.repeat(reps) + num_molecules *
                                       torch.arange(reps, device=batch.device).repeat_interleave(n))
        return model.head(model.readout(h, vec, dim_size=reps * num_molecules))[:, target]

    return forward


def _normalise(values: Tensor, batch: Tensor, num_molecules: int) -> Tensor:
    """Clamp to >= 0 and divide by each molecule's total (uniform where the total is 0)."""
    values = values.detach().clamp(min=0).to(torch.float32)
    totals = torch.zeros(num_molecules, dtype=values.dtype, device=values.device).index_add_(0, batch, values)
    counts = torch.bincount(batch, minlength=num_molecules).to(values.dtype)
    t = totals[batch]
    return torch.where(t > 0, values / t.clamp(min=torch.finfo(values.dtype).tiny), 1.0 / counts[batch])


def _local_index(batch: Tensor, num_molecules: int) -> Tensor:
    """Position of each atom within its molecule (0-based)."""
    counts = torch.bincount(batch, minlength=num_molecules)
    start = torch.cumsum(counts, 0) - counts
    return torch.arange(batch.numel(), device=batch.device) - start[batch]


def _check_target(model, h: Tensor, vec: Tensor, num_molecules: int, target) -> int:
    if isinstance(target, bool) or not isinstance(target, (int, np.integer)):
        raise ValueError(f"target must be an integer output index, got {target!r}")
    with torch.no_grad():
        num_targets = model.head(model.readout(h, vec, dim_size=num_molecules)).size(1)
    if not 0 <= int(target) < num_targets:
        raise ValueError(f"target {target} is out of range: the model has {num_targets} output(s), "
                         f"choose 0..{num_targets - 1}")
    return int(target)


# ------------------------------------------------------------------------------------------------------
# attention rollout
# ------------------------------------------------------------------------------------------------------
def attention_rollout(readout: AttentionPooling, h: Tensor, batch: Tensor, num_molecules: int, *,
                      head: Optional[int] = None, seed: Optional[int] = None) -> Tensor:
    r"""Raw rollout ``[num_atoms]`` of an ABP readout on readout inputs ``h`` (see the module docstring).

    Runs the readout's encoder on padded sets (``[M, n_max, C]`` with key masks: the same numbers as the
    packed training path), collecting each block's attention. ``head``/``seed`` pick one PMA head/seed.
    """
    if not isinstance(readout, AttentionPooling):
        raise ValueError(f"rollout needs an ABP readout, got {type(readout).__name__}")
    if head is not None and not 0 <= head < readout.heads:
        raise ValueError(f"head {head} is out of range: the PMA has {readout.heads} heads")
    if seed is not None and not 0 <= seed < readout.num_seeds:
        raise ValueError(f"seed {seed} is out of range: the PMA has {readout.num_seeds} seeds")
    x, mask = to_dense_batch(h, batch, batch_size=num_molecules)  # [M, n, C], [M, n]
    n = x.size(1)
    eye = torch.eye(n, dtype=x.dtype, device=x.device)
    if readout.input_lin is not None:
        x = torch.relu(readout.input_lin(x))
    mixes = []
    for block in readout.encoders:
        if isinstance(block, MultiheadAttentionBlock):
            a = block.attention_weights(x, x, y_mask=mask).mean(dim=1)  # [M, n, n]
            x = block(x, x, x_mask=mask, y_mask=mask)
        elif isinstance(block, InducedSetAttentionBlock):
            induced = block.induced.expand(x.size(0), -1, -1)
            a1 = block.mab1.attention_weights(induced, x, y_mask=mask).mean(dim=1)  # [M, m, n]
            hidden = block.mab1(induced, x, y_mask=mask)
            a2 = block.mab2.attention_weights(x, hidden).mean(dim=1)  # [M, n, m]
            a = a2 @ a1
            x = block.mab2(x, hidden, x_mask=mask)
        else:  # pragma: no cover - no other encoder block exists
            raise ValueError(f"rollout does not know encoder block {type(block).__name__}")
        mixes.append((a + eye) / 2)
    keys = torch.relu(readout.pma_lin(x))
    seeds = readout.seeds.expand(x.size(0), -1, -1)
    p = readout.pma.attention_weights(seeds, keys, y_mask=mask)  # [M, H, k, n]
    p = p.mean(dim=1) if head is None else p[:, head]
    p = p.mean(dim=1, keepdim=True) if seed is None else p[:, seed:seed + 1]  # [M, 1, n]
    for mix in reversed(mixes):  # last encoder block first
        p = p @ mix
    return p[:, 0][mask]


# ------------------------------------------------------------------------------------------------------
# the one entry point
# ------------------------------------------------------------------------------------------------------
def _captum(method: str, forward: Callable, h: Tensor, **options) -> Tensor:
    from captum.attr import InputXGradient, IntegratedGradients, Saliency

    with torch.enable_grad():
        inputs = h.clone().requires_grad_(True)
        if method == "gradient":
            g = Saliency(forward).attribute(inputs, abs=True)
            return g.norm(dim=1)
        if method == "input_x_gradient":
            return InputXGradient(forward).attribute(inputs).sum(dim=1).abs()
        steps = int(options.get("n_steps", IG_STEPS))
        if steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {steps}")
        ig = IntegratedGradients(forward).attribute(
            inputs, baselines=torch.zeros_like(inputs), n_steps=steps, method="gausslegendre",
            internal_batch_size=options.get("internal_batch_size"))
        return ig.sum(dim=1).abs()


def _occlusion(model, forward: Callable, h: Tensor, batch: Tensor, num_molecules: int, target: int) -> Tensor:
    local = _local_index(batch, num_molecules)
    counts = torch.bincount(batch, minlength=num_molecules)
    with torch.no_grad():
        y = forward(h)
        out = torch.zeros(h.size(0), dtype=y.dtype, device=h.device)
        for p in range(int(counts.max())):
            # remove the p-th atom of every molecule that has more than one atom and a p-th atom
            drop = (local == p) & (counts[batch] > 1)
            if not bool(drop.any()):
                continue
            keep = ~drop
            y_p = model.head(model.readout(h[keep], batch[keep], dim_size=num_molecules))[:, target]
            out[drop] = (y - y_p).abs()[batch[drop]]
    return out


def attribute(model, batch, method: str = "rollout", target: int = 0, **options) -> Tensor:
    """Per-atom attribution ``[num_atoms]`` (>= 0, summing to 1 within each molecule, batch atom order).

    Args:
        model: an :class:`abp_core.models.AtomisticModel` (a Lightning task is unwrapped to its ``model``).
        batch: a PyG batch with ``z``, ``pos`` (and ``batch``).
        method: one of :data:`METHODS` (see the module docstring); :func:`supported_methods` lists those the
            model's readout supports.
        target: output index explained (gradient methods and occlusion; checked for every method).
        **options: ``head``/``seed`` (rollout: one PMA head / seed instead of the average);
            ``n_steps`` (integrated gradients, default 50), ``internal_batch_size`` (integrated gradients).

    Raises:
        ValueError: unknown method, a method the readout does not support, target out of range, empty batch,
            unknown options.
    """
    model = getattr(model, "model", model)
    if not isinstance(getattr(model, "readout", None), Readout):
        raise ValueError(f"attribute() needs an AtomisticModel (backbone, readout, head), got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {list(METHODS)}")
    allowed = supported_methods(model)
    if method not in allowed:
        raise ValueError(f"method {method!r} is not available for the {readout_kind(model)} readout; "
                         f"choose one of {allowed}")
    valid = {"rollout": {"head", "seed"}, "integrated_gradients": {"n_steps", "internal_batch_size"}}.get(method, set())
    unknown = sorted(set(options) - valid)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}" +
                         (f"; it takes {sorted(valid)}" if valid else "; it takes none"))
    with _eval_mode(model):
        h, vec, m = _readout_input(model, batch)
        target = _check_target(model, h, vec, m, target)
        if method == "weights":
            with torch.no_grad():
                raw = model.readout.atom_weights(h, vec)
        elif method == "rollout":
            with torch.no_grad():
                raw = attention_rollout(model.readout, h, vec, m, **options)
        else:
            forward = _output_fn(model, vec, m, target)
            raw = (_occlusion(model, forward, h, vec, m, target) if method == "occlusion"
                   else _captum(method, forward, h, **options))
    return _normalise(raw, vec, m)


def explanation(model, batch, method: str = "rollout", target: int = 0, **options):
    """:func:`attribute` as a PyG :class:`torch_geometric.explain.Explanation` (``node_mask [num_atoms, 1]``)."""
    from torch_geometric.explain import Explanation

    mask = attribute(model, batch, method, target, **options)
    return Explanation(node_mask=mask.unsqueeze(-1), z=batch.z, pos=batch.pos, batch=batch.batch,
                       method=method, target_index=torch.tensor(target))


# ------------------------------------------------------------------------------------------------------
# faithfulness
# ------------------------------------------------------------------------------------------------------
@dataclass
class DeletionCurves:
    r"""Deletion curves of one attribution and of random orders, per molecule.

    ``curve[m, k-1]`` is :math:`|y - y_k|` after removing the ``k`` atoms ranked first (``k = 1 .. n-1``; the
    last atom is never removed, so no set is empty; NaN beyond a molecule's ``n-1``), in the model's output
    units (a task's standardised units for a Lightning task's model). ``area`` is the mean of a molecule's
    curve (its area over ``k/n``); ``random_area[r, m]`` the same for random order ``r``.
    """

    n_atoms: Tensor          # [M]
    curve: Tensor            # [M, n_max - 1]
    random_curve: Tensor     # [R, M, n_max - 1]
    area: Tensor             # [M]
    random_area: Tensor      # [R, M]

    @property
    def relative_area(self) -> Tensor:
        """``area / mean(random areas)`` per molecule: > 1 means the attribution's order moves the prediction
        more than a random order does (NaN for single-atom molecules or a flat model)."""
        base = self.random_area.mean(dim=0)
        return torch.where(base > 0, self.area / base, torch.full_like(base, float("nan")))

    @property
    def p_value(self) -> Tensor:
        """One-sided permutation p-value per molecule: ``(1 + #{random area >= area}) / (1 + R)``."""
        r = self.random_area.size(0)
        p = (1 + (self.random_area >= self.area.unsqueeze(0)).sum(0)).to(torch.float64) / (1 + r)
        return torch.where(torch.isnan(self.area), torch.full_like(p, float("nan")), p)

    def to_frame(self, mol_ids: Optional[Sequence] = None):
        """One row per molecule: ``molecule, n_atoms, deletion_area, random_area, relative_area, p_value``."""
        import pandas as pd

        m = self.area.numel()
        return pd.DataFrame({
            "molecule": list(mol_ids) if mol_ids is not None else list(range(m)),
            "n_atoms": self.n_atoms.cpu().numpy(),
            "deletion_area": self.area.double().cpu().numpy(),
            "random_area": self.random_area.mean(0).double().cpu().numpy(),
            "relative_area": self.relative_area.double().cpu().numpy(),
            "p_value": self.p_value.cpu().numpy(),
        })


def _ranks(scores: Tensor, batch: Tensor, num_molecules: int, generator: torch.Generator) -> Tensor:
    """Rank of each atom within its molecule by descending score (0 = first removed).

    Exact ties are broken at random: a constant attribution must not get credit for the dataset's atom order
    (QM9 lists heavy atoms before hydrogens)."""
    idx = torch.randperm(scores.numel(), generator=generator).to(scores.device)
    idx = idx[torch.sort(-scores[idx].to(torch.float64), stable=True).indices]
    idx = idx[torch.sort(batch[idx], stable=True).indices]
    rank = torch.empty_like(batch)
    rank[idx] = torch.arange(batch.numel(), device=batch.device)
    counts = torch.bincount(batch, minlength=num_molecules)
    return rank - (torch.cumsum(counts, 0) - counts)[batch]


def faithfulness(model, batch, attribution: Tensor, target: int = 0, *, n_random: int = 20,
                 seed: int = 0) -> DeletionCurves:
    """Deletion curves of ``attribution`` and of ``n_random`` random orders (see :class:`DeletionCurves`).

    Atoms are removed from the set at the readout input, most attributed first; all orders of all molecules
    run together, one readout call per deletion step ``k``.
    """
    model = getattr(model, "model", model)
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1, got {n_random}")
    with _eval_mode(model):
        h, vec, m = _readout_input(model, batch)
        target = _check_target(model, h, vec, m, target)
        attribution = torch.as_tensor(attribution, device=h.device)
        if attribution.shape != (h.size(0),):
            raise ValueError(f"attribution must have one value per atom ({h.size(0)}), got {tuple(attribution.shape)}")
        if not bool(torch.isfinite(attribution).all()):
            raise ValueError("attribution contains NaN/inf")
        gen = torch.Generator(device="cpu").manual_seed(seed)
        orders = [attribution] + [torch.zeros(h.size(0), device=h.device)] * n_random  # all ties: random orders
        ranks = torch.cat([_ranks(o, vec, m, gen) for o in orders])      # [(R+1) N]
        reps = len(orders)
        forward = _output_fn(model, vec, m, target)
        h_all = h.repeat(reps, 1)
        vec_all = vec.repeat(reps) + m * torch.arange(reps, device=h.device).repeat_interleave(h.size(0))
        counts = torch.bincount(vec, minlength=m)
        n_all = counts.repeat(reps)[vec_all]
        n_max = int(counts.max())
        curves = torch.full((reps * m, max(n_max - 1, 0)), float("nan"), dtype=torch.float64, device=h.device)
        with torch.no_grad():
            y = forward(h).double().repeat(reps)
            for k in range(1, n_max):
                keep = ranks >= torch.clamp(n_all - 1, max=k)
                y_k = model.head(model.readout(h_all[keep], vec_all[keep], dim_size=reps * m))[:, target].double()
                valid = counts.repeat(reps) > k
                curves[valid, k - 1] = (y - y_k).abs()[valid]
    curves = curves.view(reps, m, -1)
    area = torch.nanmean(curves, dim=2) if curves.size(2) else torch.full((reps, m), float("nan"), dtype=torch.float64)
    return DeletionCurves(n_atoms=counts.cpu(), curve=curves[0].cpu(), random_curve=curves[1:].cpu(),
                          area=area[0].cpu(), random_area=area[1:].cpu())

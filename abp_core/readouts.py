r"""Readouts (pooling functions) that turn per-atom features into molecule features.

All six share one interface and are :class:`torch_geometric.nn.aggr.Aggregation`
subclasses, so each drops into any PyG model or pooling call that accepts one::

    out = readout(x, batch)            # [num_molecules, out_channels]
    w = readout.atom_weights(x, batch) # [num_atoms], WA / OWA / ABP only

``batch`` must be sorted (PyG's mini-batches are). Padding used internally by
:class:`AttentionPooling` is masked everywhere, so a molecule's output does not
depend on which other molecules share its batch.
"""
from __future__ import annotations

import contextlib
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import LayerNorm, Linear, Parameter
from torch_geometric.nn.aggr import Aggregation
from torch_geometric.utils import softmax

from . import kernels, native_readout
from .graph import check_batch_vector

__all__ = [
    "packed_self_attention",
    "Readout",
    "SumPooling",
    "MeanPooling",
    "MaxPooling",
    "WeightedAveragePooling",
    "OrbitalWeightedAveragePooling",
    "AttentionPooling",
    "MultiheadAttentionBlock",
    "InducedSetAttentionBlock",
    "SetLayout",
    "SET_ATTENTION_PATHS",
    "set_attention_path",
    "forced_set_attention_path",
    "padded_self_attention",
    "READOUTS",
    "READOUT_LABELS",
    "build_readout",
]


class Readout(Aggregation):
    """Base class: input validation and the common ``forward(x, batch)`` signature.

    Subclasses implement :meth:`pool` (and, when weighted, :meth:`atom_weights`).
    """

    weighted: bool = False

    def __init__(self, in_channels: int, out_channels: Optional[int] = None):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels if out_channels is not None else in_channels

    def _check_features(self, x: Tensor) -> None:
        if x.dim() != 2:
            raise ValueError(f"{type(self).__name__} expects per-atom features of shape "
                             f"[num_atoms, {self.in_channels}], got {tuple(x.shape)}")
        if x.size(0) == 0:
            raise ValueError(f"{type(self).__name__} got an empty batch (no atoms)")
        if x.size(1) != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects feature width {self.in_channels}, "
                             f"got {x.size(1)}")

    def _check(self, x: Tensor, index: Optional[Tensor], dim_size: Optional[int]) -> Tuple[Tensor, int]:
        self._check_features(x)
        if index is None:
            index = x.new_zeros(x.size(0), dtype=torch.long)
        check_batch_vector(index, x.size(0))
        num = int(index[-1]) + 1
        if dim_size is None:
            dim_size = num
        elif dim_size < num:
            raise ValueError(f"dim_size={dim_size} is smaller than the number of molecules ({num})")
        return index.long(), dim_size

    def forward(self, x: Tensor, index: Optional[Tensor] = None, ptr: Optional[Tensor] = None,
                dim_size: Optional[int] = None, dim: int = -2,
                max_num_elements: Optional[int] = None) -> Tensor:
        if dim not in (0, -2):
            raise ValueError(f"{type(self).__name__} pools over dimension 0, got dim={dim}")
        index, dim_size = self._check(x, index, dim_size)
        return self.pool(x, index, dim_size)

    def pool(self, x: Tensor, batch: Tensor, dim_size: int) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def atom_weights(self, x: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        """Per-atom weights (non-negative, summing to 1 within each molecule)."""
        raise TypeError(f"{type(self).__name__} is not a weighted readout and has no atom weights")

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}"

    def __repr__(self) -> str:  # Aggregation overrides nn.Module.__repr__; restore it
        return torch.nn.Module.__repr__(self)


class SumPooling(Readout):
    r""":math:`h_m = \sum_{i \in m} x_i` (SchNet's and DimeNet++'s default)."""

    def pool(self, x, batch, dim_size):
        return self.reduce(x, batch, dim_size=dim_size, reduce="sum")


class MeanPooling(Readout):
    r""":math:`h_m = \frac{1}{n_m} \sum_{i \in m} x_i`."""

    def pool(self, x, batch, dim_size):
        return self.reduce(x, batch, dim_size=dim_size, reduce="mean")


class MaxPooling(Readout):
    r""":math:`h_m = \max_{i \in m} x_i` (element-wise)."""

    def pool(self, x, batch, dim_size):
        return self.reduce(x, batch, dim_size=dim_size, reduce="max")


def _mlp(in_channels: int, hidden: int, out_channels: int, bias: bool = True) -> torch.nn.Sequential:
    return torch.nn.Sequential(Linear(in_channels, hidden), torch.nn.SiLU(), Linear(hidden, out_channels, bias=bias))


def _reset_mlp(mlp: torch.nn.Module) -> None:
    for m in mlp.modules():
        if isinstance(m, Linear):
            m.reset_parameters()


class WeightedAveragePooling(Readout):
    r"""Weighted average (WA) pooling (Chen et al.; paper Eq. 12).

    .. math::
        w_i = \operatorname{softmax}_{i \in m}\big(\mathrm{MLP}_w(x_i)\big), \qquad
        h_m = \sum_{i \in m} w_i \, \mathrm{MLP}_v(x_i)

    Chen et al. use a scalar value per atom; here the value MLP emits
    ``out_channels`` features (default ``in_channels``) so that WA feeds the same
    head as every other readout.

    Args:
        in_channels: per-atom feature width.
        out_channels: molecule feature width (default ``in_channels``).
        hidden_channels: hidden width of both MLPs (default ``in_channels // 2``).
    """

    weighted = True

    def __init__(self, in_channels: int, out_channels: Optional[int] = None,
                 hidden_channels: Optional[int] = None):
        super().__init__(in_channels, out_channels)
        hidden = hidden_channels or max(in_channels // 2, 1)
        # No bias on the logit: softmax is shift-invariant, so it would never learn.
        self.weight_mlp = _mlp(in_channels, hidden, 1, bias=False)
        self.value_mlp = _mlp(in_channels, hidden, self.out_channels)

    def reset_parameters(self):
        _reset_mlp(self.weight_mlp)
        _reset_mlp(self.value_mlp)

    def _weights(self, x: Tensor, batch: Tensor, dim_size: int) -> Tensor:
        logits = self.weight_mlp(x).squeeze(-1)
        return softmax(logits, batch, num_nodes=dim_size)

    def pool(self, x, batch, dim_size):
        w = self._weights(x, batch, dim_size)
        return self.reduce(w.unsqueeze(-1) * self.value_mlp(x), batch, dim_size=dim_size, reduce="sum")

    def atom_weights(self, x: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        batch, dim_size = self._check(x, batch, None)
        return self._weights(x, batch, dim_size)


class OrbitalWeightedAveragePooling(WeightedAveragePooling):
    r"""Orbital weighted average (OWA) pooling (Chen et al.; paper Eq. 13).

    WA pooling whose weights are pulled towards given per-atom orbital
    coefficients :math:`l_i` (e.g. HOMO shares) by an auxiliary loss

    .. math::
        \mathcal{L}_{\mathrm{orb}} = \beta \, \frac{1}{M} \sum_{m} \sum_{i \in m} (l_i - w_i)^2,

    which the trainer adds to the target loss (:meth:`orbital_loss`).

    Args:
        beta: weight of the auxiliary loss (default ``1.0``; the released code uses
            ``0.1 * MSE(y) + MSE(coeff, w)``, i.e. ``beta = 10`` relative to the target loss).
        coefficient_key: name of the per-atom coefficients on the batch
            (default ``"homo_coeff"``).
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None,
                 hidden_channels: Optional[int] = None, beta: float = 1.0,
                 coefficient_key: str = "homo_coeff"):
        super().__init__(in_channels, out_channels, hidden_channels)
        if beta < 0:
            raise ValueError(f"beta must be non-negative, got {beta}")
        self.beta = float(beta)
        self.coefficient_key = coefficient_key

    def orbital_loss(self, weights: Tensor, coefficients: Tensor, batch: Tensor) -> Tensor:
        """``beta`` times the per-molecule summed squared error between weights and coefficients."""
        if coefficients.shape != weights.shape:
            raise ValueError(f"orbital coefficients have shape {tuple(coefficients.shape)}, "
                             f"weights {tuple(weights.shape)}: one coefficient per atom is needed")
        if not bool(torch.isfinite(coefficients).all()):
            raise ValueError("orbital coefficients contain NaN/inf (failed orbital calculation?)")
        num_molecules = int(batch[-1]) + 1
        per_molecule = self.reduce((coefficients.to(weights.dtype) - weights).pow(2).unsqueeze(-1),
                                   batch, dim_size=num_molecules, reduce="sum")
        return self.beta * per_molecule.mean()

    def extra_repr(self) -> str:
        return super().extra_repr() + f", beta={self.beta}, coefficient_key={self.coefficient_key!r}"


class SetLayout:
    """How a mini-batch's atoms are laid out for ABP's set attention: one of three paths.

    The path (:func:`set_attention_path`, the one place that chooses) decides the order of the
    packed atoms and how attention runs:

    * ``"native"`` (CPU, float32, native kernels): atoms stay in the batch's order; self-attention
      is one native-kernel call per group of a few thousand rows, with a per-molecule table
      (first row, size) built once per forward from the batch vector.
    * ``"padded"`` (CUDA and other non-CPU devices): atoms stay in the batch's order; self-attention is one call of
      :func:`torch.nn.functional.scaled_dot_product_attention` on ``[M', n_max]`` padded sets with a
      key mask (padded queries are computed and dropped, padded keys get zero weight).
    * ``"blocks"`` (CPU fallback: float64, bf16 autocast, dropout, head dimensions the native kernel
      lacks): molecules sorted by size (stably), their atoms packed in that order, so that every run
      of equal-size molecules is one contiguous block of rows, a zero-copy ``[B, n, C]`` view;
      attention runs per block (no padding, no masks).

    In every path the linear layers run on all packed atoms at once, and the PMA's per-molecule
    softmax and weighted sums run on ``[M', n_max]`` padded scores (small: ``k * heads`` columns).
    Only the ``"blocks"`` path permutes atoms (once on entry; skipped when the batch is already
    size-sorted) and molecule rows back. Host synchronisations: one per forward (the number of
    non-empty molecules and the largest size, which fix the padded shapes), plus the block plan
    (``counts.tolist()``) in the ``"blocks"`` path.

    Attributes:
        path: ``"native"``, ``"padded"`` or ``"blocks"``.
        num_molecules: molecule slots ``M`` (including empty ones).
        num_present: molecules with at least one atom ``M'``.
        num_atoms: packed rows ``N``.
        n_max: atoms of the largest molecule.
        counts: atoms per molecule ``[M]``.
        molecule_sizes / first_rows: size and first packed row of every present molecule ``[M']``
            (packed order).
        molecules: packed position -> molecule id ``[M']`` (empty molecules excluded).
        atom_order: packed row -> original atom index ``[N]`` (``None`` when identical).
        identity: packed order is the batch's and no molecule is empty (no permutation at all).
        buckets: ``"blocks"`` path only (else ``None``): ``(first_row, first_molecule, B, n)`` per
            block of ``B`` molecules of ``n`` atoms, in sorted order.
        rows / sizes: ``"blocks"`` path only: ``B * n`` per block; size per sorted molecule (lists).
    """

    def __init__(self, batch: Tensor, num_molecules: int, max_ratio: float = 1.0, path: str = "blocks"):
        if path not in SET_ATTENTION_PATHS:
            raise ValueError(f"path must be one of {SET_ATTENTION_PATHS}, got {path!r}")
        device = batch.device
        self.path = path
        self.num_molecules = num_molecules
        self.num_atoms = batch.numel()
        # counts by index_add: no host sync (bincount on CUDA reads the maximum first)
        counts = torch.zeros(num_molecules, dtype=torch.long, device=device).index_add_(
            0, batch, torch.ones_like(batch, dtype=torch.long))
        self.counts = counts
        self._atom_inverse = None
        self._dense_index = None
        self._groups = None
        self._key_mask = None
        if path == "blocks":
            self._plan_blocks(counts, device)
            return
        present = counts > 0
        num_present, n_max = torch.stack([present.sum(), counts.max()]).tolist()  # the one host sync
        self.identity = num_present == num_molecules
        self.n_max = n_max
        self.buckets = self.rows = self.sizes = None
        self.atom_order = None
        starts = torch.cumsum(counts, 0) - counts
        if self.identity:
            self.molecules = torch.arange(num_molecules, device=device)
            self.molecule_sizes, self.first_rows = counts, starts
            self._atom_molecule = batch
        else:  # empty slots: positions among the present molecules
            self.molecules = present.nonzero().squeeze(1)
            self.molecule_sizes, self.first_rows = counts[self.molecules], starts[self.molecules]
            self._atom_molecule = (torch.cumsum(present.long(), 0) - 1)[batch]

    def _plan_blocks(self, counts: Tensor, device) -> None:
        num_molecules = self.num_molecules
        sizes = counts.tolist()  # one host sync per forward, to plan the blocks
        order = sorted((m for m in range(num_molecules) if sizes[m] > 0), key=sizes.__getitem__)
        self.identity = order == list(range(num_molecules))
        self.buckets = []
        row = 0
        for pos, m in enumerate(order):
            n = sizes[m]
            if self.buckets and self.buckets[-1][3] == n:
                r0, m0, b, _ = self.buckets[-1]
                self.buckets[-1] = (r0, m0, b + 1, n)
            else:
                self.buckets.append((row, pos, 1, n))
            row += n
        self.num_atoms = row
        self.n_max = self.buckets[-1][3] if self.buckets else 0
        self.rows = [b * n for _, _, b, n in self.buckets]
        self.sizes = [n for _, _, b, n in self.buckets for _ in range(b)]
        if self.identity:
            self.molecules = torch.arange(num_molecules, device=device)
            self.atom_order = None
        else:
            self.molecules = torch.tensor(order, dtype=torch.long, device=device)
            sorted_counts = counts[self.molecules]
            shift = (torch.cumsum(counts, 0) - counts)[self.molecules] - (torch.cumsum(sorted_counts, 0) - sorted_counts)
            self.atom_order = torch.arange(row, device=device) + torch.repeat_interleave(shift, sorted_counts)
        self.molecule_sizes = torch.tensor(self.sizes, dtype=torch.long, device=device)
        self.first_rows = torch.cumsum(self.molecule_sizes, 0) - self.molecule_sizes
        self._atom_molecule = None  # built on demand (pad)

    @property
    def num_present(self) -> int:
        """Molecules with at least one atom (``M'``)."""
        return int(self.molecules.numel())

    def to_sorted(self, x: Tensor) -> Tensor:
        """Packed rows in batch order -> packed order (the identity except in the ``"blocks"`` path)."""
        return x if self.atom_order is None else x.index_select(0, self.atom_order)

    def atoms_to_batch_order(self, x: Tensor) -> Tensor:
        """Packed rows in packed order -> batch order."""
        if self.atom_order is None:
            return x
        if self._atom_inverse is None:
            self._atom_inverse = torch.argsort(self.atom_order)
        return x.index_select(0, self._atom_inverse)

    def molecules_to_batch_order(self, rows: Tensor, fill: Optional[Tensor] = None) -> Tensor:
        """Per-molecule rows ``[M', ...]`` in packed order -> ``[M, ...]`` in molecule order.

        Empty molecule slots get ``fill`` (broadcast) or zeros.
        """
        if self.identity:
            return rows
        out = rows.new_zeros((self.num_molecules,) + tuple(rows.shape[1:]))
        if fill is not None:
            out = out + fill
        return out.index_copy(0, self.molecules, rows)

    def dense_index(self) -> Tensor:
        """Row of every packed atom in the flattened ``[M' * n_max]`` padded layout (cached)."""
        if self._dense_index is None:
            device = self.counts.device
            if self._atom_molecule is None:
                self._atom_molecule = torch.repeat_interleave(torch.arange(self.num_present, device=device),
                                                              self.molecule_sizes)
            mol = self._atom_molecule
            local = torch.arange(self.num_atoms, device=device) - self.first_rows[mol]
            self._dense_index = mol * self.n_max + local
        return self._dense_index

    def key_mask(self) -> Tensor:
        """``[M', n_max]`` boolean mask of the padded layout (True = atom; cached)."""
        if self._key_mask is None:
            self._key_mask = torch.arange(self.n_max, device=self.counts.device) < self.molecule_sizes.unsqueeze(1)
        return self._key_mask

    def pad(self, packed: Tensor, value: float) -> Tensor:
        """Packed rows ``[N, F]`` -> padded ``[M', n_max, F]`` (padding filled with ``value``)."""
        if self.num_atoms == self.num_present * self.n_max:
            return packed.view(self.num_present, self.n_max, -1)  # all molecules the same size: a view
        out = packed.new_full((self.num_present * self.n_max, packed.size(1)), value)
        return out.index_copy(0, self.dense_index(), packed).view(self.num_present, self.n_max, -1)

    def unpad(self, dense: Tensor) -> Tensor:
        """Padded ``[M', n_max, F]`` -> packed rows ``[N, F]`` (the inverse of :meth:`pad`)."""
        flat = dense.reshape(self.num_present * self.n_max, -1)
        if self.num_atoms == flat.size(0):
            return flat
        return flat.index_select(0, self.dense_index())

    def blocks(self, packed: Tensor):
        """Yield ``(block [B, n, C], (first_row, first_molecule, B, n))`` views of sorted packed rows
        (``"blocks"`` path)."""
        for chunk, bucket in zip(packed.split(self.rows), self.buckets):
            yield chunk.view(bucket[2], bucket[3], -1), bucket

    def row_groups(self):
        """Consecutive molecules grouped into row ranges for the fused SAB (cached):
        ``[(first_row, end_row, blocks, table)]``; ``"blocks"`` path: the group's blocks with rows
        relative to ``first_row`` and no table, else the native kernel's molecule table (first rows
        relative to ``first_row``, sizes; CPU int64) and no blocks."""
        if self._groups is None:
            if self.path == "blocks":
                self._groups = [(r0, r1, blocks, None) for r0, r1, blocks in _row_groups(self.buckets)]
            else:
                self._groups = _table_groups(self.first_rows.cpu(), self.molecule_sizes.cpu(), self.num_atoms)
        return self._groups


def _table_groups(starts: Tensor, sizes: Tensor, total: int, min_rows: Optional[int] = None, parts: int = 8):
    """Molecules in packed order grouped into row ranges of about ``max(min_rows, N / parts)`` rows (as
    :func:`_row_groups`), each with its molecule table relative to its first row."""
    target = max(_GROUP_ROWS if min_rows is None else min_rows, total // parts)
    if total <= target:
        return [(0, total, None, (starts.contiguous(), sizes.contiguous()))]
    ends = (starts + sizes).tolist()
    groups, first, r0 = [], 0, 0
    for m, end in enumerate(ends):
        if end - r0 >= target or m == len(ends) - 1:
            groups.append((r0, end, None, ((starts[first:m + 1] - r0).contiguous(), sizes[first:m + 1].contiguous())))
            first, r0 = m + 1, end
    return groups


#: How ABP's set attention can run (see :class:`SetLayout`).
SET_ATTENTION_PATHS = ("native", "padded", "blocks")
_FORCED_PATH: Optional[str] = None


def set_attention_path(x: Tensor, channels: int, heads: int, dropout: float) -> str:
    """The one place that chooses how ABP's set attention runs for per-atom features ``x``.

    * CPU, float32, no autocast, no attention dropout, head dimension 16/32/64 and the native kernels
      built (:func:`abp_core.kernels.supports`): ``"native"``. Measured fastest on CPU
      (``benchmarks/readout.py``, ``benchmarks/epoch.py``).
    * other CPU cases: ``"blocks"`` (PyTorch's CPU flash attention per block of equal-size molecules:
      no padding; ``benchmarks/readout.py``'s "PyTorch flash attention" row).
    * CUDA and other devices: ``"padded"``: one fused attention call for the whole batch
      (:func:`torch.nn.functional.scaled_dot_product_attention` with a key mask; on CUDA its
      memory-efficient kernel), no per-block Python loop. Chosen by design, not measured here
      (no GPU on the development machine).

    :func:`forced_set_attention_path` overrides the choice (tests, benchmarks).
    """
    if _FORCED_PATH is not None:
        return _FORCED_PATH
    if x.device.type != "cpu":
        return "padded"
    if (dropout == 0.0 and x.dtype == torch.float32 and not torch.is_autocast_enabled("cpu")
            and kernels.supports(x.device, x.dtype, channels, heads)):
        return "native"
    return "blocks"


@contextlib.contextmanager
def forced_set_attention_path(path: str):
    """Run ABP's set attention on ``path`` (``"native"``, ``"padded"`` or ``"blocks"``) inside this block,
    whatever :func:`set_attention_path` would choose (``"native"`` still needs its conditions)."""
    global _FORCED_PATH
    if path not in SET_ATTENTION_PATHS:
        raise ValueError(f"path must be one of {SET_ATTENTION_PATHS}, got {path!r}")
    previous, _FORCED_PATH = _FORCED_PATH, path
    try:
        yield
    finally:
        _FORCED_PATH = previous


def _cpu_flash_available(t: Tensor, dropout_p: float) -> bool:
    return (_FLASH_CPU is not None and t.device.type == "cpu" and dropout_p == 0.0
            and t.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16))


try:  # the fused CPU kernels behind F.scaled_dot_product_attention, called per block
    _FLASH_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
    _FLASH_CPU_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default
except (AttributeError, RuntimeError):  # pragma: no cover - older/unusual builds
    _FLASH_CPU = _FLASH_CPU_BACKWARD = None


def _flash_forward(qkv: Tensor, buckets, heads: int, out: Optional[Tensor] = None) -> Tuple[Tensor, list]:
    """Per-block CPU flash attention on packed ``qkv`` ``[N, 3C]``: packed output ``[N, C]`` (into ``out``
    if given) and log-sum-exps."""
    c = qkv.size(1) // 3
    d = c // heads
    outs, lses = [], []
    for r0, _, b, n in buckets:
        blk = qkv[r0:r0 + b * n].view(b, n, 3, heads, d)
        q, k, v = (blk[:, :, i].transpose(1, 2) for i in range(3))
        o, lse = _FLASH_CPU(q, k, v, 0.0, False)
        outs.append(o.transpose(1, 2).reshape(b * n, c))  # a view: the kernel writes [B, n, H, d]
        lses.append(lse)
    if out is not None:
        return torch.cat(outs, out=out), lses
    return (torch.cat(outs) if len(outs) > 1 else outs[0].clone()), lses


def _flash_backward(grad_out: Tensor, qkv: Tensor, out: Tensor, lses, buckets, heads: int,
                    grad: Tensor) -> Tensor:
    """Per-block flash-attention backward, writing ``d qkv`` into ``grad`` (which may be ``qkv`` itself:
    rows are overwritten only after the kernel has consumed them).

    The blocks' gradients are gathered and written with one concatenation per q/k/v every
    ``N / 8`` rows or so: few copy calls (each a parallel region) and little extra memory."""
    c = qkv.size(1) // 3
    d = c // heads
    flush_rows = max(qkv.size(0) // 8, 1)
    pending, start, rows_pending = ([], [], []), 0, 0

    def flush(end):
        for i, acc in enumerate(pending):
            if len(acc) == 1:
                grad[start:end, i * c:(i + 1) * c].copy_(acc[0])
            else:
                torch.cat(acc, out=grad[start:end, i * c:(i + 1) * c])
            acc.clear()

    for (r0, _, b, n), lse in zip(buckets, lses):
        rows = slice(r0, r0 + b * n)
        blk = qkv[rows].view(b, n, 3, heads, d)
        q, k, v = (blk[:, :, i].transpose(1, 2) for i in range(3))
        o = out[rows].view(b, n, heads, d).transpose(1, 2)
        go = grad_out[rows].view(b, n, heads, d).transpose(1, 2)
        for acc, g in zip(pending, _FLASH_CPU_BACKWARD(go, q, k, v, o, lse, 0.0, False)):
            acc.append(g.transpose(1, 2).reshape(b * n, c))  # a view: the kernel writes [B, n, H, d]
        rows_pending += b * n
        if rows_pending >= flush_rows:
            flush(r0 + b * n)
            start, rows_pending = r0 + b * n, 0
    if rows_pending:
        flush(start + rows_pending)
    return grad


def _native(qkv: Tensor, heads: int) -> bool:
    return kernels.supports(qkv.device, qkv.dtype, qkv.size(-1) // 3, heads)


def _attention_forward(qkv: Tensor, blocks, heads: int, out: Optional[Tensor] = None,
                       bias: Optional[Tensor] = None, table=None):
    """Self-attention of packed ``qkv`` ``[N, 3C]`` per molecule -> ``(out [N, C], table, lses)``.

    The native kernel (:mod:`abp_core.kernels`; one call for all molecules, ``table`` its molecule
    table -- given, or built from ``blocks`` --, ``lses`` one ``[N, heads]`` tensor) where it applies
    (CPU, float32, head dimension 16/32/64), else per-block CPU flash attention (``table`` is
    ``None``, one log-sum-exp tensor per block). ``bias`` ``[3C]`` (native kernel only) is added to
    ``qkv`` on the fly."""
    if _native(qkv, heads):
        table = kernels.molecule_table(blocks) if table is None else table
        out, lse = kernels.attention_forward(qkv, table, heads, out, bias)
        return out, table, [lse]
    if blocks is None:
        raise RuntimeError("this layout's attention needs the native kernels (CPU, float32, head dimension "
                           f"16/32/64), which do not apply to {qkv.dtype} [{qkv.size(0)}, {qkv.size(1)}] "
                           f"with {heads} heads; see set_attention_path")
    if bias is not None:
        raise ValueError("a separate q|k|v bias needs the native attention kernel")
    out, lses = _flash_forward(qkv, blocks, heads, out)
    return out, None, lses


def _attention_backward(grad_out: Tensor, qkv: Tensor, out: Tensor, table, lses, blocks, heads: int,
                        grad: Tensor, bias: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """Backward of :func:`_attention_forward` (same ``table``, ``lses`` and ``bias``) into ``grad`` (may be
    ``qkv``): ``(grad, column sums of grad or None)``; the native kernel computes the column sums
    (the bias gradient) on the way."""
    if table is not None:
        return kernels.attention_backward(grad_out, qkv, out, lses[0], table, heads, grad, bias, column_sums=True)
    return _flash_backward(grad_out, qkv, out, lses, blocks, heads, grad), None


class _PackedSelfAttention(torch.autograd.Function):
    """Self-attention within each molecule of size-sorted packed ``qkv`` ``[N, 3C]`` -> ``[N, C]``.

    The native kernel for all blocks at once, or one fused flash-attention call per block of
    equal-size molecules (:func:`_attention_forward`; no mask, no padding), outputs and gradients
    written straight into packed buffers: no per-block autograd graph. Same numbers as
    :func:`torch.nn.functional.scaled_dot_product_attention` (up to fp32 rounding).
    """

    @staticmethod
    def forward(ctx, qkv: Tensor, buckets, heads: int, table=None):
        qkv = qkv.contiguous()
        out, table, lses = _attention_forward(qkv, buckets, heads, table=table)
        ctx.buckets, ctx.heads, ctx.table = buckets, heads, table
        ctx.save_for_backward(qkv, out, *lses)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        qkv, out, *lses = ctx.saved_tensors
        grad = _attention_backward(grad_out.contiguous(), qkv, out, ctx.table, lses, ctx.buckets, ctx.heads,
                                   qkv.new_empty(qkv.shape))[0]
        return grad, None, None, None


_GROUP_ROWS = 4096  # minimum atoms per q|k|v group of the fused SAB


def _row_groups(buckets, min_rows: Optional[int] = None, parts: int = 8):
    """Consecutive blocks grouped into row ranges of about ``max(min_rows, N / parts)`` rows:
    ``[(first_row, end_row, blocks)]`` with block rows relative to ``first_row``."""
    total = sum(b * n for _, _, b, n in buckets)
    target = max(_GROUP_ROWS if min_rows is None else min_rows, total // parts)
    groups, cur, start = [], [], 0
    for r0, m0, b, n in buckets:
        cur.append((r0 - start, m0, b, n))
        if r0 + b * n - start >= target:
            groups.append((start, r0 + b * n, cur))
            cur, start = [], r0 + b * n
    if cur:
        groups.append((start, total, cur))
    return groups


class _FusedSelfAttentionBlock(torch.autograd.Function):
    r"""A whole SAB on packed atoms, ``y = h + ReLU(W_l h + b_l)``, ``h = x + W_o Attn(W_in x + b_in) + b_o``,
    with a hand-written backward that keeps little in memory.

    ``q|k|v`` is computed group by group (a few thousand atoms at a time, whole blocks of
    equal-size molecules). With ``recompute=True`` it is not stored: the backward recomputes it
    group by group, overwrites it with its gradient and folds that into the weight and input
    gradients straight away. Saved for the backward: the input ``x`` (alive anyway), the
    attention output, ``h``, the ReLU's sign mask (1 byte per element) and the log-sum-exps, so a
    SAB holds about 3.25 instead of 7 activations of ``[N, C]`` and no ``[N, 3C]`` buffer ever
    exists; the price is one extra ``x W_in`` matmul in the backward. With ``recompute=False``
    the groups' ``q|k|v`` are kept (6.25 activations, no extra matmul). Same numbers as the
    autograd composition (:meth:`MultiheadAttentionBlock.forward_packed` with ``fused=False``).

    In float32 on CPU with head dimension 16, 32 or 64 the native kernels (:mod:`abp_core.kernels`)
    run the attention of a whole group in one call, add the ``q|k|v`` bias on the fly (so ``q|k|v``
    is a plain ``x W_in^T``, with no bias pass, and its bias gradient comes back from the attention
    backward) and fuse the element-wise passes (residual + bias; bias + ReLU + residual + mask; ReLU
    backward + bias-gradient column sums). Otherwise PyTorch's CPU flash attention runs per block.

    ``mm_dtype`` (e.g. ``torch.bfloat16`` under CPU autocast): the matmuls run in that dtype and the
    attention output is stored in it, while attention itself runs in float32 (the CPU flash
    kernels' bf16 backward is ~6x slower) and the residual stream (``h``, ``y`` and their
    gradients) stays in ``x``'s dtype, as under autocast. Not exact, like autocast; the gradients
    come back in the parameters' and ``x``'s dtypes.
    """

    @staticmethod
    def forward(ctx, x, w_in, b_in, w_o, b_o, w_l, b_l, groups, heads: int, recompute: bool,
                mm_dtype: Optional[torch.dtype] = None):
        cd = mm_dtype or x.dtype
        lowp = mm_dtype is not None
        w_in_c, b_in_c, w_o_c, b_o_c, w_l_c, b_l_c = (t.to(cd) for t in (w_in, b_in, w_o, b_o, w_l, b_l))
        out = x.new_empty(x.size(0), w_o.size(1), dtype=cd)
        lses, kept, tables = [], [], []
        # the native kernel adds the q|k|v bias itself (no bias pass over [rows, 3C]) and returns its gradient
        native = not lowp and x.is_contiguous() and kernels.supports(x.device, x.dtype, w_o.size(1), heads)
        with torch.autocast(x.device.type, enabled=False):
            for r0, r1, blocks, table in groups:
                if native:
                    qkv = torch.mm(x[r0:r1], w_in_c.t())
                    _, table, blses = _attention_forward(qkv, blocks, heads, out=out[r0:r1], bias=b_in_c,
                                                         table=table)
                elif lowp:  # attention in float32, its output stored in the matmul dtype
                    qkv = torch.addmm(b_in_c, x[r0:r1].to(cd), w_in_c.t())
                    o32, table, blses = _attention_forward(qkv.float(), blocks, heads, table=table)
                    out[r0:r1].copy_(o32)
                else:
                    qkv = torch.addmm(b_in_c, x[r0:r1], w_in_c.t())
                    _, table, blses = _attention_forward(qkv, blocks, heads, out=out[r0:r1], table=table)
                lses.extend(blses)
                tables.append((table, len(blses)))
                if not recompute:
                    kept.append(qkv)
            if lowp:
                h = torch.addmm(b_o_c, out, w_o_c.t()).to(x.dtype).add_(x)
                z = torch.addmm(b_l_c, h.to(cd), w_l_c.t())
                mask = z > 0
                y = torch.add(h, z.relu_())
            elif native:  # fused element-wise passes: h = x + out W_o^T + b_o, y = h + relu(h W_l^T + b_l)
                h = kernels.add_residual(torch.mm(out, w_o.t()), x, b_o)
                y = torch.mm(h, w_l.t())
                mask = kernels.relu_residual(y, b_l, h)
            else:
                h = torch.addmm(b_o_c, out, w_o_c.t()).add_(x)
                z = torch.addmm(b_l_c, h, w_l_c.t())
                mask = z > 0
                y = z.relu_().add_(h)
        ctx.groups, ctx.tables, ctx.heads, ctx.num_lses, ctx.mm_dtype = groups, tables, heads, len(lses), mm_dtype
        ctx.native = native
        ctx.save_for_backward(x, w_in, b_in, w_o, w_l, out, h, mask, *lses, *kept)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        x, w_in, b_in, w_o, w_l, out, h, mask, *rest = ctx.saved_tensors
        lses, kept = rest[:ctx.num_lses], rest[ctx.num_lses:]
        if ctx.mm_dtype is not None:
            with torch.autocast(x.device.type, enabled=False):
                grads = _fused_sab_backward_low_precision(ctx, gy.to(x.dtype).contiguous(), x, w_in, b_in, w_o,
                                                          w_l, out, h, mask, lses, kept)
            return grads + (None, None, None, None)
        gy = gy.contiguous()
        if ctx.native:  # one log-sum-exp tensor and one molecule table per group
            groups = [(r0, r1, table) for (r0, r1, _, _), (table, _) in zip(ctx.groups, ctx.tables)]
            gh, *grads = native_readout.sab_backward(gy, (x, out, h, mask, lses, kept), w_in, b_in, w_o, w_l, groups,
                                                     ctx.heads)
            return (gh if ctx.needs_input_grad[0] else None), *grads, None, None, None, None
        gz = gy * mask  # ReLU backward; 3x faster than torch.where(mask, gy, 0) on CPU (measured)
        gb_l = gz.sum(0)
        gw_l = gz.t().mm(h)
        gh = torch.addmm(gy, gz, w_l)  # dL/dh = gy + gz W_l; becomes dL/dx below
        gw_o = gh.t().mm(out)
        gb_o = gh.sum(0)
        go = torch.mm(gh, w_o, out=gz)
        gw_in, gb_in = torch.zeros_like(w_in), torch.zeros_like(b_in)
        i = 0
        for g, ((r0, r1, blocks, _), (table, count)) in enumerate(zip(ctx.groups, ctx.tables)):
            xg = x[r0:r1]
            qkv = kept[g] if kept else torch.addmm(b_in, xg, w_in.t())
            grad = torch.empty_like(qkv) if kept else qkv  # recomputed q|k|v is overwritten by its own gradient
            _attention_backward(go[r0:r1], qkv, out[r0:r1], table, lses[i:i + count], blocks, ctx.heads, grad)
            i += count
            gw_in.addmm_(grad.t(), xg)
            gb_in += grad.sum(0)
            gh[r0:r1].addmm_(grad, w_in)
        return (gh if ctx.needs_input_grad[0] else None), gw_in, gb_in, gw_o, gb_o, gw_l, gb_l, None, None, None, None


def _fused_sab_backward_low_precision(ctx, gy, x, w_in, b_in, w_o, w_l, out, h, mask, lses, kept):
    """:class:`_FusedSelfAttentionBlock`'s backward with ``mm_dtype`` matmuls: residual-stream gradients,
    bias gradients and weight-gradient sums in ``x``'s dtype; attention backward in float32."""
    cd = ctx.mm_dtype
    w_in_c, b_in_c, w_o_c, w_l_c = (t.to(cd) for t in (w_in, b_in, w_o, w_l))
    gz = gy * mask
    gb_l = gz.sum(0)
    gz = gz.to(cd)
    gw_l = gz.t().mm(h.to(cd))
    gh = gz.mm(w_l_c).to(gy.dtype).add_(gy)  # dL/dh = gy + gz W_l; becomes dL/dx below
    gb_o = gh.sum(0)
    gh_c = gh.to(cd)
    gw_o = gh_c.t().mm(out)
    go = gh_c.mm(w_o_c)
    del gh_c, gz
    gw_in, gb_in = torch.zeros_like(w_in, dtype=gy.dtype), torch.zeros_like(b_in, dtype=gy.dtype)
    i = 0
    for g, ((r0, r1, blocks, _), (table, count)) in enumerate(zip(ctx.groups, ctx.tables)):
        xg = x[r0:r1].to(cd)
        qkv = grad = (kept[g] if kept else torch.addmm(b_in_c, xg, w_in_c.t())).float()
        _attention_backward(go[r0:r1].float(), qkv, out[r0:r1].float(), table, lses[i:i + count], blocks, ctx.heads,
                            grad)  # overwrites its own float32 copy of q|k|v
        i += count
        gb_in += grad.sum(0)
        grad = grad.to(cd)
        gw_in += grad.t().mm(xg)
        gh[r0:r1] += grad.mm(w_in_c)
    p = w_in.dtype
    return ((gh if ctx.needs_input_grad[0] else None), gw_in.to(p), gb_in.to(p), gw_o.to(p), gb_o.to(p),
            gw_l.to(p), gb_l.to(p))


class _ReLU:
    """Native epilogue ``relu(y + b)``, keeping the 1-byte mask for the backward."""
    keeps_output = False

    def forward(self, y: Tensor, bias: Tensor):
        return (kernels.relu_residual(y, bias),)

    def backward(self, grad: Tensor, y, state):
        return kernels.relu_backward(grad, state[0])[:2]


def linear_relu(lin: Linear, x: Tensor) -> Tensor:
    """``relu(lin(x))``; native kernels where they apply (CPU float32, no autocast, a multiple of 16 outputs):
    a matmul, then bias + ReLU in one pass, and one pass for the ReLU backward and the bias gradient."""
    if x.is_contiguous() and lin.bias is not None and kernels.native_linear(x, lin.weight):
        return kernels.linear_epilogue(x, lin.weight, lin.bias, _ReLU())
    return lin(x).relu_()


class _BlockPool(torch.autograd.Function):
    """``out[m] = a[m, :n_m]^T y_m`` for every molecule: attention-weighted sums of sorted packed rows.

    ``a`` ``[M', n_max, K]`` weights (padded per molecule), ``y`` ``[N, C]``. One batched matmul per
    block of equal-size molecules on zero-copy views of ``y``: no padded copy of ``y`` and of its
    gradient, as ``bmm(a^T, pad(y))`` would need.
    """

    @staticmethod
    def forward(ctx, a: Tensor, y: Tensor, buckets):
        c = y.size(1)
        out = y.new_empty(a.size(0), a.size(2), c)
        for r0, m0, b, n in buckets:
            torch.bmm(a[m0:m0 + b, :n].transpose(1, 2), y[r0:r0 + b * n].view(b, n, c), out=out[m0:m0 + b])
        ctx.buckets = buckets
        ctx.save_for_backward(a, y)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        a, y = ctx.saved_tensors
        grad = grad.to(y.dtype).contiguous()
        c = y.size(1)
        ga = torch.zeros_like(a) if ctx.needs_input_grad[0] else None
        gy = torch.empty_like(y) if ctx.needs_input_grad[1] else None
        for r0, m0, b, n in ctx.buckets:
            g, yb = grad[m0:m0 + b], y[r0:r0 + b * n].view(b, n, c)
            if ga is not None:
                ga[m0:m0 + b, :n] = torch.bmm(yb, g.transpose(1, 2))
            if gy is not None:
                torch.bmm(a[m0:m0 + b, :n], g, out=gy[r0:r0 + b * n].view(b, n, c))
        return ga, gy, None


def packed_self_attention(qkv: Tensor, layout: SetLayout, heads: int, dropout_p: float = 0.0,
                          force_generic: bool = False) -> Tensor:
    """Multi-head self-attention within each molecule: packed ``[N, 3C]`` (q|k|v) -> ``[N, C]``.

    ``layout``'s path (:class:`SetLayout`): ``"padded"``: :func:`padded_self_attention`; ``"native"``:
    :class:`_PackedSelfAttention` with the native kernel; ``"blocks"``: on CPU without dropout
    :class:`_PackedSelfAttention` (fused kernels, custom backward; in float32 for bf16/fp16 inputs),
    otherwise (or with ``force_generic``) per-block
    :func:`torch.nn.functional.scaled_dot_product_attention` under autograd.
    """
    if layout.path == "padded" or (layout.path == "native" and (force_generic or dropout_p > 0)):
        return padded_self_attention(qkv, layout, heads, dropout_p)
    if layout.path == "native":
        return _PackedSelfAttention.apply(qkv, None, heads, (layout.first_rows, layout.molecule_sizes))
    if not force_generic and _cpu_flash_available(qkv, dropout_p):
        if qkv.dtype in (torch.bfloat16, torch.float16):
            # bf16 autocast: the CPU flash kernels' reduced-precision backward is ~6x slower than
            # their float32 one (and less accurate), so attention runs in float32 (matmuls stay bf16).
            return _PackedSelfAttention.apply(qkv.float(), layout.buckets, heads)
        return _PackedSelfAttention.apply(qkv, layout.buckets, heads)
    c = qkv.size(1) // 3
    outs = []
    for blk, (_, _, b, n) in layout.blocks(qkv):
        q, k, v = (t.transpose(1, 2) for t in blk.view(b, n, 3, heads, c // heads).unbind(2))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
        outs.append(o.transpose(1, 2).reshape(b * n, c))
    return torch.cat(outs)


def padded_self_attention(qkv: Tensor, layout: SetLayout, heads: int, dropout_p: float = 0.0) -> Tensor:
    """Multi-head self-attention within each molecule in one batched call: packed ``[N, 3C]`` (q|k|v)
    -> ``[N, C]``, through ``[M', n_max]`` padded sets and
    :func:`torch.nn.functional.scaled_dot_product_attention` with a key mask (padded keys get zero
    weight; padded queries attend to the real keys and are dropped). Plain autograd."""
    c = qkv.size(1) // 3
    m, n = layout.num_present, layout.n_max
    dense = layout.pad(qkv, 0.0).view(m, n, 3, heads, c // heads)
    q, k, v = (dense[:, :, i].transpose(1, 2) for i in range(3))  # [M', H, n_max, d]
    mask = None if layout.num_atoms == m * n else layout.key_mask()[:, None, None, :]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return layout.unpad(o.transpose(1, 2).reshape(m, n, c))


def _heads(t: Tensor, heads: int) -> Tensor:
    """``[B, n, C] -> [B, heads, n, C / heads]``."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(t: Tensor) -> Tensor:
    """``[B, heads, n, d] -> [B, n, heads * d]``."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class MultiheadAttentionBlock(torch.nn.Module):
    r"""Multihead attention block (MAB, paper Eq. 5-6) with masking.

    .. math::
        H = X + \mathrm{MultiHead}(X, Y, Y), \qquad \mathrm{MAB}(X, Y) = H + \mathrm{ReLU}(\mathrm{Linear}(H))

    with optional layer norms after each residual (Set Transformer's layout).
    Parameters are laid out like :class:`torch.nn.MultiheadAttention`
    (``in_proj_weight``/``in_proj_bias``/``out_proj``). :meth:`forward` works on
    padded ``[B, n, C]`` sets with masks; the ``*_packed`` methods work on a
    :class:`SetLayout`'s size-sorted packed atoms (no padding).
    """

    def __init__(self, channels: int, heads: int = 1, layer_norm: bool = False, dropout: float = 0.0):
        super().__init__()
        if channels % heads != 0:
            raise ValueError(f"heads ({heads}) must divide the width ({channels})")
        self.channels, self.heads, self.dropout = channels, heads, dropout
        self.in_proj_weight = Parameter(torch.empty(3 * channels, channels))
        self.in_proj_bias = Parameter(torch.empty(3 * channels))
        self.out_proj = Linear(channels, channels)
        self.lin = Linear(channels, channels)
        self.norm1 = LayerNorm(channels) if layer_norm else None
        self.norm2 = LayerNorm(channels) if layer_norm else None
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.xavier_uniform_(self.in_proj_weight)
        torch.nn.init.zeros_(self.in_proj_bias)
        self.out_proj.reset_parameters()
        torch.nn.init.zeros_(self.out_proj.bias)
        self.lin.reset_parameters()
        for norm in (self.norm1, self.norm2):
            if norm is not None:
                norm.reset_parameters()

    def project(self, x: Tensor, y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        return (_heads(F.linear(x, w_q, b_q), self.heads), _heads(F.linear(y, w_k, b_k), self.heads),
                _heads(F.linear(y, w_v, b_v), self.heads))

    def attention_mask(self, x_mask: Optional[Tensor], y_mask: Optional[Tensor]) -> Optional[Tensor]:
        """Boolean ``[B, 1, Nx, Ny]`` mask (True = attend) hiding padded keys.

        Padded queries may attend to everything: their outputs are discarded, and
        a fully masked softmax row would put NaNs into the backward pass.
        """
        if y_mask is None:
            return None
        mask = y_mask[:, None, None, :]
        if x_mask is not None:
            mask = mask | ~x_mask[:, None, :, None]
        return mask

    def forward(self, x: Tensor, y: Tensor, x_mask: Optional[Tensor] = None,
                y_mask: Optional[Tensor] = None) -> Tensor:
        if y.size(-2) == 1 and y_mask is None and self._dropout() == 0:
            # one key (e.g. the decoder after a one-seed PMA): its softmax weight is exactly 1, so the
            # attention output is its value; q and k need not be computed (same numbers)
            _, _, w_v = self.in_proj_weight.chunk(3)
            _, _, b_v = self.in_proj_bias.chunk(3)
            attended = F.linear(y, w_v, b_v).expand(*x.shape[:-1], self.channels)
            if x_mask is not None:
                attended = attended * x_mask.unsqueeze(-1).to(attended.dtype)
            return self._feed_forward(x, attended)
        q, k, v = self.project(x, y)
        attn = F.scaled_dot_product_attention(
            q, k, v, attn_mask=self.attention_mask(x_mask, y_mask), dropout_p=self._dropout())
        attended = _merge(attn)
        if x_mask is not None:
            attended = attended * x_mask.unsqueeze(-1).to(attended.dtype)
        return self._feed_forward(x, attended)

    def _dropout(self) -> float:
        return self.dropout if self.training else 0.0

    def _feed_forward(self, x: Tensor, attended: Tensor) -> Tensor:
        # In-place adds/ReLU on fresh linear outputs (not saved for backward) save two temporaries.
        h = self.out_proj(attended)
        h = h.add_(x) if h.dtype == x.dtype and h.shape == x.shape else h + x
        if self.norm1 is not None:
            h = self.norm1(h)
        h = h + self.lin(h).relu_()
        if self.norm2 is not None:
            h = self.norm2(h)
        return h

    def forward_packed(self, x: Tensor, layout: SetLayout, fused: bool = True, recompute: bool = True) -> Tensor:
        """SAB on size-sorted packed atoms ``[N, C]``: attention within each molecule.

        On CPU without layer norms or dropout this runs as one :class:`_FusedSelfAttentionBlock`
        (low-memory backward; under bf16/fp16 autocast with matmuls in that dtype); otherwise, or with
        ``fused=False``, as an autograd composition. ``recompute``: see :class:`_FusedSelfAttentionBlock`.
        """
        if layout.path == "padded":
            qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
            return self._feed_forward(x, padded_self_attention(qkv, layout, self.heads, self._dropout()))
        autocast = torch.is_autocast_enabled(x.device.type)
        mm_dtype = torch.get_autocast_dtype(x.device.type) if autocast else None
        if (fused and self.norm1 is None
                and (layout.path == "native" or _cpu_flash_available(x, self._dropout()))
                and (mm_dtype in (torch.bfloat16, torch.float16) if autocast else
                     all(t.dtype == x.dtype for t in (self.in_proj_weight, self.out_proj.weight, self.lin.weight)))):
            return _FusedSelfAttentionBlock.apply(x, self.in_proj_weight, self.in_proj_bias, self.out_proj.weight,
                                                  self.out_proj.bias, self.lin.weight, self.lin.bias,
                                                  layout.row_groups(), self.heads, recompute, mm_dtype)
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        return self._feed_forward(x, packed_self_attention(qkv, layout, self.heads, self._dropout(),
                                                           force_generic=not fused))

    def seed_scores(self, queries: Tensor, y: Tensor) -> Tensor:
        r"""Attention logits ``[N, k * heads]`` of ``k`` shared queries over packed keys ``y``.

        Uses :math:`q_h \cdot (W_{k,h} y + b_{k,h}) = (W_{k,h}^\top q_h) \cdot y + \mathrm{const}`:
        the constant is the same for all atoms, so it cancels in the softmax, and the
        key projection (``C x C`` per atom) becomes a ``C x k*heads`` one.
        """
        w_q, w_k, _ = self.in_proj_weight.chunk(3)
        b_q = self.in_proj_bias[:self.channels]
        d = self.channels // self.heads
        q = F.linear(queries, w_q, b_q).view(-1, self.heads, d)  # [k, H, d]
        u = torch.einsum("khd,hdc->khc", q, w_k.view(self.heads, d, self.channels))
        return F.linear(y, u.reshape(-1, self.channels) * d ** -0.5)

    def attend_seeds(self, queries: Tensor, y: Tensor, layout: SetLayout) -> Tensor:
        r"""Attention output ``[M', k, C]`` (sorted molecules) of ``k`` shared queries over each molecule.

        Pools *before* projecting: :math:`\sum_i a_{hi} (W_{v,h} y_i + b_{v,h}) = W_{v,h} (\sum_i a_{hi} y_i) + b_{v,h}`,
        so values are projected once per molecule instead of once per atom.
        """
        k, c, heads = queries.size(0), self.channels, self.heads
        d = c // heads
        # Softmax on padded [M', n_max, k*H] logits (small; padding gets -inf: zero weight), then
        # weighted sums of the keys: per block of equal-size molecules on the packed keys ("blocks"
        # path: no padded copy of y), else one batched matmul with the padded keys.
        scores = layout.pad(self.seed_scores(queries, y), float("-inf"))  # [M', n_max, k*H]
        a = scores.softmax(dim=1)
        p = self._dropout()
        if p > 0:
            a = F.dropout(a, p)
        if layout.buckets is not None:
            pooled = _BlockPool.apply(a.to(y.dtype), y, layout.buckets)
        else:
            pooled = torch.bmm(a.to(y.dtype).transpose(1, 2), layout.pad(y, 0.0))
        pooled = pooled.view(-1, k, heads, c)  # [M', k, H, C]
        _, w_v = self.in_proj_weight.split([2 * c, c])
        b_v = self.in_proj_bias[2 * c:].view(heads, d)
        out = torch.einsum("mkhc,hdc->mkhd", pooled, w_v.view(heads, d, c))
        if p > 0:  # dropped-out weights no longer sum to one
            out = out + a.sum(dim=1).view(-1, k, heads, 1) * b_v
        else:
            out = out + b_v
        return out.reshape(-1, k, c)

    def pool_packed(self, queries: Tensor, y: Tensor, layout: SetLayout) -> Tensor:
        """MAB(S, Y) with the same ``[k, C]`` queries for every molecule over sorted packed keys ``y``.

        Returns ``[M, k, C]`` in molecule order (empty molecule slots see no keys: zero attention).
        """
        attended = layout.molecules_to_batch_order(self.attend_seeds(queries, y, layout))
        return self._feed_forward(queries.unsqueeze(0).expand(layout.num_molecules, -1, -1), attended)

    def pool_weights_packed(self, queries: Tensor, y: Tensor, batch: Tensor, num_molecules: int) -> Tensor:
        """Attention ``[num_atoms, heads, k]`` of the queries over each molecule's atoms (softmax per molecule).

        ``y`` and ``batch`` may be in any atom order (e.g. the batch's).
        """
        scores = self.seed_scores(queries, y).view(y.size(0), -1, self.heads).transpose(1, 2)
        return softmax(scores, batch, num_nodes=num_molecules, dim=0)

    def cross_packed(self, x: Tensor, h: Tensor, layout: SetLayout) -> Tensor:
        """MAB(X, H): each sorted packed atom attends to its molecule's rows of ``h`` ``[M', m, C]``."""
        c, heads = self.channels, self.heads
        w_q, w_kv = self.in_proj_weight.split([c, 2 * c])
        b_q, b_kv = self.in_proj_bias.split([c, 2 * c])
        q = layout.pad(F.linear(x, w_q, b_q), 0.0)  # [M', n_max, C]; padded queries are dropped below
        k, v = F.linear(h, w_kv, b_kv).chunk(2, dim=-1)  # [M', m, C] each: no padded keys, no mask
        o = F.scaled_dot_product_attention(_heads(q, heads), _heads(k, heads), _heads(v, heads),
                                           dropout_p=self._dropout())
        return self._feed_forward(x, layout.unpad(_merge(o)))

    def attention_weights(self, x: Tensor, y: Tensor, y_mask: Optional[Tensor] = None) -> Tensor:
        """Softmax attention ``[B, heads, Nx, Ny]`` of queries ``x`` over keys ``y`` (padded keys get 0)."""
        q, k, _ = self.project(x, y)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.channels // self.heads)
        if y_mask is not None:
            scores = scores.masked_fill(~y_mask[:, None, None, :], float("-inf"))
        return scores.softmax(dim=-1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, layer_norm={self.norm1 is not None}"


class InducedSetAttentionBlock(torch.nn.Module):
    r"""Induced set attention block (ISAB, Lee et al. 2019): :math:`\mathrm{MAB}(X, \mathrm{MAB}(I, X))`.

    ``m`` learnable induced points :math:`I` attend over each molecule's atoms, then
    every atom attends to its molecule's ``m`` results: cost and memory
    :math:`O(n m)` per molecule instead of a SAB's :math:`O(n^2)`.
    """

    def __init__(self, channels: int, num_induced_points: int, heads: int = 1, layer_norm: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        if num_induced_points < 1:
            raise ValueError(f"num_induced_points must be >= 1, got {num_induced_points}")
        self.induced = Parameter(torch.empty(1, num_induced_points, channels))
        self.mab1 = MultiheadAttentionBlock(channels, heads, layer_norm, dropout)
        self.mab2 = MultiheadAttentionBlock(channels, heads, layer_norm, dropout)
        self.reset_parameters()

    def reset_parameters(self):
        torch.nn.init.xavier_uniform_(self.induced)
        self.mab1.reset_parameters()
        self.mab2.reset_parameters()

    def forward(self, x: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        """Padded ``[B, n, C]`` sets with an optional ``[B, n]`` mask (True = atom)."""
        h = self.mab1(self.induced.expand(x.size(0), -1, -1), x, y_mask=mask)
        return self.mab2(x, h, x_mask=mask)

    def forward_packed(self, x: Tensor, layout: SetLayout) -> Tensor:
        seeds = self.induced[0]
        h = self.mab1._feed_forward(seeds.unsqueeze(0).expand(layout.num_present, -1, -1),
                                    self.mab1.attend_seeds(seeds, x, layout))  # [M', m, C]
        return self.mab2.cross_packed(x, h, layout)

    def extra_repr(self) -> str:
        return f"num_induced_points={self.induced.size(1)}"


class AttentionPooling(Readout):
    r"""Attention-based pooling (ABP): a Set Transformer readout (paper Eq. 5-11).

    .. math::
        Z &= \mathrm{SAB}^{n_{enc}}(\mathrm{Linear}_\phi(X)) \\
        \mathrm{PMA}_k(Z) &= \mathrm{MAB}(S_k, \mathrm{Linear}_\phi(Z)) \\
        \mathrm{ABP}(X) &= \mathrm{Linear}_\phi\big(\mathrm{SAB}^{n_{dec}}(\mathrm{PMA}_k(Z))\big)

    with :math:`S_k` ``k`` learnable seed vectors; the ``k`` outputs are averaged
    (``concat=False``, the paper's choice) or concatenated. Padding is never
    materialised, so results do not depend on batch composition.

    Args:
        in_channels: per-atom feature width.
        out_channels: molecule feature width (default ``hidden_channels``, or
            ``k * hidden_channels`` with ``concat=True`` and no output projection).
        hidden_channels: attention width (default ``in_channels``).
        heads: attention heads (default ``8``); must divide ``hidden_channels``.
        num_encoder_blocks: SABs (or ISABs) in the encoder (default ``2``).
        num_seeds: PMA seed vectors ``k`` (default ``1``).
        num_decoder_blocks: SABs in the decoder (default ``1``).
        concat: concatenate the ``k`` seed outputs instead of averaging (default ``False``).
        layer_norm: layer norms in every block (default ``False``, as the paper).
        dropout: attention dropout (default ``0``).
        input_projection: apply the input :math:`\mathrm{Linear}_\phi` (default ``True``).
        output_projection: apply the output :math:`\mathrm{Linear}_\phi` (default ``True``).
        num_induced_points: if given, the encoder uses induced set attention blocks
            (:class:`InducedSetAttentionBlock`) with this many induced points ``m`` instead of
            SABs: time ``O(n m)`` instead of ``O(n^2)`` per molecule, memory linear in the number
            of atoms (default ``None``: SABs, the paper; with flash attention their memory is
            linear in ``n`` too, see ``benchmarks/scaling.py``).
        recompute: recompute each SAB's ``q|k|v`` in the backward instead of storing it (``True``:
            about half the readout's training memory for one extra matmul per SAB, ~14 % of its
            FLOPs; see :class:`_FusedSelfAttentionBlock`). Default ``None``: only when one SAB's
            ``q|k|v`` would exceed :data:`abp_core.native_readout.KEEP_QKV_BYTES` (16 MiB, about
            22,000 atoms at 64 channels), so small batches skip the extra matmul.
        bucket_ratio: accepted for backward compatibility and ignored (see the implementation
            note below: no path pads the per-atom linear layers).

    Implementation (exact, see ``benchmarks/README.md``): linear layers run on all atoms of the
    batch at once; self-attention runs on one of three paths chosen in one place
    (:func:`set_attention_path`, :class:`SetLayout`): on CPU in float32 the native kernel, one call
    per group of a few thousand atoms in the batch's own order (no sorting, no padding, no per-block
    loop); on CUDA one masked attention call on padded sets; otherwise (float64, bf16 autocast,
    dropout) PyTorch's CPU flash attention per block of equal-size molecules of a size-sorted batch.
    With the paper's layout (SAB encoders, one seed, no layer norms) on the native path the whole
    readout is one autograd node (:mod:`abp_core.native_readout`: straight-line forward and
    backward, no per-module dispatch); otherwise on CPU each SAB is one autograd node with a
    hand-written, low-memory backward (:class:`_FusedSelfAttentionBlock`); the PMA is computed on the packed keys with a per-molecule
    softmax, projecting keys and values per molecule instead of per atom; a decoder over one seed
    skips its softmax (its weight is exactly 1). Same numbers as PyG's ``SetTransformerAggregation`` (fp32
    ``allclose``, float64 to 1e-15).
    """

    weighted = True

    def __init__(self, in_channels: int, out_channels: Optional[int] = None,
                 hidden_channels: Optional[int] = None, heads: int = 8,
                 num_encoder_blocks: int = 2, num_seeds: int = 1, num_decoder_blocks: int = 1,
                 concat: bool = False, layer_norm: bool = False, dropout: float = 0.0,
                 input_projection: bool = True, output_projection: bool = True,
                 num_induced_points: Optional[int] = None, recompute: Optional[bool] = None,
                 bucket_ratio: float = 1.0):
        hidden = hidden_channels or in_channels
        if hidden % heads != 0:
            raise ValueError(f"heads ({heads}) must divide hidden_channels ({hidden})")
        if num_seeds < 1:
            raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
        if not input_projection and hidden != in_channels:
            raise ValueError("without an input projection hidden_channels must equal in_channels")
        if num_induced_points is not None and num_induced_points < 1:
            raise ValueError(f"num_induced_points must be >= 1, got {num_induced_points}")
        pooled = hidden * num_seeds if concat else hidden
        if out_channels is None:
            out_channels = hidden if output_projection else pooled
        elif not output_projection and out_channels != pooled:
            raise ValueError(f"without an output projection out_channels must be {pooled}")
        super().__init__(in_channels, out_channels)
        self.hidden_channels, self.heads, self.num_seeds, self.concat = hidden, heads, num_seeds, concat
        self.num_induced_points, self.recompute = num_induced_points, recompute
        self.bucket_ratio = bucket_ratio
        self.input_lin = Linear(in_channels, hidden) if input_projection else None
        if num_induced_points is None:
            self.encoders = torch.nn.ModuleList(
                MultiheadAttentionBlock(hidden, heads, layer_norm, dropout) for _ in range(num_encoder_blocks))
        else:
            self.encoders = torch.nn.ModuleList(
                InducedSetAttentionBlock(hidden, num_induced_points, heads, layer_norm, dropout)
                for _ in range(num_encoder_blocks))
        self.pma_lin = Linear(hidden, hidden)
        self.seeds = Parameter(torch.empty(1, num_seeds, hidden))
        self.pma = MultiheadAttentionBlock(hidden, heads, layer_norm, dropout)
        self.decoders = torch.nn.ModuleList(
            MultiheadAttentionBlock(hidden, heads, layer_norm, dropout) for _ in range(num_decoder_blocks))
        self.output_lin = Linear(pooled, out_channels) if output_projection else None
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.input_lin, self.pma_lin, self.output_lin):
            if lin is not None:
                lin.reset_parameters()
        torch.nn.init.xavier_uniform_(self.seeds)
        for block in (*self.encoders, self.pma, *self.decoders):
            block.reset_parameters()

    def _encode_sorted(self, x: Tensor, batch: Tensor, dim_size: int) -> Tuple[Tensor, SetLayout]:
        """PMA keys ``Linear_phi(SAB^n(Linear_phi(X)))`` in the layout's size-sorted atom order."""
        layout = SetLayout(batch, dim_size, path=set_attention_path(x, self.hidden_channels, self.heads,
                                                                    self.pma._dropout()))
        x = layout.to_sorted(x)
        if self.input_lin is not None:
            x = linear_relu(self.input_lin, x)
        recompute = self.recomputes(x.size(0))
        for block in self.encoders:
            x = (block.forward_packed(x, layout, recompute=recompute)
                 if isinstance(block, MultiheadAttentionBlock) else block.forward_packed(x, layout))
        return linear_relu(self.pma_lin, x), layout

    def _encode(self, x: Tensor, batch: Tensor, dim_size: int) -> Tuple[Tensor, SetLayout]:
        """Encoded atoms (the PMA keys) in the batch's atom order, and their layout."""
        keys, layout = self._encode_sorted(x, batch, dim_size)
        return layout.atoms_to_batch_order(keys), layout

    def recomputes(self, num_atoms: int) -> bool:
        """Do the SABs recompute ``q|k|v`` in the backward for a batch of ``num_atoms`` atoms?"""
        if self.recompute is not None:
            return self.recompute
        return num_atoms * 3 * self.hidden_channels * 4 > native_readout.KEEP_QKV_BYTES

    def use_parameter_block(self, block: Optional[Tensor]) -> bool:
        """Train through one gradient tensor for all parameters: see
        :func:`abp_core.native_readout.use_parameter_block` (``abp_core.train.FlatParameters`` sets it)."""
        return native_readout.use_parameter_block(self, block)

    def forward(self, x: Tensor, index: Optional[Tensor] = None, ptr: Optional[Tensor] = None,
                dim_size: Optional[int] = None, dim: int = -2,
                max_num_elements: Optional[int] = None) -> Tensor:
        # A training step's call (a batch vector and the number of molecules given) on the native whole-readout
        # path: the batch vector is checked by the molecule table's own pass (sorted, ids in [0, dim_size)), so
        # the base class's checks, a few PyTorch calls and a host read (~50 us per call), are not repeated.
        if (dim_size is not None and index is not None and dim in (0, -2) and index.dtype == torch.int64
                and index.dim() == 1):
            self._check_features(x)
            if index.numel() != x.size(0):
                check_batch_vector(index, x.size(0))  # raises with the message of every readout
            params = self._native_parameters(x)
            if params is not None:
                return native_readout.attention_pooling(self, x, index, dim_size, params)
        return super().forward(x, index, ptr, dim_size, dim, max_num_elements)

    def _native_parameters(self, x: Tensor) -> Optional[List[Tensor]]:
        """The parameters if the whole readout runs as one native node for features ``x``, else ``None``."""
        path = set_attention_path(x, self.hidden_channels, self.heads, self.pma._dropout())
        return native_readout.parameters(self, x, path)

    def pool(self, x, batch, dim_size):
        params = self._native_parameters(x)
        if params is not None:  # the whole readout as one autograd node (exact; see abp_core.native_readout)
            return native_readout.attention_pooling(self, x, batch, dim_size, params)
        keys, layout = self._encode_sorted(x, batch, dim_size)
        h = self.pma.pool_packed(self.seeds[0], keys, layout)  # [num_molecules, k, C]
        for block in self.decoders:
            h = block(h, h)
        h = h.flatten(1) if self.concat else h.mean(dim=1)
        if self.output_lin is not None:
            h = self.output_lin(h).relu()
        return h

    def atom_weights(self, x: Tensor, batch: Optional[Tensor] = None) -> Tensor:
        """PMA attention over each molecule's atoms, averaged over heads and seeds."""
        batch, dim_size = self._check(x, batch, None)
        keys, layout = self._encode(x, batch, dim_size)
        return self.pma.pool_weights_packed(self.seeds[0], keys, batch, dim_size).mean(dim=(1, 2))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", hidden_channels={self.hidden_channels}, heads={self.heads}, "
                f"num_seeds={self.num_seeds}, concat={self.concat}, num_induced_points={self.num_induced_points}")


READOUTS = {
    "sum": SumPooling,
    "mean": MeanPooling,
    "max": MaxPooling,
    "wa": WeightedAveragePooling,
    "owa": OrbitalWeightedAveragePooling,
    "abp": AttentionPooling,
}


#: How tables and figures name each readout.
READOUT_LABELS = {"sum": "sum", "mean": "mean", "max": "max", "wa": "WA", "owa": "OWA", "abp": "ABP"}


def build_readout(name: str, in_channels: int, **kwargs) -> Readout:
    """Readout by name (``sum``, ``mean``, ``max``, ``wa``, ``owa``, ``abp``)."""
    try:
        cls = READOUTS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown readout {name!r}; choose one of {sorted(READOUTS)}") from None
    return cls(in_channels, **kwargs)

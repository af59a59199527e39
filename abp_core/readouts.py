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

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn import LayerNorm, Linear, Parameter
from torch_geometric.nn.aggr import Aggregation
from torch_geometric.utils import softmax

from .graph import check_batch_vector

__all__ = [
    "Readout",
    "SumPooling",
    "MeanPooling",
    "MaxPooling",
    "WeightedAveragePooling",
    "OrbitalWeightedAveragePooling",
    "AttentionPooling",
    "MultiheadAttentionBlock",
    "READOUTS",
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

    def _check(self, x: Tensor, index: Optional[Tensor], dim_size: Optional[int]) -> Tuple[Tensor, int]:
        if x.dim() != 2:
            raise ValueError(f"{type(self).__name__} expects per-atom features of shape "
                             f"[num_atoms, {self.in_channels}], got {tuple(x.shape)}")
        if x.size(0) == 0:
            raise ValueError(f"{type(self).__name__} got an empty batch (no atoms)")
        if x.size(1) != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects feature width {self.in_channels}, "
                             f"got {x.size(1)}")
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


class MultiheadAttentionBlock(torch.nn.Module):
    r"""Multihead attention block (MAB, paper Eq. 5-6) with masking.

    .. math::
        H = X + \mathrm{MultiHead}(X, Y, Y), \qquad \mathrm{MAB}(X, Y) = H + \mathrm{ReLU}(\mathrm{Linear}(H))

    with optional layer norms after each residual (Set Transformer's layout).
    Parameters are laid out like :class:`torch.nn.MultiheadAttention`
    (``in_proj_weight``/``in_proj_bias``/``out_proj``), and attention runs through
    :func:`torch.nn.functional.scaled_dot_product_attention` (fused kernels).
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
        h = x + self.out_proj(attended)
        if self.norm1 is not None:
            h = self.norm1(h)
        h = h + self.lin(h).relu()
        if self.norm2 is not None:
            h = self.norm2(h)
        return h

    def forward_packed(self, x: Tensor, layout: "SetLayout") -> Tensor:
        """SAB on packed atoms ``[num_atoms, C]``: attention within each molecule, bucket by bucket."""
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        rows = []
        for block, mask in layout.split(qkv):
            q, k, v = block.chunk(3, dim=-1)
            attn_mask = None if mask is None else self.attention_mask(mask, mask)
            out = _merge(F.scaled_dot_product_attention(
                _heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads),
                attn_mask=attn_mask, dropout_p=self._dropout()))
            rows.append(out.reshape(-1, self.channels) if mask is None else out[mask])
        return self._feed_forward(x, torch.cat(rows).index_select(0, layout.inverse))

    def pool_packed(self, queries: Tensor, y: Tensor, layout: "SetLayout") -> Tensor:
        """MAB(S, Y) with the same ``[k, C]`` queries for every molecule over packed keys ``y``."""
        w_q, w_kv = self.in_proj_weight.split([self.channels, 2 * self.channels])
        b_q, b_kv = self.in_proj_bias.split([self.channels, 2 * self.channels])
        q = _heads(F.linear(queries, w_q, b_q).unsqueeze(0), self.heads)  # [1, H, k, d]
        kv = F.linear(y, w_kv, b_kv)
        outs = []
        for block, mask in layout.split(kv):
            k, v = block.chunk(2, dim=-1)
            attn_mask = None if mask is None else mask[:, None, None, :]
            outs.append(_merge(F.scaled_dot_product_attention(
                q.expand(block.size(0), -1, -1, -1), _heads(k, self.heads), _heads(v, self.heads),
                attn_mask=attn_mask, dropout_p=self._dropout())))
        attended = y.new_zeros(layout.num_molecules, queries.size(0), self.channels)
        if outs:
            attended = attended.index_copy(0, layout.molecules, torch.cat(outs))
        return self._feed_forward(queries.unsqueeze(0).expand(layout.num_molecules, -1, -1), attended)

    def pool_weights_packed(self, queries: Tensor, y: Tensor, batch: Tensor, num_molecules: int) -> Tensor:
        """Attention ``[num_atoms, heads, k]`` of the queries over each molecule's atoms (softmax per molecule)."""
        w_q, w_k, _ = self.in_proj_weight.chunk(3)
        b_q, b_k, _ = self.in_proj_bias.chunk(3)
        d = self.channels // self.heads
        q = F.linear(queries, w_q, b_q).view(-1, self.heads, d)  # [k, H, d]
        k = F.linear(y, w_k, b_k).view(-1, self.heads, d)  # [N, H, d]
        scores = torch.einsum("nhd,khd->nhk", k, q) / math.sqrt(d)
        return softmax(scores, batch, num_nodes=num_molecules, dim=0)

    def attention_weights(self, x: Tensor, y: Tensor, y_mask: Optional[Tensor] = None) -> Tensor:
        """Softmax attention ``[B, heads, Nx, Ny]`` of queries ``x`` over keys ``y`` (padded keys get 0)."""
        q, k, _ = self.project(x, y)
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.channels // self.heads)
        if y_mask is not None:
            scores = scores.masked_fill(~y_mask[:, None, None, :], float("-inf"))
        return scores.softmax(dim=-1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, heads={self.heads}, layer_norm={self.norm1 is not None}"



class SetLayout:
    """Where each molecule's atoms sit in the packed ``[num_atoms, C]`` tensor.

    Molecules are grouped into *size buckets* (sorted by size; a new bucket starts
    when a molecule is more than ``max_ratio`` times larger than the bucket's
    smallest) so that attention runs on small dense blocks with little padding,
    while every linear layer runs on the packed atoms with no padding at all.

    Attributes:
        buckets: list of ``(molecules, index, mask)``: molecule ids ``[Bb]``, atom
            indices ``[Bb, nb]`` into the packed tensor (padding points at a valid
            atom), and the padding mask (``None`` when all sizes in the bucket are equal).
        gather: all buckets' atom indices, concatenated (see :meth:`split`).
        inverse: permutation taking the buckets' concatenated valid rows back to packed order.
        molecule_inverse: same for per-molecule rows (molecules with zero atoms excluded).
    """

    def __init__(self, batch: Tensor, num_molecules: int, max_ratio: float = 1.1):
        device = batch.device
        counts = torch.bincount(batch, minlength=num_molecules)
        starts = torch.cumsum(counts, 0) - counts
        sizes = counts.tolist()  # one host sync per forward, to plan the buckets
        order = sorted((m for m in range(num_molecules) if sizes[m] > 0), key=sizes.__getitem__)
        groups: list = []
        for m in order:
            if groups and sizes[m] <= max(sizes[groups[-1][0]] * max_ratio, sizes[groups[-1][0]] + 1):
                groups[-1].append(m)
            else:
                groups.append([m])
        self.num_molecules = num_molecules
        self.counts = counts
        self.buckets = []
        flat, mols = [], []
        for group in groups:
            g = torch.tensor(group, device=device)
            n_max = sizes[group[-1]]
            local = torch.arange(n_max, device=device)
            mask = local[None, :] < counts[g][:, None]
            index = starts[g][:, None] + torch.where(mask, local[None, :], 0)
            equal = sizes[group[0]] == n_max
            self.buckets.append((g, index, None if equal else mask))
            flat.append(index.reshape(-1) if equal else index[mask])
            mols.append(g)
        # One gather for all buckets (a gather per bucket would cost a full-size
        # zero-fill per bucket in the backward pass).
        self.gather = torch.cat([index.reshape(-1) for _, index, _ in self.buckets]) if flat else batch.new_zeros(0)
        self.bucket_shapes = [tuple(index.shape) for _, index, _ in self.buckets]
        self.inverse = torch.argsort(torch.cat(flat)) if flat else batch.new_zeros(0)
        self.molecules = torch.cat(mols) if mols else batch.new_zeros(0)


    def split(self, packed: Tensor):
        """Yield ``(dense [Bb, nb, C], mask)`` per bucket from packed rows, with a single gather."""
        # torch.split (not slicing): its backward is one concatenation, not a zero-fill per bucket.
        chunks = packed.index_select(0, self.gather).split([b * n for b, n in self.bucket_shapes])
        for chunk, (_, _, mask), (b, n) in zip(chunks, self.buckets, self.bucket_shapes):
            yield chunk.view(b, n, -1), mask


def _heads(t: Tensor, heads: int) -> Tensor:
    """``[B, n, C] -> [B, heads, n, C / heads]``."""
    b, n, c = t.shape
    return t.view(b, n, heads, c // heads).transpose(1, 2)


def _merge(t: Tensor) -> Tensor:
    """``[B, heads, n, d] -> [B, n, heads * d]``."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class AttentionPooling(Readout):
    r"""Attention-based pooling (ABP): a Set Transformer readout (paper Eq. 5-11).

    .. math::
        Z &= \mathrm{SAB}^{n_{enc}}(\mathrm{Linear}_\phi(X)) \\
        \mathrm{PMA}_k(Z) &= \mathrm{MAB}(S_k, \mathrm{Linear}_\phi(Z)) \\
        \mathrm{ABP}(X) &= \mathrm{Linear}_\phi\big(\mathrm{SAB}^{n_{dec}}(\mathrm{PMA}_k(Z))\big)

    with :math:`S_k` ``k`` learnable seed vectors; the ``k`` outputs are averaged
    (``concat=False``, the paper's choice) or concatenated. Padding is masked in
    every attention, so results do not depend on batch composition.

    Args:
        in_channels: per-atom feature width.
        out_channels: molecule feature width (default ``hidden_channels``, or
            ``k * hidden_channels`` with ``concat=True`` and no output projection).
        hidden_channels: attention width (default ``in_channels``).
        heads: attention heads (default ``8``); must divide ``hidden_channels``.
        num_encoder_blocks: SABs in the encoder (default ``2``).
        num_seeds: PMA seed vectors ``k`` (default ``1``).
        num_decoder_blocks: SABs in the decoder (default ``1``).
        concat: concatenate the ``k`` seed outputs instead of averaging (default ``False``).
        layer_norm: layer norms in every block (default ``False``, as the paper).
        dropout: attention dropout (default ``0``).
        input_projection: apply the input :math:`\mathrm{Linear}_\phi` (default ``True``).
        output_projection: apply the output :math:`\mathrm{Linear}_\phi` (default ``True``).
        bucket_ratio: size ratio within one attention bucket (default ``1.1``; see :class:`SetLayout`).

    Implementation: linear layers run on the packed atoms (no padding); attention
    runs per size bucket through fused ``scaled_dot_product_attention``, with
    padding masked as keys. This is exact (same numbers as a padded implementation)
    and avoids most of the padding waste of ``to_dense_batch``.
    """

    weighted = True

    def __init__(self, in_channels: int, out_channels: Optional[int] = None,
                 hidden_channels: Optional[int] = None, heads: int = 8,
                 num_encoder_blocks: int = 2, num_seeds: int = 1, num_decoder_blocks: int = 1,
                 concat: bool = False, layer_norm: bool = False, dropout: float = 0.0,
                 input_projection: bool = True, output_projection: bool = True,
                 bucket_ratio: float = 1.1):
        hidden = hidden_channels or in_channels
        if hidden % heads != 0:
            raise ValueError(f"heads ({heads}) must divide hidden_channels ({hidden})")
        if num_seeds < 1:
            raise ValueError(f"num_seeds must be >= 1, got {num_seeds}")
        if not input_projection and hidden != in_channels:
            raise ValueError("without an input projection hidden_channels must equal in_channels")
        pooled = hidden * num_seeds if concat else hidden
        if out_channels is None:
            out_channels = hidden if output_projection else pooled
        elif not output_projection and out_channels != pooled:
            raise ValueError(f"without an output projection out_channels must be {pooled}")
        super().__init__(in_channels, out_channels)
        self.hidden_channels, self.heads, self.num_seeds, self.concat = hidden, heads, num_seeds, concat
        self.bucket_ratio = bucket_ratio
        self.input_lin = Linear(in_channels, hidden) if input_projection else None
        self.encoders = torch.nn.ModuleList(
            MultiheadAttentionBlock(hidden, heads, layer_norm, dropout) for _ in range(num_encoder_blocks))
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

    def _encode(self, x: Tensor, batch: Tensor, dim_size: int) -> Tuple[Tensor, SetLayout]:
        """Packed encoded atoms ``Linear_phi(SAB^n(Linear_phi(X)))``, ready as PMA keys, and their layout."""
        layout = SetLayout(batch, dim_size, self.bucket_ratio)
        if self.input_lin is not None:
            x = self.input_lin(x).relu()
        for block in self.encoders:
            x = block.forward_packed(x, layout)
        return self.pma_lin(x).relu(), layout

    def pool(self, x, batch, dim_size):
        keys, layout = self._encode(x, batch, dim_size)
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
        keys, _ = self._encode(x, batch, dim_size)
        return self.pma.pool_weights_packed(self.seeds[0], keys, batch, dim_size).mean(dim=(1, 2))

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", hidden_channels={self.hidden_channels}, heads={self.heads}, "
                f"num_seeds={self.num_seeds}, concat={self.concat}")


READOUTS = {
    "sum": SumPooling,
    "mean": MeanPooling,
    "max": MaxPooling,
    "wa": WeightedAveragePooling,
    "owa": OrbitalWeightedAveragePooling,
    "abp": AttentionPooling,
}


def build_readout(name: str, in_channels: int, **kwargs) -> Readout:
    """Readout by name (``sum``, ``mean``, ``max``, ``wa``, ``owa``, ``abp``)."""
    try:
        cls = READOUTS[name.lower()]
    except KeyError:
        raise ValueError(f"unknown readout {name!r}; choose one of {sorted(READOUTS)}") from None
    return cls(in_channels, **kwargs)

"""Atomistic models: backbone -> readout -> head.

The backbones are PyG's SchNet and DimeNet++ building blocks driven by our
pure-torch graph ops (:mod:`abp_core.graph`), with the per-atom representation
kept at hidden width as in the paper (SchNet without its per-atom ``lin1``/``lin2``;
DimeNet++ output blocks emitting vectors). Any readout from
:mod:`abp_core.readouts` pools them, and a small MLP head maps to the targets.

>>> model = build_model("schnet", "abp", num_targets=1, hidden_channels=64, num_interactions=3)
>>> pred = model(batch)                 # [num_molecules, 1]
>>> w = model.atom_weights(batch)       # [num_atoms], sums to 1 per molecule
"""
from __future__ import annotations

import copy
import functools
import inspect
import math
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch_geometric.nn.models import SchNet
from torch_geometric.nn.models.dimenet import (BesselBasisLayer, EmbeddingBlock, InteractionPPBlock,
                                               OutputPPBlock, SphericalBasisLayer)
from torch_geometric.nn.resolver import activation_resolver
from torch_geometric.nn.models.schnet import ShiftedSoftplus

from . import kernels
from .graph import (RadiusInteractionGraph, check_batch_vector, gather_mul_scatter, radius_graph, triplet_message,
                    triplets, undirected_pairs)
from .readouts import OrbitalWeightedAveragePooling, Readout, build_readout

__all__ = ["SchNetBackbone", "DimeNetPlusPlusBackbone", "AtomisticModel", "build_model", "BACKBONES"]

MAX_ATOMIC_NUMBER = 100


def _check_inputs(z: Tensor, pos: Tensor, batch: Optional[Tensor]) -> Tensor:
    if z.dim() != 1 or z.numel() == 0:
        raise ValueError(f"z must be a non-empty 1-D tensor of atomic numbers, got shape {tuple(z.shape)}")
    if pos.shape != (z.numel(), 3):
        raise ValueError(f"pos must have shape [{z.numel()}, 3], got {tuple(pos.shape)}")
    if not bool(torch.isfinite(pos).all()):
        raise ValueError("pos contains NaN or infinite coordinates")
    if bool(((z < 1) | (z >= MAX_ATOMIC_NUMBER)).any()):
        raise ValueError(f"atomic numbers must lie in 1..{MAX_ATOMIC_NUMBER - 1}, got {z.unique().tolist()}")
    if batch is None:
        batch = torch.zeros_like(z)
    check_batch_vector(batch, z.numel())
    return batch


def gaussian_features(dist: Tensor, offset: Tensor, coeff: float) -> Tensor:
    """PyG's Gaussian smearing ``exp(coeff * (d - mu)^2)`` with sub-normal results flushed to zero.

    Values below the smallest normal float (``exp(-87.3)`` in float32) are set to exactly 0.
    They are far below anything they are added to, so results do not change, but x86 CPUs
    process sub-normal numbers in microcode: with them a filter-network matmul runs 5-60x slower.
    """
    arg = coeff * torch.pow(dist.view(-1, 1) - offset.view(1, -1), 2)
    arg = arg.masked_fill(arg < math.log(torch.finfo(arg.dtype).tiny), float("-inf"))
    return torch.exp(arg)


def shifted_softplus(x: Tensor, shift: float) -> Tensor:
    """``softplus(x) - shift`` (PyG's ``ShiftedSoftplus`` stores ``shift = log 2`` rounded to float32)."""
    return F.softplus(x) - shift


class _ShiftedSoftplus:
    """Native epilogue ``softplus(y + b) - shift``; its backward takes ``softplus'(z) = 1 - exp(-(y + shift))``
    from the output, so no pre-activation is stored."""
    keeps_output = True

    def __init__(self, shift: float):
        self.shift = shift

    def forward(self, y: Tensor, bias: Tensor):
        kernels.shifted_softplus(y, bias, self.shift)
        return ()

    def backward(self, grad: Tensor, y: Tensor, state):
        return kernels.shifted_softplus_backward(grad, y, self.shift)


class _ScaleRows:
    """Native epilogue ``(y + b) * scale[:, None]`` (``scale`` gets no gradient)."""
    keeps_output = False

    def __init__(self, scale: Tensor):
        self.scale = scale

    def forward(self, y: Tensor, bias: Tensor):
        kernels.bias_scale_rows(y, bias, self.scale)
        return (self.scale,)

    def backward(self, grad: Tensor, y, state):
        return kernels.scale_rows_backward(grad, state[0])


def linear_scale_rows(x: Tensor, weight: Tensor, bias: Tensor, scale: Tensor) -> Tensor:
    """``F.linear(x, weight, bias) * scale[:, None]`` (SchNet's filters times the cosine cutoff); native
    kernels where they apply and ``scale`` needs no gradient."""
    if kernels.native_linear(x, weight) and not scale.requires_grad and scale.is_contiguous():
        return kernels.linear_epilogue(x, weight, bias, _ScaleRows(scale))
    return F.linear(x, weight, bias) * scale.unsqueeze(-1)


def linear_shifted_softplus(x: Tensor, weight: Tensor, bias: Tensor, shift: float) -> Tensor:
    """``shifted_softplus(F.linear(x, weight, bias), shift)``; native kernels where they apply (CPU float32,
    no autocast, a multiple of 16 outputs)."""
    if kernels.native_linear(x, weight):
        return kernels.linear_epilogue(x, weight, bias, _ShiftedSoftplus(shift))
    return shifted_softplus(F.linear(x, weight, bias), shift)


class SchNetBackbone(torch.nn.Module):
    r"""SchNet (Schütt et al.) returning per-atom features of width ``hidden_channels``.

    Reuses PyG's embedding, Gaussian smearing and interaction blocks; PyG's per-atom
    ``lin1``/``lin2`` output layers are dropped so the readout sees the full
    representation. Defaults follow the paper (256 hidden, 256 filters, 8 interactions).

    ``fast=True`` (default) runs the same parameters through a leaner forward with the same
    numbers (fp32 ``allclose``; see ``tests/test_performance_paths.py``): distances, Gaussian
    features and cosine cutoff are computed once per unordered atom pair instead of once per
    directed edge and interaction, the filter networks run per pair (half the edges), the
    first filter layer of all interactions is one matmul, sub-normal Gaussian features are
    flushed to zero, and the continuous-filter sum keeps no per-edge tensor for the backward.
    ``fast=False`` is PyG's own forward (the reference).
    """

    def __init__(self, hidden_channels: int = 256, num_filters: int = 256, num_interactions: int = 8,
                 num_gaussians: int = 50, cutoff: float = 10.0, max_num_neighbors: int = 32,
                 fast: bool = True):
        super().__init__()
        schnet = SchNet(hidden_channels=hidden_channels, num_filters=num_filters,
                        num_interactions=num_interactions, num_gaussians=num_gaussians, cutoff=cutoff,
                        interaction_graph=RadiusInteractionGraph(cutoff, max_num_neighbors))
        self.hidden_channels = self.out_channels = hidden_channels
        self.num_filters, self.cutoff, self.max_num_neighbors = num_filters, cutoff, max_num_neighbors
        self.fast = fast
        self._compiled = None
        self.embedding = schnet.embedding
        self.interaction_graph = schnet.interaction_graph
        self.distance_expansion = schnet.distance_expansion
        self.interactions = schnet.interactions

    def reset_parameters(self):
        self.embedding.reset_parameters()
        for interaction in self.interactions:
            interaction.reset_parameters()

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor) -> Tensor:
        if self.fast:
            return self._forward_fast(z, pos, batch)
        h = self.embedding(z)
        edge_index, edge_weight = self.interaction_graph(pos, batch)
        edge_attr = self.distance_expansion(edge_weight)
        for interaction in self.interactions:
            h = h + interaction(h, edge_index, edge_weight, edge_attr)
        return h

    def _forward_fast(self, z: Tensor, pos: Tensor, batch: Tensor) -> Tensor:
        num_nodes, f = z.numel(), self.num_filters
        h = self.embedding(z)
        edge_index = radius_graph(pos, self.cutoff, batch, self.max_num_neighbors)
        src, dst = edge_index
        a, b, pair = undirected_pairs(edge_index, num_nodes)
        dist = (pos[a] - pos[b]).norm(dim=-1)  # the same numbers as for either directed edge
        rbf = gaussian_features(dist, self.distance_expansion.offset, self.distance_expansion.coeff)
        cut = (0.5 * (torch.cos(dist * math.pi / self.cutoff) + 1.0)).unsqueeze(-1)
        interact = self._compiled if self._compiled is not None else self._interact
        return interact(h, rbf, cut, src, dst, pair, a, b)

    def _interact(self, h: Tensor, rbf: Tensor, cut: Tensor, src: Tensor, dst: Tensor, pair: Tensor,
                  a: Tensor, b: Tensor) -> Tensor:
        """The interactions of the fast path, from per-pair Gaussian features ``rbf`` and cutoff ``cut``."""
        f, num_nodes = self.num_filters, h.size(0)
        first = [block.mlp[0] for block in self.interactions]
        hidden = linear_shifted_softplus(rbf, torch.cat([m.weight for m in first]), torch.cat([m.bias for m in first]),
                                         float(self.interactions[0].mlp[1].shift))  # [P, T * F]
        compiling = torch.compiler.is_compiling()
        # split (not slicing): its backward is one concatenation, not a zero-filled [P, T * F] per block
        for block, part in zip(self.interactions, hidden.split(f, dim=1)):
            filters = linear_scale_rows(part, block.mlp[2].weight, block.mlp[2].bias, cut.view(-1))
            x = F.linear(h, block.conv.lin1.weight)
            if compiling:  # plain ops: the compiler fuses gather, product and scatter
                if src.numel() == 2 * filters.size(0):  # every pair in both directions
                    msg_a, msg_b = x.index_select(0, b) * filters, x.index_select(0, a) * filters
                    x = msg_a.new_zeros(num_nodes, f).index_add_(0, a, msg_a).index_add_(0, b, msg_b)
                else:
                    msg = x.index_select(0, src) * filters.index_select(0, pair)
                    x = msg.new_zeros(num_nodes, f).index_add_(0, dst, msg)
            else:
                x = gather_mul_scatter(x, filters, src, dst, pair, num_nodes, pairs=(a, b))
            h = h + block.lin(block.act(block.conv.lin2(x)))
        return h

    def compile_interactions(self, **kwargs) -> "SchNetBackbone":
        """Compile the fast path's interactions with :func:`torch.compile` (``dynamic=True``: batches differ in
        size). Needs a C++ compiler; the first steps take a while to compile. Returns ``self``."""
        kwargs.setdefault("dynamic", True)
        self._compiled = torch.compile(self._interact, **kwargs)
        return self


@functools.lru_cache(maxsize=8)
def _spherical_basis_template(num_spherical: int, num_radial: int, cutoff: float,
                              envelope_exponent: int) -> SphericalBasisLayer:
    return SphericalBasisLayer(num_spherical, num_radial, cutoff, envelope_exponent)


def _spherical_basis(num_spherical, num_radial, cutoff, envelope_exponent) -> SphericalBasisLayer:
    """PyG's spherical basis, whose sympy set-up takes ~9 s, built once per configuration and copied."""
    return copy.deepcopy(_spherical_basis_template(num_spherical, num_radial, float(cutoff), envelope_exponent))


class DimeNetPlusPlusBackbone(torch.nn.Module):
    r"""DimeNet++ (Gasteiger et al.) returning per-atom vectors of width ``out_channels``.

    Reuses PyG's basis, embedding, interaction and output blocks; each output block
    emits an ``out_channels``-vector per atom (default: ``hidden_channels``, as in
    the paper) and their sum is the per-atom representation. The output layers use
    ``glorot_orthogonal`` initialisation: PyG's zero init suits scalar sums but
    would hand the readout all-zero features at the start of training.
    Defaults follow the paper (256 hidden, 6 blocks, 64 int-emb, 8 basis-emb, 256 out-emb).

    ``fast=True`` (default) runs the same parameters through :meth:`_forward_fast` (same numbers,
    fp32 ``allclose``; about a fifth of the memory with ``checkpoint=True``); ``fast=False`` is
    PyG's own forward (the reference).
    """

    def __init__(self, hidden_channels: int = 256, out_channels: Optional[int] = None, num_blocks: int = 6,
                 int_emb_size: int = 64, basis_emb_size: int = 8, out_emb_channels: int = 256,
                 num_spherical: int = 7, num_radial: int = 6, cutoff: float = 5.0,
                 max_num_neighbors: int = 32, envelope_exponent: int = 5, fast: bool = True,
                 checkpoint: bool = True):
        super().__init__()
        self.fast, self.checkpoint = fast, checkpoint
        out_channels = out_channels or hidden_channels
        act = activation_resolver("swish")
        self.hidden_channels, self.out_channels = hidden_channels, out_channels
        self.cutoff, self.max_num_neighbors = cutoff, max_num_neighbors
        # Same blocks and layout as PyG's DimeNetPlusPlus (state dicts are interchangeable).
        self.rbf = BesselBasisLayer(num_radial, cutoff, envelope_exponent)
        self.sbf = _spherical_basis(num_spherical, num_radial, cutoff, envelope_exponent)
        self.emb = EmbeddingBlock(num_radial, hidden_channels, act)
        self.output_blocks = torch.nn.ModuleList(
            OutputPPBlock(num_radial, hidden_channels, out_emb_channels, out_channels, 3, act, "glorot_orthogonal")
            for _ in range(num_blocks + 1))
        self.interaction_blocks = torch.nn.ModuleList(
            InteractionPPBlock(hidden_channels, int_emb_size, basis_emb_size, num_spherical, num_radial, 1, 2, act)
            for _ in range(num_blocks))

    def reset_parameters(self):
        self.rbf.reset_parameters()
        self.emb.reset_parameters()
        for block in (*self.output_blocks, *self.interaction_blocks):
            block.reset_parameters()

    def forward(self, z: Tensor, pos: Tensor, batch: Tensor) -> Tensor:
        edge_index = radius_graph(pos, self.cutoff, batch, self.max_num_neighbors)
        i, j, idx_i, idx_j, idx_k, idx_kj, idx_ji = triplets(edge_index, num_nodes=z.size(0))
        dist = (pos[i] - pos[j]).pow(2).sum(dim=-1).sqrt()
        pos_jk, pos_ij = pos[idx_j] - pos[idx_k], pos[idx_i] - pos[idx_j]
        angle = torch.atan2(torch.cross(pos_ij, pos_jk, dim=1).norm(dim=-1), (pos_ij * pos_jk).sum(dim=-1))
        rbf = self.rbf(dist)
        if self.fast:
            return self._forward_fast(z, rbf, self.sbf(dist, angle, idx_kj), i, j, idx_kj, idx_ji)
        sbf = self.sbf(dist, angle, idx_kj)
        x = self.emb(z, rbf, i, j)
        h = self.output_blocks[0](x, rbf, i, num_nodes=z.size(0))
        for interaction, output in zip(self.interaction_blocks, self.output_blocks[1:]):
            x = interaction(x, rbf, sbf, idx_kj, idx_ji)
            h = h + output(x, rbf, i, num_nodes=z.size(0))
        return h

    def _forward_fast(self, z, rbf, sbf, i, j, idx_kj, idx_ji) -> Tensor:
        """Same numbers as PyG's forward, at a fraction of the memory.

        * the first spherical-basis layer of all blocks is one matmul over the triplets;
        * the triplet interaction (:func:`~abp_core.graph.triplet_message`) is chunked and stores
          no per-triplet product;
        * with ``checkpoint`` (default), each block (embedding or interaction, with its output
          block) keeps only its input edge messages for the backward and recomputes the rest
          (one extra forward of the blocks, about 9 GB -> under 2 GB at batch 128 on QM9).
        """
        from torch.utils.checkpoint import checkpoint

        num_nodes, b = z.size(0), self.interaction_blocks[0].lin_sbf1.out_features if self.interaction_blocks else 0
        if self.interaction_blocks:  # [T, blocks * basis_emb], sbf itself needs no gradient
            s_all = F.linear(sbf, torch.cat([blk.lin_sbf1.weight for blk in self.interaction_blocks])).split(b, dim=1)
        else:
            s_all = []
        del sbf

        def run(fn, *args):
            if self.checkpoint and torch.is_grad_enabled():
                return checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=False)
            return fn(*args)

        def first(rbf):
            x = self.emb(z, rbf, i, j)
            return x, self.output_blocks[0](x, rbf, i, num_nodes=num_nodes)

        def block(x, rbf, s, interaction, output):
            x = self._interaction(interaction, x, rbf, s, idx_kj, idx_ji)
            return x, output(x, rbf, i, num_nodes=num_nodes)

        x, h = run(first, rbf)
        for interaction, output, s in zip(self.interaction_blocks, self.output_blocks[1:], s_all):
            x, dh = run(block, x, rbf, s, interaction, output)
            h = h + dh
        return h

    @staticmethod
    def _interaction(blk, x: Tensor, rbf: Tensor, s: Tensor, idx_kj: Tensor, idx_ji: Tensor) -> Tensor:
        """PyG's ``InteractionPPBlock.forward`` with the triplet part fused (``s = lin_sbf1(sbf)`` given)."""
        x_ji = blk.act(blk.lin_ji(x))
        x_kj = blk.act(blk.lin_kj(x))
        x_kj = x_kj * blk.lin_rbf2(blk.lin_rbf1(rbf))
        x_kj = blk.act(blk.lin_down(x_kj))
        x_kj = triplet_message(x_kj, s, blk.lin_sbf2.weight, idx_kj, idx_ji, x.size(0))
        x_kj = blk.act(blk.lin_up(x_kj))
        h = x_ji + x_kj
        for layer in blk.layers_before_skip:
            h = layer(h)
        h = blk.act(blk.lin(h)) + x
        for layer in blk.layers_after_skip:
            h = layer(h)
        return h


BACKBONES = {"schnet": SchNetBackbone, "dimenet++": DimeNetPlusPlusBackbone}


class MLPHead(torch.nn.Sequential):
    """``d -> d/2 -> d/2 -> num_targets`` with shifted softplus, as in the paper's code."""

    def __init__(self, in_channels: int, num_targets: int):
        hidden = max(in_channels // 2, 1)
        super().__init__(torch.nn.Linear(in_channels, hidden), ShiftedSoftplus(),
                         torch.nn.Linear(hidden, hidden), ShiftedSoftplus(),
                         torch.nn.Linear(hidden, num_targets))

    def reset_parameters(self):
        for m in self:
            if isinstance(m, torch.nn.Linear):
                m.reset_parameters()


class AtomisticModel(torch.nn.Module):
    """Backbone -> readout -> MLP head, on PyG batches with ``z``, ``pos`` and ``batch``."""

    def __init__(self, backbone: torch.nn.Module, readout: Readout, head: torch.nn.Module):
        super().__init__()
        self.backbone, self.readout, self.head = backbone, readout, head

    def atom_features(self, batch) -> Tuple[Tensor, Tensor]:
        z, pos = batch.z, batch.pos
        vec = getattr(batch, "batch", None)
        vec = _check_inputs(z, pos, vec)
        return self.backbone(z, pos, vec), vec

    def forward(self, batch, return_atom_weights: bool = False):
        """Predictions ``[num_molecules, num_targets]`` (and per-atom weights if asked and available)."""
        h, vec = self.atom_features(batch)
        num_molecules = int(vec[-1]) + 1
        out = self.head(self.readout(h, vec, dim_size=num_molecules))
        if not return_atom_weights:
            return out
        weights = self.readout.atom_weights(h, vec) if self.readout.weighted else None
        return out, weights

    def atom_weights(self, batch) -> Tensor:
        """The readout's per-atom weights (WA, OWA, ABP)."""
        h, vec = self.atom_features(batch)
        return self.readout.atom_weights(h, vec)

    def auxiliary_loss(self, batch, weights: Optional[Tensor]) -> Optional[Tensor]:
        """OWA's orbital loss on this batch, ``None`` for other readouts."""
        if not isinstance(self.readout, OrbitalWeightedAveragePooling):
            return None
        key = self.readout.coefficient_key
        coeff = getattr(batch, key, None)
        if coeff is None:
            raise ValueError(f"OWA readout needs per-atom '{key}' on every molecule "
                             "(attach them with abp_core.orbitals.AttachOrbitalLabels)")
        return self.readout.orbital_loss(weights, coeff, batch.batch)


def _split_kwargs(fn, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    names = set(inspect.signature(fn).parameters)
    return {k: kwargs.pop(k) for k in list(kwargs) if k in names}


def build_model(backbone: str = "schnet", readout: str = "sum", num_targets: int = 1,
                readout_kwargs: Optional[Dict[str, Any]] = None, compile: bool = False,
                **hparams) -> AtomisticModel:
    """Model factory.

    Args:
        backbone: ``"schnet"`` or ``"dimenet++"``.
        readout: ``"sum"``, ``"mean"``, ``"max"``, ``"wa"``, ``"owa"`` or ``"abp"``.
        num_targets: outputs of the head.
        readout_kwargs: options of the readout (e.g. ``heads``, ``num_seeds``, ``beta``).
        compile: compile the SchNet fast path's interactions with :func:`torch.compile`
            (needs a C++ compiler; the first steps take ~40 s; default ``False``).
        **hparams: backbone options (e.g. ``hidden_channels=64, num_interactions=3``;
            ``fast=False`` selects PyG's reference forward, see :class:`SchNetBackbone`).
    """
    try:
        backbone_cls = BACKBONES[backbone.lower()]
    except KeyError:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {sorted(BACKBONES)}") from None
    if num_targets < 1:
        raise ValueError(f"num_targets must be >= 1, got {num_targets}")
    kwargs = dict(hparams)
    backbone_kwargs = _split_kwargs(backbone_cls.__init__, kwargs)
    if kwargs:
        raise ValueError(f"unknown backbone options for {backbone!r}: {sorted(kwargs)}")
    net = backbone_cls(**backbone_kwargs)
    if compile:
        if not hasattr(net, "compile_interactions") or not net.fast:
            raise ValueError("compile=True is available for the SchNet fast path (fast=True) only")
        net.compile_interactions()
    pool = build_readout(readout, net.out_channels, **(readout_kwargs or {}))
    return AtomisticModel(net, pool, MLPHead(pool.out_channels, num_targets))

"""A post-LN encoder's residual sums on a per-tensor integer chip: the sum beside its host LayerNorm, the projection
feeding it split by output range.

On a DPU the LayerNorms run on the host; each reads ``z = y + b`` (``y`` the previous norm's output, ``b`` an
attention or feed-forward projection). all-MiniLM-L6's feed-forward projections write a few hidden dimensions at
40-220x the median one (layer 0: dimension 99 at 195, the next at 5.4, the median 0.9): one power-of-two scale per
tensor leaves the others nothing, and those tensors alone cost the fpga model ~47 of its 60 cosine points
(docs/decisions.md, session 50). Per-tensor weights cannot take residual_scaling.py's per-dimension scales, so here:
* the residual Add runs on the host in float with its norms, reading the previous norm's float output
  (host_edges.py); the chip sends ``b`` where it sent ``z``;
* a projection (a Gemm) whose output dimensions lie more than ``OUTLIER_RATIO`` apart is split into
  blocks of output columns by their calibration range, each block an int8 layer with its own scales, joined in
  float on the host by a Concat and a Gather that restores the column order (dense_blocks.py).
Both are exact in float.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from lepton_cli.passes._quantize.dense_blocks import split_dense
from lepton_cli.passes._quantize.residual_scaling import Site, dimension_absmax, find_sites

from lepton_cli.model.graph_edit import FreshNames, GraphIndex, drop_unused_initializers

OUTLIER_RATIO = 16.0  # largest dimension over the median: past it the median keeps under 8 of int8's 127 levels
BLOCK_RATIO = 4.0  # a block's columns lie within 4x of its largest: each keeps over 5 bits of its own
MAX_BLOCKS = 4  # each block is one more layer on the chip and one more tensor to the host


@dataclass
class Blocked:
    sites: int
    branches_split: dict[str, int]  # projection name -> blocks
    float_nodes: list[str]  # per site: the previous norm, the join of the blocks and what leads to the Add, Add, norm


def column_blocks(absmax: np.ndarray) -> tuple[np.ndarray, list[int]] | None:
    """(column order, block boundaries) by range, largest first, or None when the ranges lie within
    ``OUTLIER_RATIO`` of the median."""
    if float(absmax.max()) <= OUTLIER_RATIO * max(float(np.median(absmax)), 1e-12):
        return None
    order = np.argsort(-absmax, kind="stable")
    bounds = [0]
    for k in range(1, len(order)):
        if absmax[order[k]] * BLOCK_RATIO < absmax[order[bounds[-1]]] and len(bounds) < MAX_BLOCKS:
            bounds.append(k)
    return order, bounds + [len(order)]


def _split_branch(index: GraphIndex, names: FreshNames, site: Site, absmax: np.ndarray) -> tuple[list[str], int]:
    """Split the site's projection in place: (the float nodes that join its blocks and lead to the Add, blocks);
    ([], 1) when it stays whole."""
    node = site.branch.node
    planned = column_blocks(absmax)
    if planned is None:
        return [], 1
    order, bounds = planned
    split_dense(index, names, node, 0 if site.branch.kind == "gemm_t" else 1, bounds, order)
    join = index.producer[node.output[0]]  # the Gather restoring the order, after the blocks' Concat
    return [index.producer[join.input[0]].name, join.name, *site.between], len(bounds) - 1


def split_residual_branches(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> Blocked:
    """Rewrite every site of ``model`` in place (see the module doc)."""
    sites = find_sites(model)
    if not sites:
        return Blocked(0, {}, [])
    absmax = dimension_absmax(model, [s.branch.node.output[0] for s in sites], feeds)
    index, names = GraphIndex(model.graph), FreshNames(model)
    float_nodes: list[str] = []
    split: dict[str, int] = {}
    for site in sites:
        ranges = absmax.get(site.branch.node.output[0])
        # a 2-D Gemm's output columns are its last axis: the blocks' Concat joins them on axis 1
        if site.branch.node.op_type == "Gemm" and ranges is not None:
            joined, blocks = _split_branch(index, names, site, ranges)
            if blocks > 1:
                split[site.branch.node.name] = blocks
                float_nodes += joined
        float_nodes += [name for name in (site.previous.name, site.add.name, site.norm.name) if name not in float_nodes]
    if split:
        drop_unused_initializers(model)  # the whole weights the blocks were cut from
    return Blocked(len(sites), split, float_nodes)

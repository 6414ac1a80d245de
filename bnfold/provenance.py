"""What each folded layer was made from: the evidence the analytic check (`bnfold.verify`,
`bnfold.verify_branches`) recomputes every written tensor from, and the originals the rewrite
refolds from. Plain records: the rewrite fills them, verification reads them, neither imports the
other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from bnfold.branch_math import Expr
from bnfold.fold_math import ChannelAffine, ChannelSpread
from bnfold.protos import copy_message
from bnfold.rules.layers import Layer


@dataclass
class ChainSegment:
    """Original affine nodes folded into a layer in one pass, as they acted on one tensor."""

    nodes: list[onnx.NodeProto]  # copies, in data order
    rank: int | None  # rank of the tensor they act on
    spread: ChannelSpread | None = None  # reached the layer's input through a Flatten/Reshape
    channels: tuple[int, int] | None = None  # (first, count): the layer's slice of the chain (after a Concat)
    scale_only: bool = False  # the layer took the chain's scale only (the second layer of an Add)


@dataclass
class LayerProvenance:
    """What a folded layer was made from. Each pass that folds into the layer adds a segment:
    segments act on different tensors (layout nodes may sit between them), so each is re-derived
    on its own and then composed."""

    scope: str
    layer_node: onnx.NodeProto  # a copy of the original layer node
    layer_params: dict[str, np.ndarray]  # its constant inputs as stored, by input name
    pre: list[ChainSegment]  # folded in front, in data order
    post: list[ChainSegment]  # folded behind, in data order
    constants: dict[str, np.ndarray]  # the affine nodes' constant inputs as stored
    written: list[str]  # initializer names the folded node(s) read, in input order
    output: str  # the output name of the folded layer


@dataclass
class BranchProvenance:
    """What a merged Conv was made from, for the analytic check (`bnfold.verify_branches`)."""

    scope: str
    output: str
    written: list[str]  # [weight, bias] of the merged Conv
    expr: Expr  # the sum, by value names
    convs: dict[str, LayerProvenance]  # each branch Conv's original parameters and the maps folded into it
    affine_nodes: dict[str, onnx.NodeProto]  # copies of the maps inside the sum, by output name
    constants: dict[str, np.ndarray]  # their constant inputs as stored
    rank: int  # rank of the tensors the maps act on


@dataclass
class OriginalLayer:
    """A folded layer's original parameters and the maps folded into it so far: a later pass
    refolds from these, so the layer is still rounded once."""

    layer: Layer  # with a copy of the original node: the graph's node is overwritten
    pre: ChannelAffine | None
    post: ChannelAffine | None


def copy_node(node: onnx.NodeProto) -> onnx.NodeProto:
    return copy_message(node)

"""Push the layout Transposes that channels-last I/O adds through elementwise ops, and compose or cancel
adjacent pairs, so that a model whose first and last ops are elementwise keeps few of them."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from lepton_cli.model.graph_edit import FreshNames, GraphIndex, drop_unused_initializers, subgraph_names
from lepton_cli.model.op_traits import DEFAULT_DOMAINS, attr

ELEMENTWISE_UNARY = frozenset(
    "Relu LeakyRelu Sigmoid HardSigmoid HardSwish Tanh Clip Abs Neg Exp Log Sqrt Erf Elu Selu Softplus Softsign "
    "Cast Identity Floor Ceil Round Reciprocal Sign Not Gelu Mish ThresholdedRelu Celu Sin Cos".split()
)
ELEMENTWISE_BINARY = frozenset(
    "Add Sub Mul Div Pow Max Min PRelu Equal Less Greater And Or Xor Mod LessOrEqual GreaterOrEqual".split()
)


class Transposer:
    """Push layout Transposes through elementwise ops and compose/cancel adjacent ones."""

    def __init__(self, model: onnx.ModelProto, names: FreshNames, down: set[str], up: set[str]):
        # Input-side Transposes (names in ``down``) only move down, output-side ones (``up``) only
        # up: moving the same Transpose both ways would undo itself forever.
        self.down, self.up = down, up
        self.model = model
        self.g = model.graph
        self.names = names
        self.protected = {o.name for o in self.g.output} | subgraph_names(self.g)
        self.ix = GraphIndex(self.g)

    def _permuted_const(self, name: str, perm: tuple[int, ...], inverse: bool) -> str | None:
        """A copy of constant ``name`` laid out for the other side of the Transpose ``perm``."""
        value = self.ix.const(name)
        if value is None or value.ndim > len(perm):
            return None
        if value.ndim == 0 or value.size == 1:
            return name  # scalars broadcast the same way in every layout
        full = value.reshape((1,) * (len(perm) - value.ndim) + value.shape)
        order = tuple(np.argsort(perm)) if inverse else perm
        new = self.names.fresh(f"{name}__{'nchw' if inverse else 'nhwc'}")
        return self.ix.add_initializer(new, np.ascontiguousarray(full.transpose(order)))

    def _movable(self, node: onnx.NodeProto, through: str, rank: int) -> bool:
        if len(node.output) != 1 or node.domain not in DEFAULT_DOMAINS:
            return False
        if node.op_type in ELEMENTWISE_UNARY:
            # Clip's min/max are scalars; every other unary op has one input.
            return node.input[0] == through and all(i in self.ix.inits or not i for i in node.input[1:])
        if node.op_type in ELEMENTWISE_BINARY:
            others = [i for i in node.input if i != through]
            return len(others) == 1 and others[0] in self.ix.inits and self.ix.const(others[0]).ndim <= rank
        return False

    def _move(self, node: onnx.NodeProto, anchor: onnx.NodeProto, after: bool) -> None:
        nodes = list(self.g.node)
        nodes.remove(node)
        nodes.insert(nodes.index(anchor) + (1 if after else 0), node)
        self.ix.reorder(nodes)

    def _push_down(self) -> bool:
        """Move an input-side Transpose below the elementwise op that alone reads it."""
        for t in list(self.g.node):
            if t.op_type != "Transpose" or t.name not in self.down or t.output[0] in self.protected:
                continue
            users = self.ix.readers(t.output[0])
            perm = tuple(attr(t, "perm", ()))
            if len(users) != 1 or not perm or not self._movable(users[0], t.output[0], len(perm)):
                continue
            u = users[0]
            for k, name in enumerate(u.input):
                if name == t.output[0]:
                    self.ix.set_input(u, k, t.input[0])
                elif u.op_type in ELEMENTWISE_BINARY and name:
                    moved = self._permuted_const(name, perm, inverse=True)
                    if moved is None:
                        return False
                    self.ix.set_input(u, k, moved)
            between = self.names.fresh(f"{u.output[0]}__pre_transpose")
            out = u.output[0]
            self.ix.set_output(u, 0, between)
            self.ix.set_input(t, 0, between)
            self.ix.set_output(t, 0, out)
            self._move(t, u, after=True)
            return True
        return False

    def _pull_up(self) -> bool:
        """Move an output-side Transpose above the elementwise op that feeds it."""
        for t in list(self.g.node):
            if t.op_type != "Transpose" or t.name not in self.up:
                continue
            perm = tuple(attr(t, "perm", ()))
            u = self.ix.producer.get(t.input[0])
            if u is None or not perm or t.input[0] in self.protected or len(self.ix.readers(t.input[0])) != 1:
                continue
            live = [i for i in u.input if i and i not in self.ix.inits]
            if len(live) != 1 or not self._movable(u, live[0], len(perm)):
                continue
            for k, name in enumerate(u.input):
                if name and name != live[0] and u.op_type in ELEMENTWISE_BINARY:
                    moved = self._permuted_const(name, perm, inverse=False)
                    if moved is None:
                        return False
                    self.ix.set_input(u, k, moved)
            source = live[0]
            pre = self.names.fresh(f"{source}__transposed")
            u_out = t.output[0]
            self.ix.set_input(t, 0, source)
            self.ix.set_output(t, 0, pre)
            self.ix.set_input(u, list(u.input).index(source), pre)
            self.ix.set_output(u, 0, u_out)
            self._move(t, u, after=False)
            return True
        return False

    def _cancel(self, t1: onnx.NodeProto, t2: onnx.NodeProto) -> bool:
        """T2(T1(x)) is x: drop T2 (an Identity where its name must stay); True when T1 went too."""
        source = t1.input[0]
        producer = self.ix.producer.get(source)
        only_path = (
            len(self.ix.readers(source)) == 1
            and len(self.ix.readers(t1.output[0])) == 1
            and source not in self.protected
            and t1.output[0] not in self.protected
        )
        if t2.output[0] in self.protected and producer is not None and only_path:
            # x → P → T1 → T2 → graph output: P writes the graph output itself
            self.ix.set_output(producer, list(producer.output).index(source), t2.output[0])
            self.ix.remove(t2)
            self.ix.remove(t1)
            return True
        if t2.output[0] in self.protected:
            t2.op_type = "Identity"
            del t2.attribute[:]
            self.ix.set_input(t2, 0, source)
        else:
            self.ix.replace_uses(t2.output[0], source)
            self.ix.remove(t2)
        return False

    def _compose(self) -> bool:
        """Compose a Transpose that reads a Transpose into one (or cancel the pair)."""
        for t2 in list(self.g.node):
            if t2.op_type != "Transpose":
                continue
            t1 = self.ix.producer.get(t2.input[0])
            if t1 is None or t1.op_type != "Transpose":
                continue
            p1, p2 = tuple(attr(t1, "perm", ())), tuple(attr(t2, "perm", ()))
            if not p1 or len(p1) != len(p2):
                continue
            composed = tuple(p1[i] for i in p2)
            if composed == tuple(range(len(composed))):
                if self._cancel(t1, t2):
                    return True
            else:
                self.ix.set_input(t2, 0, t1.input[0])
                del t2.attribute[:]
                t2.attribute.append(helper.make_attribute("perm", list(composed)))
            if not self.ix.readers(t1.output[0]) and t1.output[0] not in self.protected:
                self.ix.remove(t1)  # T2 was its only reader
            return True
        return False

    def run(self) -> None:
        for _ in range(10 * len(self.g.node) + 10):  # each step removes or moves one Transpose
            if not (self._compose() or self._push_down() or self._pull_up()):
                break
        drop_unused_initializers(self.model)

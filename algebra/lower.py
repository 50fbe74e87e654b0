"""Stage 4, lower: model-level nodes -> one tensor expression per output tensor.

The tensor-expression IR (the kinds `Leaf`, `Lin`, `Map`, `Slice`, `Cat`, `Rows`, and
the symbolic scalars `Sym` that coefficients may be) is defined in `ir.py`, each kind
with all of its rules; the streamed reductions that symbolic coefficients read
(`Gram`, `GramMatrix`) in `reductions.py`. Both are re-exported here for the method
modules. Linear operations fold into one `Lin` (`ir.lin`): `ema` of fifty checkpoints
is one pass with one accumulator, and WARP's `init + c1*(m1-init) + c2*(m2-init)`
reads each input once per chunk.
"""

from __future__ import annotations

from typing import Any

from .arch import Arch, arch_of, layer_index
from .family import in_use
from .graph import Node
from .ir import (
    Cat,
    Coef,
    Leaf,
    Lin,
    Map,
    Rows,
    SlerpCoef,
    Slice,
    Solve,
    SPick,
    Sym,
    TExpr,
    children,
    coef_value,
    expr_deps,
    leaves,
    lin,
)
from .ir import s_add as s_add  # re-exported: the method modules import these from here
from .ir import s_mul as s_mul
from .ops import OPS
from .ops.slerp import slerp_coefficients
from .reductions import Gram, GramMatrix, Reduction
from .schedule import resolve_params
from .types import TensorSpec
from .values import Model

# ---- lowering -------------------------------------------------------------------------

def group_key(name: str, per: str, arch: Arch | None = None) -> tuple:
    """Which tensors share one SLERP angle: per tensor, per transformer layer (the
    checkpoint's layer stack as `arch` finds it: `model.layers.N.`, `transformer.h.N.`,
    `encoder.layer.N.`, ...; every other tensor alone), or the whole model. Without an
    `arch`, a name's first numbered module counts as its layer."""
    if per == "model":
        return ("model",)
    if per == "layer":
        i = arch.layer(name) if arch is not None else layer_index(name)
        if i is not None:
            return ("layer", i)
    return ("tensor", name)


def _label(key: tuple) -> str:
    if key[0] == "model":
        return "model"
    if key[0] == "layer":
        return f"layer {key[1]}"
    return key[1]


class Lowerer:
    """Lowers model-level nodes tensor by tensor, memoised so that a shared node (and the
    reductions it needs) is lowered once. `load` and `rename` are structure; every other
    op lowers as its family declares (`family.lowering`, looked up in the registry in
    use), or, for an elementwise primitive of `ops/`, to a `Map`."""

    def __init__(self) -> None:
        self._memo: dict[tuple[int, str], TExpr] = {}
        self._grams: dict[tuple, Any] = {}
        self._rename_tables: dict[int, dict[str, tuple[int, str]]] = {}
        self._groups: dict[tuple[int, str], dict[tuple, list[str]]] = {}
        self._keep: list[Node] = []  # holds nodes so memo ids stay unique

    def lower(self, model: Model) -> dict[str, TExpr]:
        """One expression per tensor of the model, in its tensor table's order."""
        return {name: self.tensor(model.node, name) for name in model.type.tensors}

    def tensor(self, node: Node, name: str) -> TExpr:
        key = (id(node), name)
        expr = self._memo.get(key)
        if expr is None:
            expr = self._lower(node, name)
            self._memo[key] = expr
            self._keep.append(node)
        return expr

    @staticmethod
    def _spec(node: Node, name: str) -> TensorSpec:
        return node.type.tensors[name]

    def _lower(self, node: Node, name: str) -> TExpr:
        op, args, params = node.op, node.args, node.params
        if op == "load":
            source = params[0]
            return Leaf(source, name, source.tensors[name])
        if op == "rename":  # layer surgery, tied heads (surgery.py): another node's tensor
            i, src = self._renames(node)[name]
            return self.tensor(args[i], src)
        spec = self._spec(node, name)
        if not spec.is_float:
            # integer buffers (position ids, masks) are carried from the primary input
            return self.tensor(args[0], name)
        lower = in_use().lowerings.get(op)
        if lower is not None:  # the core ops (builtins.py) and every family's ops
            return lower(self, node, name)
        if op in OPS:  # a registered elementwise primitive: tensor args, then scalar params
            # per-layer and per-tensor values (ramp, where) become this tensor's numbers
            params = resolve_params(params, name, node.type)
            return Map(op, tuple(self.tensor(a, name) for a in args), params, self.tensor(args[0], name).spec)
        raise AssertionError(f"no lowering for op {op!r}")

    def _renames(self, node: Node) -> dict[str, tuple[int, str]]:
        table = self._rename_tables.get(id(node))
        if table is None:
            table = self._rename_tables[id(node)] = {out: (i, src) for out, i, src in node.params[2]}
        return table

    def _group(self, node: Node, name: str, per: str) -> tuple[tuple, list[str]]:
        groups = self._groups.get((id(node), per))
        if groups is None:  # every group of the node at once: one pass over its tensors
            arch = arch_of(node.type)
            groups = {}
            for n, spec in node.type.tensors.items():
                if spec.is_float:
                    groups.setdefault(group_key(n, per, arch), []).append(n)
            self._groups[(id(node), per)] = groups
        key = group_key(name, per, arch_of(node.type))
        return key, groups[key]

    def param(self, value: Any, node: Node, name: str) -> Any:
        """A scalar parameter of `node` as it applies to tensor `name`. Every family's
        lowering (the core ops' in builtins.py included) reads its scalar parameters
        through here, and a primitive's are resolved by the same `resolve_params`, so
        that per-layer and per-tensor values resolve in one place (numbers pass through;
        tuples are resolved item by item)."""
        return resolve_params((value,), name, node.type)[0]

    def reduction(self, key: tuple, make) -> Any:
        """The reduction (or Solve) registered under `key`, made by `make()` the first
        time: tensors of one group share one reduction, so it runs once per run."""
        r = self._grams.get(key)
        if r is None:
            r = self._grams[key] = make()
        return r

    def group(self, node: Node, name: str, per: str) -> tuple[tuple, list[str]]:
        """The group key of tensor `name` and the float tensors of `node` sharing it."""
        return self._group(node, name, per)

    def gram(self, node: Node, name: str, per: str, pair, tag: str, step: int = 0) -> Gram:
        """The Gram reduction (dot products and norms of `pair(n)` for every tensor n of
        the group of `name`) that SLERP-like ops share within a group, made once."""
        key, names = self._group(node, name, per)
        gkey = (id(node), key, step)
        g = self._grams.get(gkey)
        if g is None:
            label = f"{tag} {_label(key)}" + (f" step {step}" if step else "")
            g = Gram(tuple(pair(n) for n in names), label)
            self._grams[gkey] = g
        return g

    def slerp_tv_vector(self, node: Node, name: str, k: int) -> TExpr:
        """The task vector s_k of WARP's SLERP over the first k models: s_1 = d_1,
        s_k = slerp(s_{k-1}, d_k, 1/k), with d_i = m_i - init."""
        key = (id(node), name, f"tv{k}")
        if key in self._memo:
            return self._memo[key]
        (per,) = node.params
        delta = lambda i, n: lin([(1.0, self.tensor(node.args[i], n)), (-1.0, self.tensor(node.args[0], n))])  # noqa: E731
        if k == 1:
            expr = delta(1, name)
        else:
            g = self.gram(
                node, name, per,
                lambda n: (self.slerp_tv_vector(node, n, k - 1), delta(k, n)),
                "slerp", step=k - 1 if len(node.args) > 3 else 0,
            )
            t = 1.0 / k
            expr = lin([(SlerpCoef(g, t, 0), self.slerp_tv_vector(node, name, k - 1)), (SlerpCoef(g, t, 1), delta(k, name))])
        self._memo[key] = expr
        return expr


__all__ = [
    "Cat", "Coef", "Gram", "GramMatrix", "Leaf", "Lin", "Lowerer", "Map", "Reduction",
    "Rows", "SPick", "Slice", "SlerpCoef", "Solve", "Sym", "TExpr", "children", "coef_value", "expr_deps",
    "group_key", "leaves", "lin", "slerp_coefficients",
]

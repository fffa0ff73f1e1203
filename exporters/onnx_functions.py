"""The com.blrdeploy ops as ONNX functions of standard ops (opset 20), so any ONNX runtime runs them unaided.

Each body is the structure's canonical forward (blrdeploy.structures.functional) written with
Reshape/Einsum/Transpose/MatMul; shapes are read from the factor inputs, so one function serves every layer size
and any leading dims of X.
"""

from __future__ import annotations

import onnx
from onnx import helper

from blrdeploy.structures.functional import ONNX_DOMAIN as DOMAIN

DOMAIN_VERSION = 1
OPSET = 20


def _const(name: str, values: list[int]) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value_ints=values)


def _leading_and_reshape(x: str, y_blocked: str, y: str) -> list[onnx.NodeProto]:
    """Nodes reshaping ``y_blocked`` (N, ...) to X's leading dims + [-1]."""
    return [
        helper.make_node("Shape", [x], ["lead"], start=0, end=-1),
        helper.make_node("Concat", ["lead", "minus_one"], ["out_shape"], axis=0),
        helper.make_node("Reshape", [y_blocked, "out_shape"], [y]),
    ]


def blast_function() -> onnx.FunctionProto:
    nodes = [
        _const("minus_one", [-1]),
        helper.make_node("Shape", ["V"], ["bin_q"], start=0, end=2),
        helper.make_node("Concat", ["minus_one", "bin_q"], ["x_shape"], axis=0),
        helper.make_node("Reshape", ["X", "x_shape"], ["Xb"]),
        helper.make_node("Einsum", ["Xb", "V"], ["Z"], equation="njq,jqr->njr"),
        helper.make_node("Einsum", ["Z", "S"], ["W"], equation="njr,ijr->nir"),
        helper.make_node("Einsum", ["W", "U"], ["Yb"], equation="nir,ipr->nip"),
        *_leading_and_reshape("X", "Yb", "Y"),
    ]
    return _function("BlastLinear", ["X", "U", "S", "V"], nodes)


def monarch_function() -> onnx.FunctionProto:
    nodes = [
        _const("minus_one", [-1]),
        helper.make_node("Shape", ["W1"], ["b"], start=0, end=1),
        helper.make_node("Shape", ["W1"], ["R"], start=1, end=2),
        helper.make_node("Shape", ["W1"], ["in_blk"], start=2, end=3),
        helper.make_node("Concat", ["minus_one", "b", "in_blk"], ["x_shape"], axis=0),
        helper.make_node("Reshape", ["X", "x_shape"], ["Xb"]),
        helper.make_node("Einsum", ["Xb", "W1"], ["H"], equation="nkp,kqp->nkq"),
        # The stride permutation: flat index f of the (b*R) row read as (R, b), then blocks first.
        helper.make_node("Concat", ["minus_one", "R", "b"], ["h_shape"], axis=0),
        helper.make_node("Reshape", ["H", "h_shape"], ["Hrb"]),
        helper.make_node("Transpose", ["Hrb"], ["Hbr"], perm=[0, 2, 1]),
        helper.make_node("Einsum", ["Hbr", "W2"], ["O"], equation="nlr,lsr->nls"),
        helper.make_node("Transpose", ["O"], ["Osl"], perm=[0, 2, 1]),  # output index s*b + l
        *_leading_and_reshape("X", "Osl", "Y"),
    ]
    return _function("MonarchLinear", ["X", "W1", "W2"], nodes)


def lowrank_function() -> onnx.FunctionProto:
    nodes = [
        helper.make_node("MatMul", ["X", "V"], ["XV"]),
        helper.make_node("Transpose", ["U"], ["Ut"], perm=[1, 0]),
        helper.make_node("MatMul", ["XV", "Ut"], ["Y"]),
    ]
    return _function("LowRankLinear", ["X", "U", "V"], nodes)


def _function(name: str, inputs: list[str], nodes: list[onnx.NodeProto]) -> onnx.FunctionProto:
    return helper.make_function(
        DOMAIN, name, inputs, ["Y"], nodes, [helper.make_opsetid("", OPSET)], attributes=[], doc_string=None
    )


FUNCTIONS = {"BlastLinear": blast_function, "MonarchLinear": monarch_function, "LowRankLinear": lowrank_function}

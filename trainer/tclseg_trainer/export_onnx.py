"""ONNX export of one graph, and the op allow-list every exported graph is checked against.

The bundle's graphs run on ONNX Runtime's CPU and CUDA execution providers, so an export that would produce an op
either of them lacks (Einsum, control flow, a custom domain) fails here, naming the file, not later on a GPU.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

OPSET = 18

# Standard ONNX ops that ONNX Runtime's CPU and CUDA execution providers both implement (for float, float16 and,
# where relevant, int64). An exported graph with any other op type fails the export: no Einsum, no control flow,
# no custom domains.
CUDA_SAFE_OPS = frozenset(
    {
        "Abs",
        "Add",
        "ArgMax",
        "Cast",
        "Clip",
        "Concat",
        "Constant",
        "ConstantOfShape",
        "Conv",
        "Div",
        "Equal",
        "Erf",
        "Exp",
        "Expand",
        "Flatten",
        "Gather",
        "GatherND",
        "Gemm",
        "Greater",
        "Identity",
        "LayerNormalization",
        "MatMul",
        "Max",
        "Min",
        "Mul",
        "Neg",
        "Pad",
        "Pow",
        "Range",
        "Reciprocal",
        "ReduceL2",
        "ReduceMax",
        "ReduceMean",
        "ReduceProd",
        "ReduceSum",
        "Reshape",
        "Resize",
        "Shape",
        "Sigmoid",
        "Slice",
        "Softmax",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Tanh",
        "Transpose",
        "Trilu",
        "Unsqueeze",
        "Where",
    }
)


class ExportError(Exception):
    """An export that cannot be done; the message names the file or the problem."""


def graph_op_types(path: Path | str) -> set[str]:
    """The op types a graph file uses (including subgraphs); ops of custom domains read 'domain::Op'."""
    import onnx

    return graph_op_types_of(onnx.load(str(path), load_external_data=False))


def export_graph(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    input_names: Sequence[str],
    output_names: Sequence[str],
    dynamic_axes: dict[str, dict[int, str]],
) -> None:
    """Traces `module` with the TorchScript-based exporter (predictable Resize modes) into one .onnx file."""
    import onnx

    module.eval()
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is chosen on purpose (predictable Resize modes); its deprecation notice and
        # the advanced-indexing note (the EOT gather's indices are never negative) are noise here.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*advanced indexing.*")
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1.*")
        torch.onnx.export(
            module,
            args,
            buffer,
            input_names=list(input_names),
            output_names=list(output_names),
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
            external_data=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    unsupported = sorted(graph_op_types_of(proto) - CUDA_SAFE_OPS)
    if unsupported:
        raise ExportError(f"{path.name}: the graph uses op types outside the CUDA-safe list: {', '.join(unsupported)}")
    path.write_bytes(buffer.getvalue())


def graph_op_types_of(proto: Any) -> set[str]:
    found: set[str] = set()

    def walk(graph: Any) -> None:
        for node in graph.node:
            found.add(node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}")
            for attr in node.attribute:
                if attr.HasField("g"):
                    walk(attr.g)
                for sub in attr.graphs:
                    walk(sub)

    walk(proto.graph)
    return found

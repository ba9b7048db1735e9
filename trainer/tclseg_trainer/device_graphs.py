"""The two model-independent graphs of the device path: whole-image pre- and postprocessing as ONNX.

    python -m tclseg_trainer.device_graphs --out src/model/graphs      (writes crops.onnx, labels.onnx)

On a GPU, the engine keeps every tensor of a batch on the device (ONNX Runtime I/O binding): the host uploads the
frames as uint8, already at the evaluation scale, and receives uint16 label maps, never float score maps. These
two graphs are the ends of that chain; the bundle's own graphs (trunk, TCL head, mask head, PAMR) sit between
them. They hold no weights,
so one pair serves every bundle: the Rust binary embeds them (`src/model/device_path.rs`), and
`test_device_graphs.py` checks that this module still writes them byte for byte.

Every step after the image resize is linear and separable, so each becomes a pair of matrix products with
matrices the host builds once per frame size (and the engine keeps on the device):

* `crops`: image [I,h,w,3] uint8, resized on the host → for every window row r and column c,
  crop[r,c] = Rows[r] · image · Cols[c]ᵀ, where Rows[r] [S,h] is "take the window's rows, centre them in the crop"
  (0/1 entries) → normalize → zero where a short window is padded (the normalized mean colour). All windows of one
  image come out of two MatMuls, in mmseg's order (row-major), as [I·R·C, 3, S, S]. The products only select
  whole grey levels, so they are exact even where the GPU multiplies in TF32; normalizing afterwards gives the
  host path's floats bit for bit.

  The resize itself stays on the host (`resize_u8_bilinear` in Rust): the official pipeline resizes with OpenCV's
  fixed-point uint8 arithmetic, whose vertical pass truncates after each tap (row sum >> 4, times the 16-bit
  weight, >> 16, then (v + 2) >> 2). A matrix product rounds once after summing, so as a float MatMul the resize
  was off by up to 0.76 grey levels on most pixels; the host does the exact version in a few milliseconds per
  frame, and the upload shrinks with the image.
* `labels`: stride-4 masks [I·R·C, N, s, s] → kp blend → for all windows at once,
  scores = Rows · M · Colsᵀ with Rows [H, R·s] = "upsample s→S, place the window, divide by the window count,
  resize h→H" summed over the windows (the count of windows covering a pixel is a product of a row count and a
  column count, so even the averaging is separable). Then background, argmax (first class wins ties), uint16.

Matrix products cost more arithmetic than gathers would (about 6 GMACs for a 1080p frame, against ~750 for its
three crops through the model) but they are exact linear maps, one kernel each, and run on tensor cores.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .bundle_infer import linear_taps

OPSET = 18
IR_VERSION = 9
PRODUCER = "tclseg_trainer.device_graphs"
FILES = {"crops": "crops.onnx", "labels": "labels.onnx"}


def _graph_helpers():
    import onnx
    from onnx import TensorProto, helper

    nodes: list = []

    def node(op: str, inputs: list[str], output: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [output], name=output, **attrs))
        return output

    def const_i64(name: str, values: list[int]) -> str:
        tensor = helper.make_tensor(name, TensorProto.INT64, [len(values)], values)
        nodes.append(helper.make_node("Constant", [], [name], name=name, value=tensor))
        return name

    def dim(shape: str, index: int, name: str) -> str:
        """Dimension `index` of a Shape output, as a 1-element int64 tensor."""
        return node("Slice", [shape, const_i64(f"{name}_start", [index]), const_i64(f"{name}_end", [index + 1])], name)

    return onnx, TensorProto, helper, nodes, node, const_i64, dim


def _finish(onnx, helper, nodes, name: str, inputs, outputs) -> bytes:
    graph = helper.make_graph(nodes, name, inputs, outputs)
    model = helper.make_model(
        graph,
        producer_name=PRODUCER,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
    )
    onnx.checker.check_model(model, full_check=True)
    return model.SerializeToString()


def crops_graph() -> bytes:
    """image uint8 [I,h,w,3], rows [R,S,h], cols [C,S,w] (0/1), mean [3], std [3] (0..255 units)
    → pixels [I·R·C,3,S,S]."""
    onnx, TP, helper, nodes, node, const_i64, dim = _graph_helpers()
    x = node("Cast", ["image"], "image_f", to=TP.FLOAT)
    x = node("Transpose", [x], "planar", perm=[0, 3, 1, 2])  # [I,3,h,w]
    rows_shape = node("Shape", ["rows"], "rows_shape")
    cols_shape = node("Shape", ["cols"], "cols_shape")
    r, s = dim(rows_shape, 0, "R"), dim(rows_shape, 1, "S")
    c, h = dim(cols_shape, 0, "C"), dim(rows_shape, 2, "H")
    w = dim(cols_shape, 2, "W")
    rows2 = node("Reshape", ["rows", node("Concat", [const_i64("m1_rows", [-1]), h], "rows2_shape", axis=0)], "rows2")
    cols2 = node("Reshape", ["cols", node("Concat", [const_i64("m1_cols", [-1]), w], "cols2_shape", axis=0)], "cols2")
    cols_t = node("Transpose", [cols2], "cols_t", perm=[1, 0])  # [w, C·S]
    # Rows first: the h×w → (R·S)×w product is the smaller one whenever the window covers less than the frame.
    t = node("MatMul", [rows2, x], "row_selected")  # [I,3,R·S,w], whole grey levels
    u = node("MatMul", [t, cols_t], "selected")  # [I,3,R·S,C·S]
    stat_shape = const_i64("stat_shape", [3, 1, 1])
    u = node("Sub", [u, node("Reshape", ["mean", stat_shape], "mean_c")], "centred")
    u = node("Div", [u, node("Reshape", ["std", stat_shape], "std_c")], "normalized")
    # A pixel is inside its window when its row and its column each select one source pixel (sums are 0 or 1).
    axis1 = const_i64("axis1", [1])
    row_in = node("ReduceSum", [rows2, axis1], "row_in", keepdims=1)  # [R·S,1]
    col_in = node("ReduceSum", [cols2, axis1], "col_in", keepdims=0)  # [C·S]
    half = helper.make_tensor("half", TP.FLOAT, [1], [0.5])
    nodes.append(helper.make_node("Constant", [], ["half"], name="half", value=half))
    inside = node("Greater", [node("Mul", [row_in, col_in], "inside_f"), "half"], "inside")  # [R·S,C·S]
    zero = helper.make_tensor("zero_f", TP.FLOAT, [1], [0.0])
    nodes.append(helper.make_node("Constant", [], ["zero_f"], name="zero_f", value=zero))
    u = node("Where", [inside, u, "zero_f"], "windows")
    grid = node("Concat", [const_i64("m1_i", [-1]), const_i64("three_a", [3]), r, s, c, s], "grid_shape", axis=0)
    u = node("Reshape", [u, grid], "windows6")  # [I,3,R,S,C,S]
    u = node("Transpose", [u], "windows_t", perm=[0, 2, 4, 1, 3, 5])  # [I,R,C,3,S,S]
    out_shape = node("Concat", [const_i64("m1_k", [-1]), const_i64("three_b", [3]), s, s], "pixels_shape", axis=0)
    node("Reshape", [u, out_shape], "pixels")
    inputs = [
        helper.make_tensor_value_info("image", TP.UINT8, ["I", "H", "W", 3]),
        helper.make_tensor_value_info("rows", TP.FLOAT, ["R", "S", "H"]),
        helper.make_tensor_value_info("cols", TP.FLOAT, ["C", "S", "W"]),
        helper.make_tensor_value_info("mean", TP.FLOAT, [3]),
        helper.make_tensor_value_info("std", TP.FLOAT, [3]),
    ]
    outputs = [helper.make_tensor_value_info("pixels", TP.FLOAT, ["K", 3, "S", "S"])]
    return _finish(onnx, helper, nodes, "tclseg_crops", inputs, outputs)


def labels_graph() -> bytes:
    """masks, kp_masks [I·R·C,N,s,s], kp_weight [1], rows [R,H,s], cols [C,W,s], background [1], label_offset [1]
    → labels uint16 [I,H,W], best [I,H,W], scores [I,N,H,W].

    background is −inf when there is no background class; label_offset is 1 with a background class, else 0.
    """
    onnx, TP, helper, nodes, node, const_i64, dim = _graph_helpers()
    one = helper.make_tensor("one", TP.FLOAT, [1], [1.0])
    nodes.append(helper.make_node("Constant", [], ["one"], name="one", value=one))
    keep = node("Sub", ["one", "kp_weight"], "keep")
    blended = node(
        "Add",
        [node("Mul", ["kp_weight", "kp_masks"], "kp_part"), node("Mul", [keep, "masks"], "mask_part")],
        "blended",
    )
    m_shape = node("Shape", ["masks"], "masks_shape")
    n, sm = dim(m_shape, 1, "N"), dim(m_shape, 2, "s")
    rows_shape = node("Shape", ["rows"], "rows_shape")
    cols_shape = node("Shape", ["cols"], "cols_shape")
    r, h = dim(rows_shape, 0, "R"), dim(rows_shape, 1, "H")
    c, w = dim(cols_shape, 0, "C"), dim(cols_shape, 1, "W")
    six = node("Concat", [const_i64("m1_i", [-1]), r, c, n, sm, sm], "six_shape", axis=0)
    x = node("Reshape", [blended, six], "blocks")  # [I,R,C,N,s,s]
    x = node("Transpose", [x], "blocks_t", perm=[0, 3, 1, 4, 2, 5])  # [I,N,R,s,C,s]
    rs = node("Mul", [r, sm], "Rs")
    cs = node("Mul", [c, sm], "Cs")
    x = node("Reshape", [x, node("Concat", [const_i64("m1_j", [-1]), n, rs, cs], "big_shape", axis=0)], "big")
    rows_m = node("Transpose", ["rows"], "rows_t", perm=[1, 0, 2])  # [H,R,s]
    rows_m = node("Reshape", [rows_m, node("Concat", [h, rs], "rows_m_shape", axis=0)], "rows_m")  # [H,R·s]
    cols_m = node("Transpose", ["cols"], "cols_t", perm=[0, 2, 1])  # [C,s,W]
    cols_m = node("Reshape", [cols_m, node("Concat", [cs, w], "cols_m_shape", axis=0)], "cols_m")  # [C·s,W]
    x = node("MatMul", [x, cols_m], "col_resized")  # [I,N,R·s,W]
    node("MatMul", [rows_m, x], "scores")  # [I,N,H,W]
    best = node("ReduceMax", ["scores", const_i64("class_axis", [1])], "best_class", keepdims=0)
    arg = node("ArgMax", ["scores"], "argmax", axis=1, keepdims=0, select_last_index=0)
    wins = node("Greater", [best, "background"], "beats_background")
    label = node("Add", [arg, "label_offset"], "label_shifted")
    zero = const_i64("zero", [0])
    label = node("Where", [wins, label, zero], "label_i64")
    node("Cast", [label], "labels", to=TP.UINT16)
    node("Max", [best, "background"], "best")
    inputs = [
        helper.make_tensor_value_info("masks", TP.FLOAT, ["K", "N", "s", "s"]),
        helper.make_tensor_value_info("kp_masks", TP.FLOAT, ["K", "N", "s", "s"]),
        helper.make_tensor_value_info("kp_weight", TP.FLOAT, [1]),
        helper.make_tensor_value_info("rows", TP.FLOAT, ["R", "H", "s"]),
        helper.make_tensor_value_info("cols", TP.FLOAT, ["C", "W", "s"]),
        helper.make_tensor_value_info("background", TP.FLOAT, [1]),
        helper.make_tensor_value_info("label_offset", TP.INT64, [1]),
    ]
    outputs = [
        helper.make_tensor_value_info("labels", TP.UINT16, ["I", "H", "W"]),
        helper.make_tensor_value_info("best", TP.FLOAT, ["I", "H", "W"]),
        helper.make_tensor_value_info("scores", TP.FLOAT, ["I", "N", "H", "W"]),
    ]
    return _finish(onnx, helper, nodes, "tclseg_labels", inputs, outputs)


def write(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for role, build in (("crops", crops_graph), ("labels", labels_graph)):
        path = out / FILES[role]
        tmp = path.with_suffix(".onnx.tmp")
        tmp.write_bytes(build())
        tmp.replace(path)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------------
# The host side: the matrices, in numpy (the Rust engine builds the same ones; tests use these).


def axis_weights(size_in: int, size_out: int) -> np.ndarray:
    """[out, in] matrix of PyTorch's bilinear half-pixel resampling along one axis (no antialias)."""
    i0, i1, frac = linear_taps(size_in, size_out)
    m = np.zeros((size_out, size_in), np.float32)
    dst = np.arange(size_out)
    np.add.at(m, (dst, i0), np.float32(1.0) - frac)
    np.add.at(m, (dst, i1), frac)
    return m


def crop_matrices(resized: int, spans: list[tuple[int, int]], crop: int) -> np.ndarray:
    """[windows, crop, resized] of 0/1: take the window's span of the resized image, centre it in the crop."""
    out = np.zeros((len(spans), crop, resized), np.float32)
    for k, (a, b) in enumerate(spans):
        top = (crop - (b - a)) // 2
        out[k, np.arange(top, top + b - a), np.arange(a, b)] = 1
    return out


def label_matrices(size: int, resized: int, spans: list[tuple[int, int]], crop: int, side: int) -> np.ndarray:
    """[windows, size, side]: upsample side→crop, place the window, divide by the window count, resize→size."""
    up = axis_weights(side, crop)
    count = np.zeros(resized, np.float32)
    for a, b in spans:
        count[a:b] += 1
    final = axis_weights(resized, size) / count[None, :]
    out = np.zeros((len(spans), size, side), np.float32)
    for k, (a, b) in enumerate(spans):
        top = (crop - (b - a)) // 2
        out[k] = final[:, a:b] @ up[top : top + b - a]
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("src/model/graphs"))
    args = p.parse_args(argv)
    for path in write(args.out):
        print(path)


if __name__ == "__main__":
    main()

"""int8 variants of a bundle's image graphs (trunk and TCL head), made from their fp32 graphs with ONNX Runtime's
quantization tooling.

Only the matrix products with a weight (MatMul/Gemm whose second input is a constant, and Conv) are quantized:
LayerNorm, softmax, QuickGELU (Sigmoid*Mul), the L2 normalizations and the attention products (activation x
activation, whose range changes with every image) keep fp32 numerics, as the fp16 graphs keep LayerNorm in fp32.

Two modes:
- `dynamic` (the default): weights int8 per output channel, ahead of time; each activation is quantized at run
  time from its own min/max (`DynamicQuantizeLinear` + `MatMulInteger`, fused by ONNX Runtime). No calibration
  set, no range learned from pictures that might not look like the user's.
- `static`: QDQ with activation ranges from a calibration set, made here from synthetic pictures of shapes
  (`calibration_pixels`): the trunk sees them, the head sees the fp32 trunk's output on them.

Weights are per channel. ONNX Runtime's x86 int8 kernels multiply u8 activations by s8 weights with VPMADDUBSW on
AVX2/AVX-512 (no VNNI), whose 16-bit intermediate sums can saturate; `reduce_range` (7-bit weights) avoids that,
at a little precision, and is on unless the caller knows the CPUs that will run the graph have VNNI.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx
from PIL import Image, ImageDraw

MODES = ("dynamic", "static")
# Matrix operators worth int8; everything else stays fp32.
WEIGHT_OPS = ("MatMul", "Gemm", "Conv")


def weight_nodes(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes that multiply by a constant weight: the only ones quantized."""
    constants = {i.name for i in model.graph.initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    names = []
    for n in model.graph.node:
        if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in constants:
            if not n.name:
                raise ValueError(f"{n.op_type} node without a name: cannot name it for quantization")
            names.append(n.name)
    return names


def calibration_pixels(count: int, crop: int, mean: Sequence[float], std: Sequence[float], seed: int = 0) -> np.ndarray:
    """`count` normalized crops [count,3,crop,crop] of random shapes on plain backgrounds, with mild noise (no
    network, no data set): enough spread of colours and edges for activation ranges."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, 3, crop, crop), dtype=np.float32)
    for i in range(count):
        img = Image.new("RGB", (crop, crop), tuple(int(v) for v in rng.integers(0, 256, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(3, 8))):
            x, y = (int(v) for v in rng.integers(0, crop, 2))
            s = int(rng.integers(crop // 16, crop // 2))
            colour = tuple(int(v) for v in rng.integers(0, 256, 3))
            [d.rectangle, d.ellipse][int(rng.integers(0, 2))]([x, y, x + s, y + s], fill=colour)
        arr = np.asarray(img, dtype=np.float32) / 255.0
        arr = np.clip(arr + rng.normal(0.0, 0.02, arr.shape).astype(np.float32), 0.0, 1.0)
        out[i] = ((arr - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)).transpose(2, 0, 1)
    return out


class _Feed:
    """CalibrationDataReader over a list of feeds (imported lazily: onnxruntime is only needed here)."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self._it: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def quantize_graph(
    fp32: Path,
    out: Path,
    *,
    mode: str = "dynamic",
    calibration: list[dict[str, np.ndarray]] | None = None,
    reduce_range: bool = True,
) -> None:
    """Writes the int8 variant of the fp32 graph `fp32` to `out` (see the module doc for what is quantized)."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if mode not in MODES:
        raise ValueError(f"quantization mode {mode!r}; known: {', '.join(MODES)}")
    nodes = weight_nodes(onnx.load(str(fp32), load_external_data=False))
    if not nodes:
        raise ValueError(f"{fp32}: no MatMul/Gemm/Conv with a constant weight to quantize")
    with tempfile.TemporaryDirectory(prefix="tclseg-quant-") as tmp:
        # Shape inference and constant folding first, as the tooling asks; the graph's function is unchanged.
        pre = Path(tmp) / "pre.onnx"
        # Symbolic shape inference fails on some of these graphs (dynamic windows); ONNX's own is enough here.
        quant_pre_process(str(fp32), str(pre), skip_optimization=False, skip_onnx_shape=False, skip_symbolic_shape=True)
        pre_nodes = set(weight_nodes(onnx.load(str(pre), load_external_data=False)))
        keep = [n for n in nodes if n in pre_nodes] or sorted(pre_nodes)
        if mode == "dynamic":
            quantize_dynamic(
                str(pre),
                str(out),
                op_types_to_quantize=list(WEIGHT_OPS),
                nodes_to_quantize=keep,
                per_channel=True,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
            )
        else:
            if not calibration:
                raise ValueError("static quantization needs a calibration set")
            quantize_static(
                str(pre),
                str(out),
                _Feed(calibration),
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=list(WEIGHT_OPS),
                nodes_to_quantize=keep,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
            )
    # The result must load and keep the fp32 graph's interface.
    before, after = onnx.load(str(fp32), load_external_data=False), onnx.load(str(out), load_external_data=False)
    if [i.name for i in before.graph.input] != [i.name for i in after.graph.input] or [
        o.name for o in before.graph.output
    ] != [o.name for o in after.graph.output]:
        raise ValueError(f"{out}: quantization changed the graph's inputs or outputs")


def head_calibration(trunk_fp32: Path, pixels: np.ndarray, batch: int = 2) -> list[dict[str, np.ndarray]]:
    """The TCL head's calibration feeds: the fp32 trunk's tokens on `pixels`."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(trunk_fp32), providers=["CPUExecutionProvider"])
    return [
        {"tokens": sess.run(["tokens"], {"pixels": pixels[i : i + batch]})[0]} for i in range(0, len(pixels), batch)
    ]


# Image-graph roles that get an int8 variant, and their file names (as `export.GRAPH_FILES` names them).
INT8_ROLES = ("image_trunk", "tcl_head")


def add_int8(bundle_dir: Path, out_dir: Path, *, mode: str = "dynamic", force: bool = False) -> dict:
    """Copies (hard-links where it can) the bundle in `bundle_dir` to `out_dir` with int8 trunk and TCL head graphs
    added (quantized from its fp32 ones), every file hashed into the new model.toml; returns the manifest. For a
    bundle exported without int8, so it need not be exported again. Written beside `out_dir` and renamed, as an
    export is."""
    import shutil
    import tomllib

    from .bundle import MANIFEST_FILE, open_bundle, sha256_file
    from .export_manifest import install, manifest_to_toml

    src = open_bundle(bundle_dir, verify=True)
    manifest = tomllib.loads((src.dir / MANIFEST_FILE).read_text(encoding="utf-8"))
    if (out_dir.exists() or out_dir.is_symlink()) and not force:
        raise FileExistsError(f"{out_dir} already exists; pass --force to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        for entry in manifest["files"]:
            try:  # the graphs are large and never written in place: share them when the filesystem allows
                os.link(src.dir / entry["path"], tmp / entry["path"])
            except OSError:
                shutil.copyfile(src.dir / entry["path"], tmp / entry["path"])
        pixels = None
        for role in INT8_ROLES:
            fp32 = tmp / manifest["graphs"][role]["fp32"]
            name = f"{role}.int8.onnx"
            calibration = None
            if mode == "static":
                crop = int(manifest["input"]["crop_size"])
                if pixels is None:
                    pixels = calibration_pixels(16, crop, manifest["input"]["mean"], manifest["input"]["std"])
                calibration = (
                    [{"pixels": pixels[i : i + 2]} for i in range(0, len(pixels), 2)]
                    if role == "image_trunk"
                    else head_calibration(tmp / manifest["graphs"]["image_trunk"]["fp32"], pixels)
                )
            quantize_graph(fp32, tmp / name, mode=mode, calibration=calibration)
            manifest["graphs"][role]["int8"] = name
        manifest["files"] = [
            {"path": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(tmp.iterdir())
        ]
        manifest.setdefault("provenance", {})["int8"] = f"onnxruntime.quantization {mode}, per-channel weights"
        manifest["files"] = [f for f in manifest["files"] if f["path"] != MANIFEST_FILE]
        (tmp / MANIFEST_FILE).write_text(manifest_to_toml(manifest), encoding="utf-8")
        open_bundle(tmp, verify=True)
        install(tmp, out_dir, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="python -m tclseg_trainer.quantize",
        description="Copy a model bundle with int8 image graphs added (quantized from its fp32 graphs).",
    )
    p.add_argument("bundle", type=Path, help="the bundle folder (holding model.toml)")
    p.add_argument("--out", type=Path, required=True, help="the new bundle folder")
    p.add_argument("--mode", choices=MODES, default="dynamic")
    p.add_argument("--force", action="store_true", help="replace an existing bundle at --out")
    args = p.parse_args(argv)
    try:
        add_int8(args.bundle, args.out, mode=args.mode, force=args.force)
    except (OSError, ValueError) as e:
        print(f"quantize: error: {e}", file=sys.stderr)
        return 1
    print(f"quantize: wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

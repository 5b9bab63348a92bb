"""Write one single-layer .tflite file per (geometry, cin, cout) entry: the latency table's probes.

Run as a subprocess (it imports TensorFlow): `python -m pipeline.latency.build_layers SPEC.json OUT_DIR`.
SPEC: {"precision": "fp32"|"fp16"|"int8", "entries": [{"file", "kind", "kernel", "stride", "padding", "in_hw",
"cin", "cout"}]}. Each probe is the layer with a fused ReLU (as onnx2tf emits conv+BN+ReLU) converted by
TensorFlow Lite's own converter: the same builtin kernels (XNNPACK) the deployed model runs.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _model(tf, e: dict):
    if e["kind"] == "linear":
        inp = tf.keras.Input((e["cin"],), batch_size=1)
        return tf.keras.Model(inp, tf.keras.layers.Dense(e["cout"])(inp)), (1, e["cin"])
    h, w = e["in_hw"]
    inp = tf.keras.Input((h, w, e["cin"]), batch_size=1)
    if e["kind"] == "depthwise":
        layer = tf.keras.layers.DepthwiseConv2D(
            tuple(e["kernel"]), strides=tuple(e["stride"]), padding=e["padding"], activation="relu"
        )
    else:
        layer = tf.keras.layers.Conv2D(
            e["cout"], tuple(e["kernel"]), strides=tuple(e["stride"]), padding=e["padding"], activation="relu"
        )
    return tf.keras.Model(inp, layer(inp)), (1, h, w, e["cin"])


def convert(tf, np, e: dict, precision: str) -> bytes:
    model, shape = _model(tf, e)
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    if precision == "fp16":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        rng = np.random.default_rng(0)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = lambda: ([rng.standard_normal(shape).astype(np.float32)] for _ in range(4))
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.int8
        conv.inference_output_type = tf.int8
    return conv.convert()


def main(argv: list[str]) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    spec, out = json.loads(Path(argv[0]).read_text()), Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    import numpy as np
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    for e in spec["entries"]:
        target = out / e["file"]
        if target.exists():
            continue
        blob = convert(tf, np, e, spec["precision"])
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(blob)
        tmp.replace(target)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Real tiny TFLite models for device-side tests, built with TensorFlow on generated images.

`tiny_bundle_bytes` trains a small CNN for a few epochs on class-coloured images, converts it to full
int8 exactly as the converter's defaults would (uint8 in/out, TFLITE_BUILTINS_INT8), and packs a bundle.
Results are cached per process, keyed by arguments, because TensorFlow start-up dominates.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
from taxonedge.convert.converter import centroid_arrays, embed_images
from taxonedge.convert.quantize import io_details, run_tflite
from taxonedge.edge.kernel.bundle import (
    CENTROIDS,
    GOLDEN,
    MODEL,
    MODEL_EDGETPU,
    EmbeddingSpec,
    ModelInfo,
    OpenSet,
    Quantization,
    build_manifest,
    read_bundle,
    utc_now,
    write_bundle,
)
from taxonedge.edge.kernel.preprocess import InputSpec, preprocess
from taxonedge.edge.kernel.taxonomy import Taxonomy

from .conftest import TINY_LABELS, class_image


@functools.cache
def _tiny_tflite(labels: tuple[str, ...], size: int, seed: int, nan: bool, export: bool = False) -> bytes:
    import os

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    spec = InputSpec(height=size, width=size)
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for i in range(len(labels)):
        for _ in range(24):
            xs.append(preprocess(class_image(i, rng, 64), spec))
            ys.append(i)
    x, y = np.stack(xs).astype("float32"), np.array(ys)
    inp = keras.Input((size, size, 3))
    h = keras.layers.Rescaling(1 / 127.5, -1)(inp)
    h = keras.layers.Conv2D(8, 3, activation="relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    dense = keras.layers.Dense(len(labels), name="leaf_logits")
    logits = dense(h)
    if nan:  # a broken model: log of a negative number gives NaN on every input
        logits = keras.layers.Lambda(lambda t: tf.math.log(-tf.abs(t) - 1.0))(logits)
    out = keras.layers.Softmax()(logits)
    model = keras.Model(inp, out)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss="sparse_categorical_crossentropy")
    if not nan:
        model.fit(x, y, epochs=15, batch_size=16, verbose=0)
    if export:  # the converter's export: two named outputs (train/model.py export_model)
        from taxonedge.train.model import export_model

        model = export_model(model, keras)
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if nan:
        return converter.convert()  # float model: NaN survives
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = lambda: ([x[i : i + 1]] for i in range(0, len(x), 3))
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.uint8
    converter.inference_output_type = tf.uint8
    return converter.convert()


def tiny_bundle_bytes(
    labels: list[str] | None = None,
    size: int = 32,
    seed: int = 0,
    version: str = "1",
    thresholds: dict[str, float] | None = None,
    sign_key=None,
    nan: bool = False,
    golden: bool = True,
    tmp_dir: Path | None = None,
    edgetpu_model: bool = False,
    outputs: str = "logits",
    open_set: float | None = None,
    whitening: bool = True,
) -> bytes:
    """A complete bundle (bytes) with a real int8 model; `nan=True` gives a float model that outputs NaN.
    `edgetpu_model=True` adds model_edgetpu.tflite as edgetpu_compiler's output would sit there (here the
    same model: the compiler and the accelerator do not exist on a test machine). `outputs="logits"` (the
    converter's default): leaf logits and an embedding, format v3, with `open_set` as its max-logit
    threshold; "probabilities": one probability output, format v2. `whitening=False`: centroids.npz as
    converters before the whitening wrote it (raw centroids only)."""
    import io
    import tempfile

    labels = list(labels or TINY_LABELS)
    taxonomy = Taxonomy.from_paths(labels, name="tiny")
    with_logits = outputs == "logits" and not nan
    model = _tiny_tflite(tuple(labels), size, seed, nan, with_logits)
    spec = InputSpec(height=size, width=size, dtype="float32" if nan else "uint8")
    info = io_details(model)
    files = {MODEL: model}
    if edgetpu_model:
        files[MODEL_EDGETPU] = model
    if golden:
        rng = np.random.default_rng(seed + 100)
        inputs = np.stack([preprocess(class_image(i % len(labels), rng, 64), spec) for i in range(4)])
        got = run_tflite(model, inputs)
        arrays = {"inputs": inputs, "outputs": got[info["output_name"]]}
        if info["embedding"]:
            arrays["embeddings"] = got[info["embedding"]["name"]]
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        files[GOLDEN] = buf.getvalue()
    output = {"dtype": "float32", "scale": 0.0, "zero_point": 0} if nan else {}
    v3 = {}
    if with_logits:
        output = {
            "name": info["output_name"],
            "kind": "leaf_logits",
            "scale": info["output_scale"],
            "zero_point": info["output_zero_point"],
        }
        # the converter's per-leaf centroids, from 8 images of each class (what enrolled products must beat)
        rng = np.random.default_rng(seed + 200)
        classes = np.repeat(np.arange(len(labels)), 8)
        images = np.stack([preprocess(class_image(int(i), rng, 64), spec) for i in classes])
        arrays = centroid_arrays(embed_images(model, info, images), classes, len(labels))
        files[CENTROIDS] = _npz_bytes(**arrays if whitening else {"centroids": arrays["centroids"]})
        v3 = {
            "embedding": EmbeddingSpec(**info["embedding"]),
            "open_set": OpenSet(threshold=open_set, known_pass_rate=0.98) if open_set is not None else None,
        }
    manifest = build_manifest(
        model=ModelInfo(name="tiny", version=version, created_at=utc_now(), backbone="tiny-cnn"),
        taxonomy=taxonomy,
        input_spec=spec,
        output=output,
        files=files,
        quantization=Quantization(mode="float32" if nan else "int8", calibration_images=32),
        thresholds=thresholds if thresholds is not None else {"depth_1": 0.5},
        golden={"file": GOLDEN, "count": 4, "tolerance": 0} if golden else {},
        **v3,
    )
    with tempfile.TemporaryDirectory(dir=tmp_dir) as tmp:
        path = write_bundle(Path(tmp) / "b.tebundle", manifest, files, sign_key=sign_key)
        data = path.read_bytes()
    read_bundle(data)  # self-check: what the tests get is a valid bundle
    return data


def write_tiny_bundle(path: Path, **kwargs) -> Path:
    path.write_bytes(tiny_bundle_bytes(**kwargs))
    return path


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()

"""`taxonedge train`: images -> a run directory (model.keras, taxonomy, config, calibration, metrics).

Two phases. Phase 1 runs the frozen backbone once over the training images, cropped as the run's
`InputSpec` says (`center_view`: the device's crop, bilinear), and trains the head on the cached features:
seconds. Phase 2 unfreezes the top N backbone layers (BatchNorm frozen) and fine-tunes on augmented
batches at a low, cosine-decayed learning rate, selecting the epoch on val.
Then temperature scaling and back-off thresholds are fitted on val, the temperature is folded into the
saved model, and the final model is evaluated on val with the shared metrics code.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from taxonedge.edge.kernel.preprocess import InputSpec, margin_spec

from . import data as data_mod
from . import rundir
from .backbones import DEFAULT as DEFAULT_BACKBONE
from .backbones import find_backbone
from .calibrate import (
    DEFAULT_TARGET_PRECISION,
    DEFAULT_THRESHOLD_RULE,
    choose_and_check_thresholds,
    fit_temperature,
    softmax,
)
from .metrics import compute_metrics

log = logging.getLogger(__name__)


class TrainConfig(BaseModel):
    """Everything a run depends on; stored as RUN/config.json so a run can be rebuilt and repeated."""

    model_config = ConfigDict(extra="forbid")

    data: str
    val: str | None = None
    # The taxonomy's name in the run and every bundle made from it; None: the data folder's name
    # (for a list file, the folder holding it).
    taxonomy_name: str | None = Field(None, min_length=1, max_length=64)
    holdout: float = Field(0.15, ge=0.0, lt=1.0)
    # Share of each class of --val moved into training (a final model: val is shot on the occasions a
    # deployment looks like); the rest still selects the epoch, calibrates and gates the int8 model.
    train_on_val: float = Field(0.0, ge=0.0, lt=1.0)
    backbone: str = DEFAULT_BACKBONE
    alpha: float = 1.0
    input_size: int = Field(None, ge=32, le=1024, description="None: the backbone's default size")  # type: ignore[assignment]
    weights: str = "imagenet"
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    aux_parent: float = Field(0.0, ge=0.0, description="loss weight of the auxiliary parent head (0: off)")
    head_epochs: int = Field(40, ge=0)
    head_lr: float = 1e-3
    epochs: int = Field(20, ge=0)
    unfreeze: int = 48
    lr: float = 2e-4
    batch_size: int = Field(32, ge=1)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    patience: int = Field(5, ge=1)
    balance: Literal["weights", "sampling", "none"] = "weights"
    flip: bool = True
    rotation: float = Field(15.0, ge=0.0, le=180.0, description="max rotation, degrees")
    crop_scale: float = Field(0.35, gt=0.0, le=1.0, description="smallest random crop, share of the area")
    color_jitter: float = Field(0.2, ge=0.0, le=1.0)
    # Shift-oriented augmentation: the light and focus of another occasion (0: off).
    white_balance: float = Field(0.0, ge=0.0, le=0.5, description="max change of each colour channel's gain")
    blur: float = Field(0.0, ge=0.0, le=5.0, description="max Gaussian blur sigma, pixels of the input")
    mixup: float = Field(0.0, ge=0.0, le=10.0, description="Beta(a, a) of mixup in fine-tuning; 0: off")
    target_precision: float = Field(DEFAULT_TARGET_PRECISION, gt=0.0, le=1.0)
    seed: int = 0

    @model_validator(mode="before")
    @classmethod
    def _backbone_default_size(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("input_size") is None:
            entry = find_backbone(data.get("backbone", DEFAULT_BACKBONE))
            data = {**data, "input_size": entry.default_input_size if entry else 224}
        return data


def _setup_tf(seed: int):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    keras.utils.set_random_seed(seed)
    return keras


def train(config: TrainConfig, out: Path) -> dict:
    """Run the whole training; returns the metrics written to RUN/metrics.json."""
    started = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    # ---- data ------------------------------------------------------------------------------------
    samples = data_mod.read_samples(config.data)
    data_path = Path(config.data).resolve()
    name = config.taxonomy_name or (data_path.parent.name if data_path.is_file() else data_path.name)
    taxonomy = data_mod.taxonomy_from_samples(samples, name=name)
    if config.val:
        train_samples = samples
        val_samples = data_mod.read_samples(config.val)
        val_source = "separate"
        if config.train_on_val:
            val_samples, moved = data_mod.stratified_split(val_samples, config.train_on_val, config.seed)
            train_samples = samples + moved
            val_source = f"separate, {len(moved)} of its images moved to training"
            log.info(
                "--train-on-val %.2f: %d val images train, %d still validate",
                config.train_on_val,
                len(moved),
                len(val_samples),
            )
    else:
        train_samples, val_samples = data_mod.stratified_split(samples, config.holdout, config.seed)
        val_source = "holdout"
        log.warning(
            "no --val given: validating on a seeded %.0f%% slice of the training data; it may be "
            "optimistic (same shooting occasions as training). Pass --val for a separate split.",
            100 * config.holdout,
        )
        if not val_samples:
            raise data_mod.DataError(
                f"{config.data}: too few images to hold out a validation slice; pass --val"
            )
    # The preprocessing every bundle made from this run carries (InputSpec's centre crop and area resize).
    # Training images are loaded with its margin (`margin_spec`): random crops (phase 2) and the spec's
    # own crop (phase 1, `center_view`) come from the same pixels.
    spec = InputSpec(height=config.input_size, width=config.input_size)
    t0 = time.monotonic()
    x_train, train_samples, train_errors = data_mod.load_images(
        train_samples, margin_spec(spec), "train images"
    )
    x_val, val_samples, val_errors = data_mod.load_images(val_samples, spec, "val images")
    y_train = data_mod.leaf_indices(taxonomy, train_samples, config.data)
    y_val = data_mod.leaf_indices(taxonomy, val_samples, config.val or config.data)
    timings["load_images_s"] = time.monotonic() - t0
    log.info("%s; %d train / %d val images (%s)", taxonomy.summary(), len(y_train), len(y_val), val_source)

    rundir.write_setup(
        out,
        taxonomy,
        spec,
        config,
        rundir.Splits(
            train=[(s.path, s.label) for s in train_samples],
            val=[(s.path, s.label) for s in val_samples],
            val_source=val_source,
            skipped=train_errors + val_errors,
        ),
    )

    keras = _setup_tf(config.seed)
    from .model import backbone_of, build_classifier, inference_model, recalibrate_batchnorm, unfreeze_top

    parent_depth = taxonomy.depth - 1
    num_parents = (
        len(taxonomy.level_nodes(parent_depth)) if config.aux_parent > 0 and parent_depth >= 1 else 0
    )
    model = build_classifier(
        config.model_dump(), taxonomy.num_leaves, keras, pretrained=True, num_parents=num_parents
    )
    backbone = backbone_of(model)
    weights = _sample_weights(y_train, taxonomy.num_leaves) if config.balance == "weights" else None

    # ---- phase 1: frozen backbone, cached features --------------------------------------------------
    t0 = time.monotonic()
    features = keras.Model(model.inputs, model.get_layer("head_dropout").input)
    x_train_center = center_view(x_train, spec)
    if config.weights == "none":  # before freezing: a frozen Keras 3 BN layer ignores training=True
        recalibrate_batchnorm(
            features,
            backbone,
            x_train_center[np.random.default_rng(config.seed).permutation(len(x_train_center))[:256]],
        )
    backbone.trainable = False
    f_train = features.predict(x_train_center, batch_size=64, verbose=0)
    del x_train_center
    f_val = features.predict(x_val.astype("float32"), batch_size=64, verbose=0)
    timings["features_s"] = time.monotonic() - t0
    t0 = time.monotonic()
    if config.head_epochs:
        _train_head(keras, model, config, taxonomy, f_train, y_train, f_val, y_val, weights, num_parents)
    timings["head_s"] = time.monotonic() - t0
    head_acc = _leaf_accuracy(model, x_val, y_val) if config.head_epochs else None
    log.info("phase 1 (head on cached features): val leaf accuracy %s", head_acc)

    # ---- phase 2: fine-tune the top of the backbone -----------------------------------------------
    t0 = time.monotonic()
    history: dict = {}
    best_epoch = None  # the fine-tuning epoch kept (1-based), on the validation loss
    if config.epochs and config.unfreeze:
        trainable = unfreeze_top(backbone, config.unfreeze)
        log.info("phase 2: %d backbone layers with weights unfrozen (BatchNorm frozen)", trainable)
        history, best_epoch = _fine_tune(
            keras, model, config, taxonomy, x_train, y_train, x_val, y_val, weights, num_parents, out
        )
    timings["fine_tune_s"] = time.monotonic() - t0

    # ---- calibration ----------------------------------------------------------------------------
    logits_model = keras.Model(model.inputs, model.get_layer("leaf_logits").output)
    val_logits = logits_model.predict(x_val.astype("float32"), batch_size=64, verbose=0)
    temperature = fit_temperature(val_logits, y_val)
    val_probs = softmax(val_logits, temperature)
    thresholds, check = choose_and_check_thresholds(
        taxonomy, val_probs, y_val, config.target_precision, DEFAULT_THRESHOLD_RULE
    )
    rundir.write_calibration(
        out,
        rundir.Calibration(
            temperature=temperature,
            thresholds=thresholds,
            target_precision=config.target_precision,
            rule=DEFAULT_THRESHOLD_RULE,
            two_fold_check=check,
        ),
    )
    final = inference_model(model, keras, temperature)
    final.save(rundir.model_path(out))

    metrics = compute_metrics(taxonomy, y_val, val_probs, thresholds)
    metrics["source"] = {
        "kind": "keras",
        "run": str(out.resolve()),
        "data": config.val or config.data,
        "val_source": val_source,
        "temperature": temperature,
        "head_only_leaf_accuracy": head_acc,
        "history": history,
        "best_epoch": best_epoch,
        "skipped_images": len(train_errors) + len(val_errors),
    }
    timings["total_s"] = time.monotonic() - started
    metrics["timings"] = timings
    rundir.write_metrics(out, metrics)
    return metrics


def _leaf_accuracy(model, x: np.ndarray, y: np.ndarray) -> float:
    probs = model.predict(x.astype("float32"), batch_size=64, verbose=0)
    leaf = probs["leaf_probs"] if isinstance(probs, dict) else probs
    return float((leaf.argmax(-1) == y).mean())


def center_view(images: np.ndarray, spec: InputSpec) -> np.ndarray:
    """`spec`'s crop of training images loaded with `margin_spec(spec)`, resized to `spec`'s size: what the
    device sees, resampled like phase 2's random crops (bilinear, tf.image.crop_and_resize), float32.

    The device's `preprocess` resizes by area from the full frame instead. On Grocery photos the two differ
    by 1.35 (224 px) and 2.0 (288 px) levels of 255 per pixel on average, at most 44-55 at sharp edges
    (`tests/test_train_data.py` measures it); validation, calibration and conversion use `preprocess`.
    """
    import tensorflow as tf

    margin = (1.0 - spec.crop_fraction) / 2 if spec.crop == "center" else 0.0
    box = [[margin, margin, 1.0 - margin, 1.0 - margin]]
    out = []
    for start in range(0, len(images), 256):
        chunk = tf.convert_to_tensor(images[start : start + 256], tf.float32)
        n = int(chunk.shape[0])
        out.append(
            tf.image.crop_and_resize(
                chunk, box * n, tf.range(n), (spec.height, spec.width), method="bilinear"
            ).numpy()
        )
    return np.concatenate(out)


def _sample_weights(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-class weights n / (classes_present * count): rare classes count as much as common ones."""
    counts = np.bincount(y, minlength=num_classes).astype(np.float64)
    present = counts > 0
    class_w = np.zeros(num_classes)
    class_w[present] = len(y) / (present.sum() * counts[present])
    return class_w.astype(np.float32)


def _targets(keras, taxonomy, y: np.ndarray, num_parents: int):
    leaf = keras.utils.to_categorical(y, taxonomy.num_leaves)
    if not num_parents:
        return leaf
    parent = keras.utils.to_categorical(taxonomy.level_index(taxonomy.depth - 1)[y], num_parents)
    return {"leaf_probs": leaf, "parent_probs": parent}


def _compile(keras, model, config: TrainConfig, learning_rate, num_parents: int) -> None:
    loss = keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing)
    if num_parents:
        model.compile(
            optimizer=keras.optimizers.Adam(learning_rate),
            loss={"leaf_probs": loss, "parent_probs": loss},
            loss_weights={"leaf_probs": 1.0, "parent_probs": config.aux_parent},
            metrics={"leaf_probs": ["accuracy"]},
        )
    else:
        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=loss, metrics=["accuracy"])


# The epoch (and the head's stopping point) is chosen on the validation loss, not accuracy: on a slice of
# the training occasions accuracy saturates within a few epochs (Grocery: 99.2 % from fine-tuning epoch 5
# of 12), the first epoch to reach the top wins the tie and the cosine schedule is cut off half-way, while
# the loss keeps ranking the later epochs (docs/training.md).
MONITOR, MONITOR_MODE = "val_loss", "min"


def epoch_stopper(keras, patience: int):
    """Early stopping on the validation loss that restores the best epoch's weights at the end."""
    return keras.callbacks.EarlyStopping(
        MONITOR, mode=MONITOR_MODE, patience=patience, restore_best_weights=True
    )


def _train_head(keras, model, config, taxonomy, f_train, y_train, f_val, y_val, weights, num_parents) -> None:
    """Train Dropout + Dense head(s) on cached features, then copy the weights into the full model."""
    inp = keras.Input(f_train.shape[1:])
    h = keras.layers.Dropout(config.dropout)(inp)
    leaf = keras.layers.Dense(taxonomy.num_leaves, name="leaf_logits")(h)
    outputs = keras.layers.Softmax(name="leaf_probs")(leaf)
    if num_parents:
        parent = keras.layers.Dense(num_parents, name="parent_logits")(h)
        outputs = {"leaf_probs": outputs, "parent_probs": keras.layers.Softmax(name="parent_probs")(parent)}
    head = keras.Model(inp, outputs)
    _compile(keras, head, config, config.head_lr, num_parents)
    sw = weights[y_train] if weights is not None else None
    head.fit(
        f_train,
        _targets(keras, taxonomy, y_train, num_parents),
        sample_weight=sw,
        validation_data=(f_val, _targets(keras, taxonomy, y_val, num_parents)),
        epochs=config.head_epochs,
        batch_size=config.batch_size,
        verbose=0,
        callbacks=[epoch_stopper(keras, max(5, config.patience))],
    )
    for name in ("leaf_logits", "parent_logits") if num_parents else ("leaf_logits",):
        model.get_layer(name).set_weights(head.get_layer(name).get_weights())


def _index_batches(y: np.ndarray, config: TrainConfig) -> Iterator[np.ndarray]:
    """Endless batches of training indices: shuffled epochs, or class-balanced draws with --balance
    sampling."""
    rng = np.random.default_rng(config.seed)
    counts = np.bincount(y)
    p = 1.0 / counts[y]
    p /= p.sum()
    while True:
        order = rng.choice(len(y), len(y), p=p) if config.balance == "sampling" else rng.permutation(len(y))
        for start in range(0, len(order) - config.batch_size + 1, config.batch_size):
            yield order[start : start + config.batch_size]


def augment_batch(images, config: TrainConfig, size: int, seed_gen):
    """Random resized crop, flip, colour jitter, white balance and blur on a float batch (B, S, S, 3) in
    0..255 (rotation follows as a Keras layer).

    The batch is the margin image (`edge.preprocess.margin_spec`); the crops are resampled bilinearly in
    the graph (tf.image.crop_and_resize), where the device's `preprocess` resizes by area from the full
    frame (see `center_view` for the difference, measured).
    """
    import tensorflow as tf

    n = tf.shape(images)[0]
    area = seed_gen.uniform([n], config.crop_scale, 1.0)
    log_ratio = seed_gen.uniform([n], math.log(3 / 4), math.log(4 / 3))
    ratio = tf.exp(log_ratio)
    h = tf.minimum(tf.sqrt(area / ratio), 1.0)
    w = tf.minimum(tf.sqrt(area * ratio), 1.0)
    top = seed_gen.uniform([n]) * (1.0 - h)
    left = seed_gen.uniform([n]) * (1.0 - w)
    boxes = tf.stack([top, left, top + h, left + w], axis=1)
    if config.flip:  # a horizontal flip is a box with left and right swapped
        flip = seed_gen.uniform([n]) < 0.5
        boxes = tf.where(flip[:, None], tf.stack([top, left + w, top + h, left], axis=1), boxes)
    x = tf.image.crop_and_resize(images, boxes, tf.range(n), (size, size))
    if config.color_jitter:
        j = config.color_jitter
        brightness = seed_gen.uniform([n, 1, 1, 1], -j, j) * 255.0
        contrast = seed_gen.uniform([n, 1, 1, 1], 1 - j, 1 + j)
        saturation = seed_gen.uniform([n, 1, 1, 1], 1 - j, 1 + j)
        mean = tf.reduce_mean(x, axis=[1, 2, 3], keepdims=True)
        x = (x - mean) * contrast + mean + brightness
        gray = tf.reduce_mean(x, axis=3, keepdims=True)
        x = gray + (x - gray) * saturation
    if config.white_balance:  # another light: each channel its own gain
        w = config.white_balance
        x = x * seed_gen.uniform([n, 1, 1, 3], 1 - w, 1 + w)
    if config.blur:
        x = blur_batch(x, config.blur, seed_gen.uniform([n, 1, 1, 1]))
    return tf.clip_by_value(x, 0.0, 255.0)


def blur_batch(x, sigma: float, amount):
    """Each image blended with its Gaussian blur at `sigma` by `amount` (B x 1 x 1 x 1, 0..1): a blur of
    up to `sigma` per image, for the price of one convolution of the batch (edges reflected)."""
    import tensorflow as tf

    radius = max(1, math.ceil(3 * sigma))
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps = (taps / taps.sum()).astype(np.float32)
    padded = tf.pad(x, [[0, 0], [radius, radius], [radius, radius], [0, 0]], mode="REFLECT")
    rows = tf.constant(np.tile(taps[:, None, None, None], (1, 1, 3, 1)))  # separable: rows, then columns
    cols = tf.constant(np.tile(taps[None, :, None, None], (1, 1, 3, 1)))
    blurred = tf.nn.depthwise_conv2d(padded, rows, [1, 1, 1, 1], "VALID")
    blurred = tf.nn.depthwise_conv2d(blurred, cols, [1, 1, 1, 1], "VALID")
    return x + amount * (blurred - x)


def mix_batch(tensors, alpha: float, seed_gen):
    """Mixup: each example blended with another of the batch by a weight drawn from Beta(alpha, alpha),
    and its images, targets and sample weight alike (tensors share the batch axis first)."""
    import tensorflow as tf

    n = tf.shape(tensors[0])[0]
    seeds = seed_gen.make_seeds(2)
    a = tf.random.stateless_gamma([n], seeds[:, 0], alpha)
    b = tf.random.stateless_gamma([n], seeds[:, 1], alpha)
    lam = a / tf.maximum(a + b, 1e-12)
    partner = tf.argsort(seed_gen.uniform([n]))

    def mix(t):
        weight = tf.reshape(lam, [-1] + [1] * (len(t.shape) - 1))
        return weight * t + (1.0 - weight) * tf.gather(t, partner)

    return [mix(t) for t in tensors]


def _fine_tune(
    keras, model, config, taxonomy, x_train, y_train, x_val, y_val, weights, num_parents, out: Path
) -> tuple[dict, int]:
    import tensorflow as tf

    steps = max(1, len(y_train) // config.batch_size)
    size = config.input_size
    seed_gen = tf.random.Generator.from_seed(config.seed)
    rotation = (
        keras.layers.RandomRotation(config.rotation / 360.0, fill_mode="reflect", seed=config.seed)
        if config.rotation
        else None
    )
    targets = _targets(keras, taxonomy, y_train, num_parents)
    sw = weights[y_train] if weights is not None else np.ones(len(y_train), np.float32)

    def gather(idx):
        leaf = targets["leaf_probs"] if num_parents else targets
        batch = [x_train[idx].astype(np.float32), leaf[idx].astype(np.float32), sw[idx]]
        if num_parents:
            batch.insert(2, targets["parent_probs"][idx].astype(np.float32))
        return tuple(batch)

    types = [tf.float32] * (4 if num_parents else 3)

    def load(idx):
        parts = tf.numpy_function(gather, [idx], types)
        widths = [taxonomy.num_leaves, num_parents] if num_parents else [taxonomy.num_leaves]
        parts = (
            [tf.ensure_shape(parts[0], [None, *x_train.shape[1:]])]
            + [tf.ensure_shape(p, [None, w]) for p, w in zip(parts[1:-1], widths, strict=True)]
            + [tf.ensure_shape(parts[-1], [None])]
        )
        images = augment_batch(parts[0], config, size, seed_gen)
        if rotation is not None:
            images = rotation(images, training=True)
        if config.mixup:
            images, *rest = mix_batch([images, *parts[1:]], config.mixup, seed_gen)
            parts = [images, *rest]
        images = tf.ensure_shape(images, [None, size, size, 3])
        if num_parents:
            return images, {"leaf_probs": parts[1], "parent_probs": parts[2]}, parts[3]
        return images, parts[1], parts[2]

    index_ds = tf.data.Dataset.from_generator(
        lambda: _index_batches(y_train, config), output_signature=tf.TensorSpec([None], tf.int64)
    )
    train_ds = index_ds.map(load, num_parallel_calls=1).prefetch(2)
    val_ds = (x_val.astype("float32"), _targets(keras, taxonomy, y_val, num_parents))

    schedule = keras.optimizers.schedules.CosineDecay(
        config.lr, decay_steps=steps * config.epochs, alpha=0.05
    )
    _compile(keras, model, config, schedule, num_parents)
    (out / rundir.CHECKPOINTS_DIR).mkdir(exist_ok=True)
    stopper = epoch_stopper(keras, config.patience)
    callbacks = [
        stopper,
        keras.callbacks.ModelCheckpoint(
            str(out / rundir.CHECKPOINTS_DIR / "best.weights.h5"),
            monitor=MONITOR,
            mode=MONITOR_MODE,
            save_best_only=True,
            save_weights_only=True,
        ),
        keras.callbacks.TensorBoard(str(out / rundir.LOGS_DIR)),
    ]
    fit = model.fit(
        train_ds,
        steps_per_epoch=steps,
        epochs=config.epochs,
        validation_data=val_ds,
        batch_size=64,
        callbacks=callbacks,
        verbose=1 if sys.stderr.isatty() else 2,
    )
    history = {k: [float(v) for v in vals] for k, vals in fit.history.items()}
    return history, stopper.best_epoch + 1

"""Inception v3 without its top layer: 299x299x3 pixels -> 2048 pooled features.

Two weight sources are supported:

* the project's verified file ``inception/inception_v3_2015_12_05_notop_keras_order.npz``
  (Google's 2015-12-05 ImageNet release): entry ``NN_kernel`` and ``NN_bn_{beta,
  moving_mean,moving_variance}`` belong to the NN-th Conv2D/BatchNorm pair in the creation
  order of ``keras.applications.InceptionV3(include_top=False)``. That release pools the
  last block's (mixed10) pooling branch with a 3x3 stride-1 *max* pool and expects inputs
  ``(x - 128) / 128``;
* Keras's stock ``weights="imagenet"`` notop file (``.h5``, or the string ``"imagenet"``
  where Keras may download it): average pool in mixed10 and inputs ``x / 127.5 - 1``.

The architecture is built here layer by layer (conv without bias -> BatchNorm without
gamma -> ReLU), with deterministic layer names ``conv_NN`` / ``bn_NN`` so that weight
loading does not depend on Keras's global name counter. BatchNorm always runs in
inference mode (the model is only ever called with ``training=False``).
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from influence.datasets.manifest import DataError, DataMissingError

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

logger = logging.getLogger(__name__)

N_CONV = 94
N_PARAMS = 21_802_784
DEFAULT_WEIGHTS = "inception/inception_v3_2015_12_05_notop_keras_order.npz"
WEIGHTS_SHA256 = "94d71dbe83c043bea91a6cb9112ecc205c8ffc665ab03e840b6fcb5764925345"


class WeightsError(DataError):
    """The Inception weights file is missing, unreadable or does not fit the architecture (a
    data error: the experiment scripts exit 3, as for any unreadable data)."""


class WeightsMissingError(WeightsError, DataMissingError):
    """The Inception weights file is not there (exit 2, with the recipe to get it)."""


@dataclass(frozen=True)
class Preprocessing:
    """Map 8-bit pixels to model inputs: ``(x - offset) / scale``; one level is ``1 / scale``."""

    offset: float
    scale: float

    def __call__(self, images_uint8):
        return (np.asarray(images_uint8, dtype=np.float32) - self.offset) / self.scale

    def to_uint8(self, x) -> np.ndarray:
        """Inverse map, rounded to the nearest 8-bit level."""
        return np.clip(np.rint(np.asarray(x, dtype=np.float64) * self.scale + self.offset), 0, 255).astype(np.uint8)

    @property
    def level(self) -> float:
        """One 8-bit grey level in input units."""
        return 1.0 / self.scale

    @property
    def bounds(self) -> tuple[float, float]:
        """Valid input range (pixel 0 and pixel 255)."""
        return (0.0 - self.offset) / self.scale, (255.0 - self.offset) / self.scale


RELEASE_2015 = Preprocessing(offset=128.0, scale=128.0)
KERAS_STOCK = Preprocessing(offset=127.5, scale=127.5)
#: the original release's dog-fish npz: (u / 255 - 0.5) * 2, one level 2/255
ORIGINAL_UNITS = KERAS_STOCK


def build_inception_v3(last_pool: str = "max", input_shape=(299, 299, 3), dtype: str = "float32"):
    """Keras functional Inception v3 (no top) ending in 2048-d global average pooled features.

    ``last_pool``: "max" (the 2015 release) or "avg" (stock Keras) in mixed10's pool branch.
    """
    import keras
    from keras import layers

    counter = [0]

    def conv_bn(x, filters, rows, cols, strides=1, padding="same"):
        i = counter[0]
        counter[0] += 1
        x = layers.Conv2D(filters, (rows, cols), strides=strides, padding=padding, use_bias=False,
                          dtype=dtype, name=f"conv_{i:02d}")(x)
        x = layers.BatchNormalization(axis=3, scale=False, epsilon=1e-3, dtype=dtype, name=f"bn_{i:02d}")(x)
        return layers.Activation("relu", dtype=dtype, name=f"relu_{i:02d}")(x)

    def pool(kind, x, strides=1, padding="same", name=None):
        cls = layers.MaxPooling2D if kind == "max" else layers.AveragePooling2D
        return cls((3, 3), strides=strides, padding=padding, dtype=dtype, name=name)(x)

    def cat(xs, name):
        return layers.Concatenate(axis=3, dtype=dtype, name=name)(xs)

    inp = keras.Input(tuple(input_shape), dtype=dtype, name="pixels")
    x = conv_bn(inp, 32, 3, 3, strides=2, padding="valid")
    x = conv_bn(x, 32, 3, 3, padding="valid")
    x = conv_bn(x, 64, 3, 3)
    x = pool("max", x, strides=2, padding="valid")
    x = conv_bn(x, 80, 1, 1, padding="valid")
    x = conv_bn(x, 192, 3, 3, padding="valid")
    x = pool("max", x, strides=2, padding="valid")

    for block, pool_ch in enumerate((32, 64, 64)):  # mixed0-2: 35x35
        b1 = conv_bn(x, 64, 1, 1)
        b5 = conv_bn(conv_bn(x, 48, 1, 1), 64, 5, 5)
        b3 = conv_bn(conv_bn(conv_bn(x, 64, 1, 1), 96, 3, 3), 96, 3, 3)
        bp = conv_bn(pool("avg", x), pool_ch, 1, 1)
        x = cat([b1, b5, b3, bp], f"mixed{block}")

    b3 = conv_bn(x, 384, 3, 3, strides=2, padding="valid")  # mixed3: 35 -> 17
    b3d = conv_bn(conv_bn(conv_bn(x, 64, 1, 1), 96, 3, 3), 96, 3, 3, strides=2, padding="valid")
    x = cat([b3, b3d, pool("max", x, strides=2, padding="valid")], "mixed3")

    for block, c in zip((4, 5, 6, 7), (128, 160, 160, 192)):  # mixed4-7: 17x17, factorised 7x7
        b1 = conv_bn(x, 192, 1, 1)
        b7 = conv_bn(conv_bn(conv_bn(x, c, 1, 1), c, 1, 7), 192, 7, 1)
        b7d = conv_bn(x, c, 1, 1)
        for f, (r, s) in zip((c, c, c, 192), ((7, 1), (1, 7), (7, 1), (1, 7))):
            b7d = conv_bn(b7d, f, r, s)
        bp = conv_bn(pool("avg", x), 192, 1, 1)
        x = cat([b1, b7, b7d, bp], f"mixed{block}")

    b3 = conv_bn(conv_bn(x, 192, 1, 1), 320, 3, 3, strides=2, padding="valid")  # mixed8: 17 -> 8
    b7 = conv_bn(conv_bn(conv_bn(x, 192, 1, 1), 192, 1, 7), 192, 7, 1)
    b7 = conv_bn(b7, 192, 3, 3, strides=2, padding="valid")
    x = cat([b3, b7, pool("max", x, strides=2, padding="valid")], "mixed8")

    for block in (9, 10):  # mixed9-10: 8x8, expanded filter banks
        b1 = conv_bn(x, 320, 1, 1)
        b3 = conv_bn(x, 384, 1, 1)
        b3 = cat([conv_bn(b3, 384, 1, 3), conv_bn(b3, 384, 3, 1)], f"mixed{block}_b3")
        b3d = conv_bn(conv_bn(x, 448, 1, 1), 384, 3, 3)
        b3d = cat([conv_bn(b3d, 384, 1, 3), conv_bn(b3d, 384, 3, 1)], f"mixed{block}_b3dbl")
        kind = last_pool if block == 10 else "avg"
        bp = conv_bn(pool(kind, x), 192, 1, 1)
        x = cat([b1, b3, b3d, bp], f"mixed{block}")

    feats = layers.GlobalAveragePooling2D(dtype=dtype, name="avg_pool")(x)
    assert counter[0] == N_CONV
    return keras.Model(inp, feats, name=f"inception_v3_notop_{last_pool}pool")


def _load_npz(model, path: Path) -> None:
    try:
        z = np.load(path)
        entries = {k: z[k] for k in z.files}
    except Exception as exc:  # zipfile / pickle / OS errors
        raise WeightsError(f"cannot read Inception weights {path}: {exc}") from exc
    assigned = set()
    for i in range(N_CONV):
        conv, bn = model.get_layer(f"conv_{i:02d}"), model.get_layer(f"bn_{i:02d}")
        targets = {f"{i:02d}_kernel": conv.kernel, f"{i:02d}_bn_beta": bn.beta,
                   f"{i:02d}_bn_moving_mean": bn.moving_mean, f"{i:02d}_bn_moving_variance": bn.moving_variance}
        for key, var in targets.items():
            if key not in entries:
                raise WeightsError(f"{path} has no entry {key!r}: not the Inception v3 notop npz this project "
                                   f"expects (see data/README.md)")
            if tuple(entries[key].shape) != tuple(var.shape):
                raise WeightsError(f"{path}: entry {key!r} has shape {entries[key].shape}, the model's "
                                   f"{var.path} has {tuple(var.shape)}")
            var.assign(entries[key].astype(var.dtype))
            assigned.add(key)
    extra = set(entries) - assigned
    if extra:
        raise WeightsError(f"{path} has {len(extra)} entries the model does not use, e.g. {sorted(extra)[:3]}")


def load_inception(weights: str | os.PathLike | None = None, data_dir=None, verify_checksum: bool = False):
    """``(keras_model, preprocessing)`` for Inception v3 features with ImageNet weights.

    ``weights``: a path to the project's ``.npz`` (default: ``<data_dir>/inception/...npz``),
    a Keras notop ``.h5`` file, or ``"imagenet"`` (Keras's own download, needs internet).
    """
    from influence.datasets.manifest import DataMissingError, resolve_data_dir

    if weights is None:
        weights = resolve_data_dir(data_dir) / DEFAULT_WEIGHTS
        if not Path(weights).is_file():
            raise DataMissingError(f"missing Inception weights {weights}. They are part of the shared data folder "
                            f"(see data/README.md: inception/); or pass weights='imagenet' / a Keras notop .h5 "
                            f"file to use Keras's stock weights.")
    if str(weights) == "imagenet" or str(weights).endswith(".h5"):
        if str(weights) != "imagenet" and not Path(weights).is_file():
            raise WeightsMissingError(f"missing Inception weights file {weights}")
        model = build_inception_v3(last_pool="avg")
        try:
            import keras
            stock = keras.applications.InceptionV3(include_top=False, weights=str(weights), pooling="avg",
                                                   input_shape=(299, 299, 3))
        except Exception as exc:
            raise WeightsError(f"cannot load Keras Inception v3 weights {weights}: {exc}") from exc
        convs = [layer for layer in stock.layers if layer.__class__.__name__ == "Conv2D"]
        bns = [layer for layer in stock.layers if layer.__class__.__name__ == "BatchNormalization"]
        def key(layer):  # creation order: conv2d, conv2d_1, ... (the counter may start later)
            m = re.search(r"_(\d+)$", layer.name)
            return int(m.group(1)) if m else 0

        for i, (c, b) in enumerate(zip(sorted(convs, key=key), sorted(bns, key=key))):
            model.get_layer(f"conv_{i:02d}").set_weights(c.get_weights())
            model.get_layer(f"bn_{i:02d}").set_weights(b.get_weights())
        return model, KERAS_STOCK
    path = Path(weights)
    if not path.is_file():
        raise WeightsMissingError(f"missing Inception weights file {path} (see data/README.md: inception/)")
    if verify_checksum:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != WEIGHTS_SHA256:
            raise WeightsError(f"{path} does not match the verified checksum ({digest[:12]}...)")
    model = build_inception_v3(last_pool="max")
    _load_npz(model, path)
    return model, RELEASE_2015


def weights_fingerprint(weights_path) -> str:
    """Cheap cache key for a weights file: size, mtime-independent head/tail hash."""
    path = Path(weights_path)
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:16]

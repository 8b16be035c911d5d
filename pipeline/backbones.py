"""Registry of frozen `keras.applications` backbones, built without their classifier top.

Each entry knows its Keras constructor, its own ``preprocess_input``, its native input size
and the width of its last feature map (at alpha 1). Weights are ``imagenet`` (Keras's own
download and cache under ``KERAS_HOME``), ``none`` (random, for tests) or a local file.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class BackboneSpec:
    name: str
    keras_name: str  # constructor in keras.applications
    module: str  # keras.applications submodule holding preprocess_input
    input_size: int
    width: int  # channels of the last feature map, alpha 1
    has_alpha: bool = False


def _specs() -> dict[str, BackboneSpec]:
    rows = [
        ("mobilenet", "MobileNet", "mobilenet", 224, 1024, True),
        ("mobilenet_v2", "MobileNetV2", "mobilenet_v2", 224, 1280, True),
        ("mobilenet_v3_small", "MobileNetV3Small", "mobilenet_v3", 224, 576, True),
        ("mobilenet_v3_large", "MobileNetV3Large", "mobilenet_v3", 224, 960, True),
        ("resnet50", "ResNet50", "resnet", 224, 2048, False),
        ("resnet101", "ResNet101", "resnet", 224, 2048, False),
        ("resnet152", "ResNet152", "resnet", 224, 2048, False),
        ("resnet50_v2", "ResNet50V2", "resnet_v2", 224, 2048, False),
        ("resnet101_v2", "ResNet101V2", "resnet_v2", 224, 2048, False),
        ("resnet152_v2", "ResNet152V2", "resnet_v2", 224, 2048, False),
        ("densenet121", "DenseNet121", "densenet", 224, 1024, False),
        ("densenet169", "DenseNet169", "densenet", 224, 1664, False),
        ("densenet201", "DenseNet201", "densenet", 224, 1920, False),
        ("vgg16", "VGG16", "vgg16", 224, 512, False),
        ("vgg19", "VGG19", "vgg19", 224, 512, False),
        ("xception", "Xception", "xception", 299, 2048, False),
        ("inception_v3", "InceptionV3", "inception_v3", 299, 2048, False),
        ("inception_resnet_v2", "InceptionResNetV2", "inception_resnet_v2", 299, 1536, False),
        ("nasnet_mobile", "NASNetMobile", "nasnet", 224, 1056, False),
        ("nasnet_large", "NASNetLarge", "nasnet", 331, 4032, False),
    ]
    efficientnet = [(224, 1280), (240, 1280), (260, 1408), (300, 1536),
                    (380, 1792), (456, 2048), (528, 2304), (600, 2560)]
    for i, (size, width) in enumerate(efficientnet):
        rows.append((f"efficientnet_b{i}", f"EfficientNetB{i}", "efficientnet", size, width, False))
    for suffix, size, width in [("B0", 224, 1280), ("B1", 240, 1280), ("B2", 260, 1408),
                                ("B3", 300, 1536), ("S", 384, 1280), ("M", 480, 1280),
                                ("L", 480, 1280)]:
        rows.append((f"efficientnet_v2_{suffix.lower()}", f"EfficientNetV2{suffix}",
                     "efficientnet_v2", size, width, False))
    for size_name, keras_size, width in [("tiny", "Tiny", 768), ("small", "Small", 768),
                                         ("base", "Base", 1024), ("large", "Large", 1536),
                                         ("xlarge", "XLarge", 2048)]:
        rows.append((f"convnext_{size_name}", f"ConvNeXt{keras_size}", "convnext", 224, width, False))
    return {r[0]: BackboneSpec(*r) for r in rows}


BACKBONES: dict[str, BackboneSpec] = _specs()


def get_spec(name: str) -> BackboneSpec:
    try:
        return BACKBONES[name]
    except KeyError:
        raise PipelineError(f"unknown backbone {name!r}; valid: {', '.join(BACKBONES)} "
                            "(`python -m pipeline backbones` lists them)") from None


def weights_identity(weights: str) -> str:
    """What the cache key records for ``weights``: its sha256 for a file, else the name + Keras."""
    if weights in ("imagenet", "none"):  # importlib.metadata: no TensorFlow start-up for a no-op
        from importlib.metadata import version

        return f"imagenet@keras-{version('keras')}" if weights == "imagenet" else "none"
    path = Path(weights)
    if not path.is_file():
        raise PipelineError(f"weights {weights!r}: not 'imagenet', 'none' or an existing file")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return f"sha256:{h.hexdigest()}"


class _LookedUp(Exception):
    pass


def missing_imagenet_weights(name: str, alpha: float | None = None) -> str | None:
    """Why ``name``'s ImageNet weights are not on this machine ("would download FILE", or
    Keras's reason there are none), or None if they are in ``$KERAS_HOME/models``. Builds the
    model (TensorFlow's start-up) and stops where Keras looks the file up: nothing is
    downloaded. For plans and dry runs."""
    import keras
    from keras.src.utils import file_utils  # where every keras.applications model asks

    spec = get_spec(name)
    home = Path(os.environ.get("KERAS_HOME") or "~/.keras").expanduser()
    looked_up: list[str] = []

    def get_file(fname=None, origin=None, *args, **kwargs):
        looked_up.append(fname or (origin or "").rsplit("/", 1)[-1])
        raise _LookedUp

    real, file_utils.get_file = file_utils.get_file, get_file
    try:
        with _fresh_layer_names():
            getattr(keras.applications, spec.keras_name)(
                include_top=False, weights="imagenet", input_shape=(spec.input_size,) * 2 + (3,),
                **({"alpha": alpha} if alpha is not None else {}))
    except _LookedUp:
        pass
    except ValueError as exc:  # e.g. an alpha without ImageNet weights: said as it will be
        return f"none for alpha {alpha}: {str(exc).splitlines()[0][:120]}"
    finally:
        file_utils.get_file = real
    missing = [f for f in looked_up if not (home / "models" / f).is_file()]
    return f"would download {missing[0]} into {home}/models" if missing else None


def build_backbone(name: str, *, weights: str = "imagenet", alpha: float | None = None,
                   input_size: int | None = None):
    """The frozen Keras model without its top, taking preprocessed float images."""
    import keras

    spec = get_spec(name)
    if alpha is not None and not spec.has_alpha:
        raise PipelineError(f"backbone {name!r} takes no alpha; only the MobileNets do")
    size = input_size or spec.input_size
    kwargs = {"include_top": False, "input_shape": (size, size, 3),
              "weights": "imagenet" if weights == "imagenet" else None}
    if alpha is not None:
        kwargs["alpha"] = alpha
    constructor = getattr(keras.applications, spec.keras_name)
    if weights != "imagenet":
        keras.utils.set_random_seed(0)  # weights "none" must be one fixed model, run after run
    try:
        if weights == "imagenet" and size != spec.input_size:
            # Keras keeps ImageNet files for the native size (a few MobileNets have more);
            # convolution weights do not depend on the input size, so copy them across.
            with _fresh_layer_names():
                native = constructor(**{**kwargs, "input_shape": (spec.input_size,) * 2 + (3,)})
            with _fresh_layer_names():
                model = constructor(**{**kwargs, "weights": None})
            model.set_weights(native.get_weights())
        else:
            with _fresh_layer_names():
                model = constructor(**kwargs)
    except ValueError as exc:
        raise PipelineError(f"backbone {name!r} cannot be built with input {size}x{size}"
                            f"{'' if alpha is None else f' and alpha {alpha}'}: "
                            f"{str(exc).splitlines()[0]}") from None
    except Exception as exc:  # keras raises bare Exception when a download fails
        home = os.environ.get("KERAS_HOME", "~/.keras")
        url = re.search(r"https?://\S+?\.h5", str(exc))
        wanted = f"Keras's file {url.group(0).rsplit('/', 1)[1]}" if url else "Keras's weights file"
        why = "download failed" if url else f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        raise PipelineError(
            f"backbone {name!r}: ImageNet weights are not in {home}/models/ and could not be "
            f"fetched ({why}); without a network, copy {wanted} there (or set KERAS_HOME to a "
            "folder whose models/ holds it), or pass --weights PATH") from None
    if weights not in ("imagenet", "none"):
        try:
            model.load_weights(weights)
        except Exception as exc:
            raise PipelineError(
                f"weights file {weights!r} does not fit {name}"
                f"{'' if alpha is None else f' alpha {alpha}'} without top: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}") from None
    model.trainable = False
    return model


@contextlib.contextmanager
def _fresh_layer_names():
    """Keras numbers unnamed layers (``conv2d_49``) across the process: a model built after
    another would get other names than in a process of its own. Layers are chosen by name
    (``--layer``, a key part), so every backbone is built numbered as in a fresh process."""
    from keras.src.backend.common import global_state  # where keras.backend.get_uid counts

    before = global_state.get_global_attribute("object_name_uids")
    global_state.set_global_attribute("object_name_uids", collections.defaultdict(int))
    try:
        yield
    finally:
        global_state.set_global_attribute("object_name_uids", before)


def preprocess_input(name: str):
    """The backbone's own ``preprocess_input`` (identity for models that rescale inside)."""
    import keras

    return getattr(keras.applications, get_spec(name).module).preprocess_input

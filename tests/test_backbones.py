import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO

from pipeline.backbones import BACKBONES, build_backbone, get_spec, preprocess_input, weights_identity
from pipeline.errors import PipelineError


def test_registry_covers_the_keras_application_families():
    names = set(BACKBONES)
    for expected in ("mobilenet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                     "resnet50", "resnet152_v2", "densenet201", "efficientnet_b7",
                     "efficientnet_v2_s", "vgg16", "vgg19", "xception", "inception_v3",
                     "inception_resnet_v2", "nasnet_mobile", "nasnet_large", "convnext_tiny"):
        assert expected in names
    assert get_spec("inception_v3").input_size == 299
    assert get_spec("efficientnet_b3").input_size == 300


def test_every_entry_names_a_real_keras_constructor_and_preprocess_function():
    import keras

    for spec in BACKBONES.values():
        assert callable(getattr(keras.applications, spec.keras_name)), spec.name
        assert callable(preprocess_input(spec.name)), spec.name


def test_every_preprocess_input_is_one_affine_map_of_each_pixel():
    """What lets the graph preprocess before it resizes: f(x) = x A + b on each pixel's
    channels (scaling, shifting, RGB to BGR), so f commutes with the bilinear resize, whose
    outputs are weighted means of pixels with weights summing to one."""
    import tensorflow as tf

    x = np.random.default_rng(0).uniform(0, 255, (2, 5, 5, 3)).astype(np.float32)
    for spec in BACKBONES.values():
        f = preprocess_input(spec.name)
        b = np.asarray(f(tf.zeros((1, 1, 1, 3)))).reshape(3)
        A = np.stack([np.asarray(f(tf.constant(np.eye(3, dtype=np.float32)[i].reshape(1, 1, 1, 3))))
                      .reshape(3) - b for i in range(3)])
        np.testing.assert_allclose(np.asarray(f(tf.constant(x))), x @ A + b, rtol=1e-5, atol=1e-4,
                                   err_msg=spec.name)


@pytest.mark.bad_input
def test_unknown_backbone_lists_the_valid_ones():
    with pytest.raises(PipelineError, match="unknown backbone 'resnet5'; valid: mobilenet, "):
        get_spec("resnet5")


@pytest.mark.parametrize("name, size", [("mobilenet_v3_small", 64), ("resnet50", 64),
                                        ("densenet121", 64), ("efficientnet_b0", 64),
                                        ("convnext_tiny", 64), ("vgg16", 64)])
def test_families_build_without_top_at_their_registered_width(name, size):
    model = build_backbone(name, weights="none", input_size=size)
    assert model.output_shape[-1] == get_spec(name).width
    assert not model.trainable


def test_random_weights_are_the_same_model_every_time():
    a = build_backbone("mobilenet_v2", weights="none", alpha=0.35, input_size=32)
    b = build_backbone("mobilenet_v2", weights="none", alpha=0.35, input_size=32)
    assert all(np.array_equal(x, y) for x, y in zip(a.get_weights(), b.get_weights()))


def test_unnamed_layers_have_a_fresh_processs_names_whatever_was_built_before():
    # --layer picks layers by name, a key part: Keras's running numbers (activation_17,
    # conv2d_49) must not depend on what the process built before (an experiment's grid).
    import keras

    code = ("from pipeline.backbones import build_backbone; "
            "print([l.name for l in build_backbone('mobilenet_v3_small', weights='none', "
            "input_size=32).layers])")
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd=REPO).stdout.strip()
    build_backbone("mobilenet_v3_small", weights="none", input_size=32)
    keras.layers.Activation("relu")  # the user's own layers count too
    again = build_backbone("mobilenet_v3_small", weights="none", input_size=32)
    assert "activation_17" in fresh and str([layer.name for layer in again.layers]) == fresh


def test_weights_identity_is_the_file_hash_or_the_keras_version(tmp_path):
    from importlib.metadata import version

    (tmp_path / "w.h5").write_bytes(b"abc")
    assert weights_identity(str(tmp_path / "w.h5")) == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
    assert weights_identity("imagenet") == f"imagenet@keras-{version('keras')}"
    with pytest.raises(PipelineError, match="not 'imagenet', 'none' or an existing file"):
        weights_identity(str(tmp_path / "missing.h5"))


@pytest.mark.bad_input
def test_image_size_too_small_for_the_backbone_is_one_line():
    with pytest.raises(PipelineError, match="cannot be built with input 16x16") as info:
        build_backbone("resnet50", weights="none", input_size=16)
    assert "\n" not in str(info.value)


@pytest.mark.bad_input
def test_alpha_only_for_mobilenets():
    with pytest.raises(PipelineError, match="takes no alpha"):
        build_backbone("vgg16", weights="none", alpha=0.5)


@pytest.mark.bad_input
@pytest.mark.slow
def test_imagenet_without_network_or_files_says_how_to_supply_them():
    # ResNet50's ImageNet file is not in ../shared/keras and this machine has no network.
    with pytest.raises(PipelineError, match="KERAS_HOME.*--weights PATH"):
        build_backbone("resnet50", weights="imagenet", input_size=64)


@pytest.mark.slow
def test_real_imagenet_weights_load_offline(shared_weights):
    model = build_backbone("mobilenet", weights="imagenet", alpha=0.25)
    assert model.count_params() == 218_544
    model = build_backbone("mobilenet_v2", weights="imagenet", alpha=0.35)
    assert model.count_params() == 410_208

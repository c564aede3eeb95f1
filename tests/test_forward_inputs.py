"""Models that take more than the images (issue 21, item 8): extra forward arguments, fixed or one
row per image (camlens.PerImage), reach every forward pass of every method, the batched and masked
ones included (Score-CAM's masked copies, Smooth Grad-CAM++'s noisy ones, AugmentSmooth's flips), as
Captum's additional_forward_args; a CLIP-style image-text similarity is explained by text."""

from __future__ import annotations

import inspect
import warnings

import pytest
import torch
from torch import nn

import camlens
from camlens import CamlensError, PerImage

LAYER = "features"


class Masked(nn.Module):
    """Scores that depend on a per-image ``mask`` (N, 8, 8) over the feature map and a fixed ``text``
    (T, 6) matrix, CLIP-like: the class scores are the pooled features' similarities to the T texts."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU())
        self.project = nn.Linear(6, 6)

    def forward(self, x, text, mask=None, scale=1.0):
        a = self.features(x)
        if mask is not None:
            a = a * mask[:, None]
        return scale * self.project(a.mean(dim=(2, 3))) @ text.T


class Bound(nn.Module):
    """The reference: the model with one image's mask and the text bound in, images only."""

    def __init__(self, model, text, mask=None, scale=1.0) -> None:
        super().__init__()
        self.model, self.text, self.mask, self.scale = model, text, mask, scale

    def forward(self, x):
        mask = None if self.mask is None else self.mask.expand(x.shape[0], -1, -1)
        return self.model(x, self.text, mask=mask, scale=self.scale)


def methods():
    return [name for name in camlens.METHODS if name != "cam"]


def seeded(name):
    return {"seed": 0} if "seed" in inspect.signature(camlens.METHODS[name]).parameters else {}


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 8, 8, generator=generator, dtype=torch.float64)
    text = torch.randn(4, 6, generator=generator, dtype=torch.float64)
    mask = (torch.rand(3, 8, 8, generator=generator) > 0.3).double()
    return images, text, mask


@pytest.mark.parametrize("name", methods())
def test_per_image_and_fixed_arguments_reach_every_pass(name, data):
    images, text, mask = data
    model = Masked().double().eval()
    method = camlens.METHODS[name](model, LAYER, **seeded(name))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = method(images, [1, 2, 3], forward_args=(text,), forward_kwargs={"mask": PerImage(mask), "scale": 2.0})
        # A seeded method draws the noise of all images at once: the first image's is the same alone.
        for i in range(1 if seeded(name) else 3):
            alone = camlens.METHODS[name](Bound(model, text, mask[i : i + 1], 2.0), "model.features", **seeded(name))
            expected = alone(images[i : i + 1], [1 + i])
            torch.testing.assert_close(batch.maps[i : i + 1], expected.maps, rtol=1e-7, atol=1e-9)
    assert batch.options["forward inputs"] == "arg 0: fixed (4, 6); mask: per image (3, 8, 8); scale: fixed float"


@pytest.mark.parametrize("name", ["gradcam", "scorecam", "smoothgradcam++"])
def test_augment_smooth_gives_each_copy_its_images_arguments(name, data):
    images, text, mask = data
    model = Masked().double().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = camlens.explain(model, images, name, LAYER, [0, 1, 2], aug_smooth=True, forward_args=(text,),
                                forward_kwargs={"mask": PerImage(mask)}, **seeded(name))
        for i in range(1 if seeded(name) else 3):
            expected = camlens.explain(Bound(model, text, mask[i : i + 1]), images[i : i + 1], name, "model.features",
                                       [i], aug_smooth=True, **seeded(name))
            torch.testing.assert_close(batch.maps[i : i + 1], expected.maps, rtol=1e-7, atol=1e-9)


def test_the_default_layer_is_found_with_the_arguments(data):
    images, text, mask = data
    model = Masked().double().eval()
    got = camlens.explain(model, images, "gradcam", targets=[0, 1, 2], forward_args=(text,),
                          forward_kwargs={"mask": PerImage(mask)})
    assert got.target_layers == (LAYER,) and got.default_layer


class TakesPixelValues(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Masked()

    def forward(self, input_ids=None, pixel_values=None):
        return self.inner(pixel_values, input_ids)


def test_images_as_names_the_argument_the_images_go_to(data):
    images, text, _ = data
    model = TakesPixelValues().double().eval()
    got = camlens.explain(model, images, "scorecam", "inner.features", [0, 1, 2],
                          forward_kwargs={"input_ids": text}, images_as="pixel_values")
    expected = camlens.explain(Bound(model.inner, text), images, "scorecam", "model.features", [0, 1, 2])
    torch.testing.assert_close(got.maps, expected.maps, rtol=0, atol=0)
    assert got.options["forward inputs"] == "images as pixel_values; input_ids: fixed (4, 6)"


@pytest.mark.parametrize("kwargs, message", [
    ({"forward_kwargs": {"mask": PerImage(torch.ones(2, 8, 8))}},
     r"a PerImage argument of shape \(2, 8, 8\) has 2 rows for 3 images: give one row per image"),
    ({"images_as": "pixel values"}, r"images_as is the name of the model's image argument"),
    ({"forward_kwargs": {"pixel_values": 1}, "images_as": "pixel_values"}, r"forward_kwargs gives 'pixel_values'"),
    ({"forward_kwargs": [1]}, r"forward_kwargs is a dict of keyword arguments, not list"),
])
def test_bad_forward_inputs_are_one_line(data, kwargs, message):
    images, text, _ = data
    with pytest.raises(CamlensError, match=message) as error:
        camlens.explain(Masked().double().eval(), images, "gradcam", LAYER, forward_args=(text,), **kwargs)
    assert "\n" not in str(error.value)


def test_per_image_needs_a_tensor():
    with pytest.raises(CamlensError, match="PerImage holds a tensor with one row per image"):
        PerImage([1, 2])


def test_other_threads_calls_of_the_model_get_nothing_added(data):
    """The arguments are added by a pre-hook that reads a context variable: a call of the model
    from another thread while a method runs (here: started by a target function) is left alone."""
    import threading

    images, text, _ = data
    model = Masked().double().eval()
    seen = []

    def target(output):
        thread = threading.Thread(target=lambda: seen.append(model(images[:1], text).shape))  # its own arguments
        thread.start()
        thread.join()
        return output[:, 0]

    camlens.explain(model, images, "gradcam", LAYER, target, forward_args=(text,))
    assert seen and all(shape == (1, 4) for shape in seen)


transformers = pytest.importorskip("transformers")


def test_a_clip_model_explained_by_text(data):
    """The worked example (docs/models.md): which part of the image makes it match each text. The images
    go to pixel_values, the texts' token ids are fixed, and the class scores are logits_per_image."""
    torch.manual_seed(0)
    config = transformers.CLIPConfig(
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=50, max_position_embeddings=8),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8),
        projection_dim=16)
    model = transformers.CLIPModel(config).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    texts = torch.randint(0, 50, (3, 6), generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = camlens.explain(model, images, "gradcam", targets=[2, 0], output="logits_per_image",
                              forward_kwargs={"input_ids": texts}, images_as="pixel_values")
    layer = "vision_model.encoder.layers.1.layer_norm1"
    assert got.target_layers == (layer,) and got.options["reshape"] == "tokens:1:4x4"
    # By hand: the gradient of each image's similarity to its text at the layer's patch tokens.
    kept = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, out: kept.setdefault("a", out))
    try:
        similarity = model(input_ids=texts, pixel_values=images).logits_per_image
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(similarity[0, 2] + similarity[1, 0], kept["a"])
    grid = lambda t: t[:, 1:].transpose(1, 2).reshape(2, 32, 4, 4)  # noqa: E731
    raw = torch.relu((grid(grad).mean(dim=(2, 3), keepdim=True) * grid(kept["a"])).sum(1))
    torch.testing.assert_close(got.raw[layer][:, 0], raw.detach(), rtol=1e-5, atol=1e-6)

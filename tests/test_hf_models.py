"""Models people actually use (issue 21), built from small transformers configs with random weights
(no download): with no layer given, the default target layer is a map of what the model concluded,
or a one-line refusal naming the candidates; Grad-CAM there equals a plain-torch computation; one
map per image; the model is left as it was. transformers is a test-only dependency."""

from __future__ import annotations

import warnings

import pytest
import torch

import camlens

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8, num_labels=5)


def build(name):
    t = transformers
    return {
        "vit": lambda: t.ViTForImageClassification(t.ViTConfig(**SMALL)),
        "deit": lambda: t.DeiTForImageClassificationWithTeacher(t.DeiTConfig(**SMALL)),
        "beit": lambda: t.BeitForImageClassification(t.BeitConfig(**SMALL, use_relative_position_bias=True)),
        "dinov2": lambda: t.Dinov2ForImageClassification(t.Dinov2Config(**SMALL)),
        "swin": lambda: t.SwinForImageClassification(t.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 2], window_size=4, num_labels=5)),
        "convnext": lambda: t.ConvNextForImageClassification(t.ConvNextConfig(
            num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)),
        "resnet": lambda: t.ResNetForImageClassification(t.ResNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5)),
        "regnet": lambda: t.RegNetForImageClassification(t.RegNetConfig(
            embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8, num_labels=5)),
        "mobilenetv2": lambda: t.MobileNetV2ForImageClassification(t.MobileNetV2Config(
            image_size=64, depth_multiplier=0.25, num_labels=5)),
        "segformer": lambda: t.SegformerForSemanticSegmentation(t.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
            decoder_hidden_size=16, num_labels=5, patch_sizes=[7, 3], strides=[4, 2])),
        "dpt": lambda: t.DPTForDepthEstimation(t.DPTConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8, backbone_out_indices=[0, 1, 2, 3],
            head_in_index=-1)),
    }[name]()


# name -> (output selector, the expected default layer, or None for a refusal that names token layers)
FAMILIES = {
    "vit": ("logits", None),
    "deit": ("logits", None),
    "beit": ("logits", None),  # its relative_position_bias was picked: one blank map for two images
    "dinov2": ("logits", None),
    "swin": ("logits", None),
    "convnext": ("logits", "convnext.encoder.stages.1"),
    "resnet": ("logits", "resnet.encoder.stages.1"),
    "regnet": ("logits", "regnet.encoder.stages.1"),
    "mobilenetv2": ("logits", "mobilenet_v2.conv_1x1"),
    "segformer": ("logits", "decode_head.dropout"),  # decode_head, the logits, was picked
    "dpt": ("predicted_depth", "head.head.3"),  # head.head, the depth output, was picked
}
DENSE = {"segformer", "dpt"}


def dense_sum(output):
    return output.flatten(1).sum(1)


def state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [p.detach().clone() for p in model.parameters()])


def by_hand(model, layer, images, selector, dense):
    """Grad-CAM at ``layer`` in plain torch: the score's gradient at the layer's output."""
    module = dict(model.named_modules())[layer]
    kept = {}
    handle = module.register_forward_hook(lambda m, i, out: kept.setdefault("a", out))
    try:
        output = getattr(model(images), selector)
    finally:
        handle.remove()
    scores = dense_sum(output) if dense else output.gather(1, output.argmax(1, keepdim=True))[:, 0]
    (grad,) = torch.autograd.grad(scores.sum(), kept["a"])
    raw = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * kept["a"]).sum(1))
    return raw.detach()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_default_layer_is_a_map_of_what_the_model_concluded_or_refused(name):
    selector, expected = FAMILIES[name]
    torch.manual_seed(0)
    model = build(name).eval()
    size = 64 if name == "mobilenetv2" else 32
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    targets = dense_sum if name in DENSE else None
    before = state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if expected is None:
            with pytest.raises(camlens.CamlensError, match=r"output tokens \(.*: camlens does not pick a token layer "
                                                           r"by itself; name one with target_layer= and "
                                                           r"reshape='tokens'"):
                camlens.explain(model, images, "gradcam", output=selector, targets=targets)
        else:
            explanation = camlens.explain(model, images, "gradcam", output=selector, targets=targets)
            assert explanation.target_layers == (expected,)
            assert explanation.maps.shape[:2] == (3, 1)
            expected_raw = by_hand(model, expected, images, selector, name in DENSE)
            torch.testing.assert_close(explanation.raw[expected][:, 0], expected_raw, rtol=1e-5, atol=1e-6)
    after = state(model)
    assert before[0] == after[0] and before[1] == after[1]
    assert all(torch.equal(a, b) for a, b in zip(before[2], after[2]))


def test_a_named_token_layer_is_explained_one_map_per_image():
    """The refusal's way out works: the input of the last block's attention, read as tokens."""
    torch.manual_seed(0)
    model = build("vit").eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explanation = camlens.explain(model, images, "gradcam", target_layer="vit.layers.1.layernorm_before",
                                      reshape="tokens", output="logits")
    assert explanation.maps.shape == (2, 1, 32, 32)
    assert not bool(explanation.blank.any())

"""Models people actually use (issue 21), built from small transformers configs with random weights
(no download): with no layer given, the default target layer is a map of what the model concluded,
its token layout inferred; Grad-CAM there equals a plain-torch computation; one map per image; the
model is left as it was. transformers is a test-only dependency."""

from __future__ import annotations

import warnings

import pytest
import torch

import camlens

transformers = pytest.importorskip("transformers")

SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
             patch_size=8, num_labels=5)


def random_head(model):
    """transformers starts EfficientNet's classifier (and more) at zero: every score, and every map, would be
    0. PyTorch's own initialisation of each layer instead."""
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model


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
        "efficientnet": lambda: random_head(t.EfficientNetForImageClassification(t.EfficientNetConfig(
            image_size=64, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320, num_labels=5))),
        "dinov2-registers": lambda: t.Dinov2WithRegistersForImageClassification(t.Dinov2WithRegistersConfig(
            **SMALL, num_register_tokens=4)),
        "clip": lambda: t.CLIPVisionModel(t.CLIPVisionConfig(**{k: v for k, v in SMALL.items() if k != "num_labels"})),
        "clip-projection": lambda: t.CLIPVisionModelWithProjection(t.CLIPVisionConfig(
            **{k: v for k, v in SMALL.items() if k != "num_labels"}, projection_dim=6)),
        "upernet": lambda: t.UperNetForSemanticSegmentation(t.UperNetConfig(
            backbone_config=t.ConvNextConfig(num_stages=4, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1],
                                             out_features=["stage1", "stage2", "stage3", "stage4"]),
            hidden_size=16, auxiliary_in_channels=24, auxiliary_channels=8, num_labels=5, pool_scales=[1, 2])),
        "segformer": lambda: t.SegformerForSemanticSegmentation(t.SegformerConfig(
            num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[8, 16], num_attention_heads=[1, 2],
            decoder_hidden_size=16, num_labels=5, patch_sizes=[7, 3], strides=[4, 2])),
        "dpt": lambda: t.DPTForDepthEstimation(t.DPTConfig(
            hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8, neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8, backbone_out_indices=[0, 1, 2, 3],
            head_in_index=-1)),
    }[name]()


# name -> (output selector, the expected default layer, how it is read). Before issue 21: ViT, DeiT, DINOv2 and
# CLIP got their patch embedding, Swin and BEiT a relative position bias table (one blank map for two images),
# Segformer and UperNet their logits (UperNet's auxiliary head first), DPT its depth output.
FAMILIES = {
    # Heads that read the class token(s): the input of the last attention, the last block's first norm.
    "vit": ("logits", "vit.layers.1.layernorm_before", "tokens:1:4x4"),
    "deit": ("logits", "deit.layers.1.layernorm_before", "tokens:2:4x4"),  # class and distillation tokens
    "clip": ("pooler_output", "encoder.layers.1.layer_norm1", "tokens:1:4x4"),
    "clip-projection": ("image_embeds", "vision_model.encoder.layers.1.layer_norm1", "tokens:1:4x4"),
    # Heads that pool the patch tokens: the sequence they pool.
    "beit": ("logits", "beit.layers.1", "tokens:1:4x4"),  # its final "layernorm" is an nn.Identity
    "dinov2": ("logits", "dinov2.layernorm", "tokens:1:4x4"),
    "dinov2-registers": ("logits", "dinov2_with_registers.layernorm", "tokens:5:4x4"),  # + 4 registers
    "swin": ("logits", "swin.layernorm", "tokens:0:4x4"),  # (N, L, C) on its final grid
    # Convolutional stages: the last feature map.
    "convnext": ("logits", "convnext.encoder.stages.1", None),
    "resnet": ("logits", "resnet.encoder.stages.1", None),
    "regnet": ("logits", "regnet.encoder.stages.1", None),
    "mobilenetv2": ("logits", "mobilenet_v2.conv_1x1", None),
    "efficientnet": ("logits", "efficientnet.encoder.top_activation", None),
    # Dense outputs: the last map before the logits or the depth, at any resolution.
    "segformer": ("logits", "decode_head.dropout", None),
    "upernet": ("logits", "decode_head.fpn_bottleneck", None),
    "dpt": ("predicted_depth", "head.head.3", None),
}
DENSE = {"segformer", "upernet", "dpt"}


def dense_sum(output):
    return output.flatten(1).sum(1)


def state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [p.detach().clone() for p in model.parameters()])


def by_hand(model, layer, images, selector, dense, prefix):
    """Grad-CAM at ``layer`` in plain torch: the score's gradient at the layer's output; for tokens
    (N, L, D), the patch tokens after ``prefix`` laid row-major on their square grid."""
    module = dict(model.named_modules())[layer]
    kept = {}
    handle = module.register_forward_hook(lambda m, i, out: kept.setdefault("a", out))
    try:
        output = getattr(model(images), selector)
    finally:
        handle.remove()
    scores = dense_sum(output) if dense else output.gather(1, output.argmax(1, keepdim=True))[:, 0]
    (grad,) = torch.autograd.grad(scores.sum(), kept["a"])
    activation = kept["a"]
    if activation.dim() == 3:
        side = int((activation.shape[1] - prefix) ** 0.5)
        grid = lambda t: t[:, prefix:].transpose(1, 2).reshape(t.shape[0], t.shape[2], side, side)  # noqa: E731
        activation, grad = grid(activation), grid(grad)
    raw = torch.relu((grad.mean(dim=(2, 3), keepdim=True) * activation).sum(1))
    return raw.detach()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_the_default_layer_is_a_map_of_what_the_model_concluded(name):
    selector, expected, layout = FAMILIES[name]
    torch.manual_seed(0)
    model = build(name).eval()
    size = 64 if name in ("mobilenetv2", "efficientnet", "upernet") else 32
    images = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(1))
    targets = dense_sum if name in DENSE else None
    before = state(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        explanation = camlens.explain(model, images, "gradcam", output=selector, targets=targets)
    assert explanation.target_layers == (expected,) and explanation.default_layer
    assert explanation.options.get("reshape") == layout
    assert explanation.maps.shape == (3, 1, size, size)  # one map per image
    assert not bool(explanation.blank.any())
    prefix = 0 if layout is None else int(layout.split(":")[1])
    expected_raw = by_hand(model, expected, images, selector, name in DENSE, prefix)
    torch.testing.assert_close(explanation.raw[expected][:, 0], expected_raw, rtol=1e-5, atol=1e-6)
    after = state(model)
    assert before[0] == after[0] and before[1] == after[1]
    assert all(torch.equal(a, b) for a, b in zip(before[2], after[2]))


def test_the_patch_tokens_after_the_last_attention_would_give_blank_maps():
    """Why a class-token head gets the last block's first norm: at the block's output the class token's
    score has no gradient on the patch tokens, and a map there would be blank (the reason for the rule)."""
    torch.manual_seed(0)
    model = build("vit").eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        late = camlens.explain(model, images, "gradcam", target_layer="vit.layers.1", reshape="tokens",
                               output="logits")
    assert bool(late.blank.all())
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

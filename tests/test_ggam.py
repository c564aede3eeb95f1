"""GGAM: the attention head, its loss, the Grad-CAM weights of the true class, one training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import camlens
from camlens.errors import CamlensError
from camlens.ggam import GGAM, ggam_loss, ggam_training_loss, label_gradcam_weights, spatial_weights

C, CLASSES = 8, 5


class Net(nn.Module):
    """A tiny backbone and a GGAM head; forward returns the logits, so camlens.explain can hook it."""

    def __init__(self, **options) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, C, 3, padding=1), nn.ReLU(), nn.Conv2d(C, C, 3, padding=1), nn.ReLU())
        self.head = GGAM(C, CLASSES, reduction=2, **options)

    def result(self, x):
        return self.head(self.backbone(x))

    def forward(self, x):
        return self.result(x).logits


def make(seed=0, **options):
    torch.manual_seed(seed)
    net = Net(**options).double()
    x = torch.randn(4, 3, 6, 7, dtype=torch.float64)
    labels = torch.tensor([0, 3, 1, 4])
    return net, x, labels


def test_shapes_and_distributions():
    net, x, _ = make()
    out = net.result(x)
    assert out.logits.shape == (4, CLASSES)
    assert out.channel_weights.shape == (4, C) and out.spatial_weights.shape == (4, 6, 7)
    assert out.features.shape == (4, C, 6, 7) and out.channel_attention
    torch.testing.assert_close(out.channel_weights.sum(1), torch.ones(4, dtype=torch.float64))
    torch.testing.assert_close(out.spatial_weights.sum((1, 2)), torch.ones(4, dtype=torch.float64))
    assert (out.spatial_weights >= 0).all() and (out.channel_weights > 0).all()


def test_attention_follows_the_papers_formulas():
    torch.manual_seed(1)
    head = GGAM(C, CLASSES, reduction=3).double()
    a = torch.rand(2, C, 4, 5, dtype=torch.float64)
    out = head(a)
    fc1, fc2 = head.attention[0], head.attention[2]
    s = torch.softmax(fc2(torch.relu(fc1(a.mean((2, 3))))), 1)
    assert fc1.out_features == C // 3
    b = a * s[:, :, None, None]
    t = b.sum(1) / b.sum((1, 2, 3))[:, None, None]
    pooled = (a * t[:, None]).sum((2, 3))
    torch.testing.assert_close(out.channel_weights, s)
    torch.testing.assert_close(out.spatial_weights, t)
    torch.testing.assert_close(out.logits, head.classifier(pooled))
    assert GGAM(3, 2, reduction=16).attention[0].out_features == 1  # max(1, C // r)


@pytest.mark.filterwarnings("ignore:Anomaly Detection has been enabled")
def test_spatial_weights_never_nan_for_zero_or_negative_maps():
    torch.manual_seed(0)
    b = torch.stack([-torch.rand(3, 4, 4), torch.zeros(3, 4, 4), torch.randn(3, 4, 4)]).requires_grad_(True)
    t = spatial_weights(b)
    torch.testing.assert_close(t[:2], torch.full((2, 4, 4), 1 / 16))  # no positive mass: uniform
    p = torch.relu(b[2].sum(0))
    torch.testing.assert_close(t[2], p / p.sum())
    assert (t >= 0).all() and (b[2].sum(0) < 0).any()  # the ReLU had something to remove
    with torch.autograd.detect_anomaly(check_nan=True):  # no NaN anywhere in the backward either
        (spatial_weights(b) * torch.randn(3, 4, 4)).sum().backward()
    assert torch.isfinite(b.grad).all()


def test_attention_on_dead_channels_falls_back_instead_of_overflowing():
    """S collapsed onto a channel that is ~1e-38 in the image: T is scale-free, so its exact
    gradient is ~1/sum(P) (3e34 here without the guard); the relative floor makes T uniform."""
    torch.manual_seed(0)
    head = GGAM(8, 3, reduction=2)
    with torch.no_grad():
        head.attention[2].bias.zero_()
        head.attention[2].bias[0] = 200.0  # S = (1, 0, ..., 0)
    a = torch.rand(2, 8, 4, 4) + 0.5
    a[:, 0] = 1e-38 * (1 + torch.rand(2, 4, 4))
    out = head(a.requires_grad_(True))
    torch.testing.assert_close(out.spatial_weights, torch.full((2, 4, 4), 1 / 16))
    beta = label_gradcam_weights(out, torch.tensor([0, 1]))
    assert torch.isfinite(beta).all() and beta.abs().max() < 1e3
    # A map with ordinary mass is untouched by the floor.
    b = torch.rand(2, 8, 4, 4)
    reference = b.abs().mean(1).sum((1, 2))
    torch.testing.assert_close(spatial_weights(b, reference), b.sum(1) / b.sum((1, 2, 3))[:, None, None])


def test_both_off_is_the_plain_classifier():
    torch.manual_seed(2)
    head = GGAM(C, CLASSES, channel_attention=False, spatial_attention=False).double()
    a = torch.randn(3, C, 4, 4, dtype=torch.float64)
    out = head(a)
    torch.testing.assert_close(out.logits, F.linear(a.mean((2, 3)), head.classifier.weight, head.classifier.bias))
    torch.testing.assert_close(out.channel_weights, torch.full((3, C), 1 / C, dtype=torch.float64))
    torch.testing.assert_close(out.spatial_weights, torch.full((3, 4, 4), 1 / 16, dtype=torch.float64))
    assert not hasattr(head, "attention")


def test_an_ablation_is_the_full_step_with_uniform_weights():
    """Channel off = channel on with S uniform; channel on with S uniform and spatial off = plain."""
    torch.manual_seed(3)
    a = torch.rand(2, C, 4, 4, dtype=torch.float64)
    for spatial in (True, False):
        on = GGAM(C, CLASSES, spatial_attention=spatial).double()
        nn.init.zeros_(on.attention[2].weight), nn.init.zeros_(on.attention[2].bias)  # S = 1/C
        off = GGAM(C, CLASSES, channel_attention=False, spatial_attention=spatial).double()
        off.classifier.load_state_dict(on.classifier.state_dict())
        torch.testing.assert_close(on(a).logits, off(a).logits)
        torch.testing.assert_close(on(a).spatial_weights, off(a).spatial_weights)


def test_bad_construction_and_input_are_refused():
    with pytest.raises(CamlensError, match="reduction"):
        GGAM(8, 2, reduction=0)
    with pytest.raises(CamlensError, match=r"\(N, 8, H, W\)"):
        GGAM(8, 2)(torch.zeros(1, 4, 3, 3))


def test_loss_is_the_symmetric_kl():
    torch.manual_seed(4)
    s = torch.softmax(torch.randn(3, C, dtype=torch.float64), 1)
    beta = torch.randn(3, C, dtype=torch.float64)
    q = torch.sigmoid(beta) / torch.sigmoid(beta).sum(1, keepdim=True)
    # F.kl_div(log q, p) = KL(p || q), summed then averaged per image by batchmean.
    kl_sq = F.kl_div(q.log(), s, reduction="batchmean")
    kl_qs = F.kl_div(s.log(), q, reduction="batchmean")
    assert abs(kl_sq - kl_qs) > 1e-4  # the two directions differ: both are needed
    torch.testing.assert_close(ggam_loss(s, beta), (kl_sq + kl_qs) / 2)
    # The two roles are symmetric: swapping S and the target gives the same loss.
    torch.testing.assert_close(ggam_loss(q, torch.logit(s / s.max(1, keepdim=True).values * 0.5)), ggam_loss(s, beta))


def test_loss_without_renormalising_is_the_generalised_kl():
    torch.manual_seed(5)
    s = torch.softmax(torch.randn(2, C, dtype=torch.float64), 1)
    beta = torch.randn(2, C, dtype=torch.float64)
    q = torch.sigmoid(beta)

    def kl(p, r):
        return (p * (p / r).log() - p + r).sum(1)

    assert (kl(s, q) >= 0).all() and (kl(q, s) >= 0).all()
    torch.testing.assert_close(ggam_loss(s, beta, renormalise=False), ((kl(s, q) + kl(q, s)) / 2).mean())


def test_loss_is_zero_at_the_target_and_never_negative_or_nan():
    torch.manual_seed(6)
    beta = torch.randn(4, C, dtype=torch.float64)
    target = torch.sigmoid(beta) / torch.sigmoid(beta).sum(1, keepdim=True)
    assert ggam_loss(target, beta).abs() < 1e-12
    assert ggam_loss(torch.sigmoid(beta), beta, renormalise=False).abs() < 1e-12
    for scale in (1.0, 30.0, 1e3):
        s = torch.softmax(scale * torch.randn(16, C), 1)  # float32: large scales underflow S to 0
        b = (scale * torch.randn(16, C)).requires_grad_(True)
        for renormalise in (True, False):
            loss = ggam_loss(s, b, renormalise=renormalise)
            assert torch.isfinite(loss) and loss >= 0
            (grad,) = torch.autograd.grad(loss, b)
            assert torch.isfinite(grad).all()


def test_beta_is_camlens_gradcam_of_the_label():
    net, x, labels = make()
    net.eval()
    explanation = camlens.explain(net, x, method="gradcam", target_layer="backbone", targets=labels)
    beta = label_gradcam_weights(net.result(x), labels)
    torch.testing.assert_close(beta, explanation.weights["backbone"][:, 0])
    # Batched: the same as one image at a time.
    for n in range(len(x)):
        torch.testing.assert_close(beta[n : n + 1], label_gradcam_weights(net.result(x[n : n + 1]), labels[n : n + 1]))


def _backbone_grads(loss, net):
    return torch.autograd.grad(loss, list(net.backbone.parameters()))


def test_detached_beta_is_a_constant_target():
    net, x, labels = make()
    parts = ggam_training_loss(net.result(x), labels, lam=2.0)
    assert parts.beta.grad_fn is None and not parts.beta.requires_grad
    torch.testing.assert_close(parts.total, parts.ce + 2.0 * parts.ggam)
    constant = parts.beta.clone()
    result = net.result(x)
    manual = F.cross_entropy(result.logits, labels) + 2.0 * ggam_loss(result.channel_weights, constant)
    for got, want in zip(_backbone_grads(parts.total, net), _backbone_grads(manual, net)):
        torch.testing.assert_close(got, want)


def test_undetached_beta_adds_second_order_terms():
    net, x, labels = make()
    attached = ggam_training_loss(net.result(x), labels, detach=False)
    detached = ggam_training_loss(net.result(x), labels, detach=True)
    assert attached.beta.grad_fn is not None
    torch.testing.assert_close(attached.total, detached.total)  # same value, different gradient
    got = _backbone_grads(attached.total, net)
    want = _backbone_grads(detached.total, net)
    assert max((g - w).abs().max() for g, w in zip(got, want)) > 1e-6
    # The extra gradient is exactly that of the loss through beta, with S held constant.
    result = net.result(x)
    s = result.channel_weights.detach()
    through_beta = ggam_loss(s, label_gradcam_weights(result, labels, detach=False))
    for g, w, extra in zip(got, want, _backbone_grads(through_beta, net)):
        torch.testing.assert_close(g - w, extra)


def test_without_channel_attention_the_ggam_loss_is_zero():
    net, x, labels = make(channel_attention=False)
    parts = ggam_training_loss(net.result(x), labels)
    assert parts.ggam == 0 and parts.beta is None
    torch.testing.assert_close(parts.total, F.cross_entropy(net(x), labels))


def test_bad_labels_and_lambda_are_refused():
    net, x, labels = make()
    result = net.result(x)
    with pytest.raises(CamlensError, match="from 0 to 4"):
        ggam_training_loss(result, torch.tensor([0, 1, 2, 9]))
    with pytest.raises(CamlensError, match=r"shape \(4,\)"):
        ggam_training_loss(result, labels.float())
    with pytest.raises(CamlensError, match="lambda"):
        ggam_training_loss(result, labels, lam=-1.0)
    with torch.no_grad():
        frozen = net.result(x)
    with pytest.raises(CamlensError, match="autograd graph"):
        ggam_training_loss(frozen, labels)


@pytest.mark.parametrize("detach", [False, True])
def test_one_sgd_step_lowers_the_loss(detach):
    """With detach=False the step follows the true gradient of the total loss; with detach=True
    it is the gradient with beta held constant, so the loss that falls is the one at that beta."""
    net, x, labels = make(seed=7)
    before = ggam_training_loss(net.result(x), labels, lam=1.0, detach=detach)
    optimiser = torch.optim.SGD(net.parameters(), lr=1e-2)
    optimiser.zero_grad()
    before.total.backward()
    optimiser.step()
    with torch.enable_grad():
        after = net.result(x)
        if detach:
            total = F.cross_entropy(after.logits, labels) + ggam_loss(after.channel_weights, before.beta)
        else:
            total = ggam_training_loss(after, labels, detach=False).total
    assert total < before.total - 1e-6

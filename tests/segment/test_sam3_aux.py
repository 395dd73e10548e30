"""Auxiliary losses on SAM 3's earlier decoder layers: reachable outputs, hand values."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from visiontune.config.load import load_config
from visiontune.config.tasks import Sam3LossConfig
from visiontune.data.instances import mask_boxes
from visiontune.models.sam3 import Sam3Adapter
from visiontune.tasks.set_loss import AUX_TERMS, InstanceTargets, set_loss

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples/tiny/crack_sam3_tiny.yaml"


def test_every_decoder_layer_is_reached_and_the_last_is_the_models_own() -> None:
    """The hooked per-layer boxes and logits end in exactly Sam3Model's pred_boxes and
    pred_logits, and the earlier layers (2 layers in the twin: one) carry gradients."""
    cfg = load_config(TINY, ["data.train=.", "task.sam3.loss.aux=true"])
    adapter = Sam3Adapter(cfg, "off", None)
    torch.manual_seed(0)
    inputs = {
        "pixel_values": torch.randn(2, 3, 112, 112),
        "input_ids": torch.randint(0, 64, (2, 8)),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
    }
    with torch.no_grad():
        own = adapter.sam3(**inputs)
        logits, boxes = adapter.decoder_layers.layers()
    assert torch.equal(logits[-1], own.pred_logits) and torch.equal(boxes[-1], own.pred_boxes)
    out = adapter(**inputs)
    assert out["aux_logits"].shape == (1, 2, 16) and out["aux_boxes"].shape == (1, 2, 16, 4)
    assert adapter.decoder_layers.seen == {}  # read once: no graph kept past the forward
    assert not torch.allclose(out["aux_boxes"][0], out["pred_boxes"])
    out["aux_logits"].sum().backward()
    grads = [p.grad for n, p in adapter.sam3.named_parameters() if "detr_decoder" in n]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    plain = load_config(TINY, ["data.train=."])
    assert "aux_logits" not in Sam3Adapter(plain, "off", None)(
        pixel_values=torch.randn(1, 3, 112, 112),
        input_ids=torch.randint(0, 64, (1, 8)),
        attention_mask=torch.ones(1, 8, dtype=torch.long),
    )


def test_aux_terms_match_hand_values_and_are_logged_apart() -> None:
    """Two earlier layers, one target: layer 0 has it exactly in query 1 (box terms 0), layer
    1 has every box 0.1 off on each side (L1 0.4); class focal by hand per layer."""
    truth = torch.zeros(1, 16, 16, dtype=torch.bool)
    truth[0, 4:12, 4:12] = True
    box = mask_boxes(truth)
    far = torch.tensor([[0.0, 0.0, 0.1, 0.1]])
    layer0 = torch.cat([far, box])
    layer1 = torch.cat([box + 0.1, box + 0.1])
    logits = torch.tensor([[[-1.0, 2.0]], [[0.0, 0.0]]])
    outputs = {
        "pred_logits": torch.tensor([[-1.0, 2.0]]),
        "pred_boxes": layer0[None],
        "pred_masks": torch.zeros(1, 2, 4, 4),
        "presence_logits": torch.zeros(1),
        "semantic_seg": None,
        "aux_logits": logits,
        "aux_boxes": torch.stack([layer0, layer1])[:, None],
    }
    spec = Sam3LossConfig(aux=True)
    out = set_loss(outputs, InstanceTargets(truth, box, torch.tensor([0])), spec)
    a, g = spec.focal_alpha, spec.focal_gamma

    def focal(logit: float, positive: bool) -> float:
        p = 1 / (1 + math.exp(-logit))
        if positive:
            return a * (1 - p) ** g * -math.log(p)
        return (1 - a) * p**g * -math.log(1 - p)

    # layer 0 matches query 1; layer 1 has equal costs: either query, the same class sum
    hand_class = focal(-1.0, False) + focal(2.0, True) + focal(0.0, False) + focal(0.0, True)
    shifted = (box + 0.1)[0]
    inter = (box[0, 2:] - shifted[:2]).prod()
    union = 2 * (box[0, 2:] - box[0, :2]).prod() - inter
    hull = (shifted[2:] - box[0, :2]).prod()
    giou = inter / union - (hull - union) / hull
    assert math.isclose(float(out.parts["aux_class"]), 2 * hand_class, rel_tol=1e-5)
    assert math.isclose(float(out.parts["aux_box_l1"]), 5 * 0.4, rel_tol=1e-5)
    assert math.isclose(float(out.parts["aux_giou"]), 2 * float(1 - giou), rel_tol=1e-5)
    assert math.isclose(
        float(out.loss_sum), sum(float(v) for v in out.parts.values()), rel_tol=1e-6
    )
    off = set_loss(outputs, InstanceTargets(truth, box, torch.tensor([0])), Sam3LossConfig())
    assert not set(AUX_TERMS) & set(off.parts)

"""Per-layer boxes and scores of SAM 3's DETR decoder, for auxiliary losses.

transformers' `Sam3Model.forward` computes a box and a score for every query at every decoder
layer (`box_head` on all of `intermediate_hidden_states`, `dot_product_scoring` on all of
them) and returns only the last layer's. `output_hidden_states` returns the layers' raw
states, but scoring them again needs the DETR encoder's text features, which are not
returned. The computed tensors themselves pass through three submodules,
so forward hooks on them pick them up, with their autograd graph, at no extra compute:
the decoder's output (reference boxes per layer), the last `box_head` call (all layers'
box offsets) and `dot_product_scoring`'s output (all layers' logits). The boxes are then put
together exactly as `Sam3Model.forward` does for its last layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class DecoderLayerOutputs:
    """Hooks on one Sam3Model that keep what its last forward computed per decoder layer."""

    def __init__(self, sam3: nn.Module) -> None:
        self.seen: dict[str, Any] = {}
        decoder = sam3.detr_decoder
        decoder.register_forward_hook(self._keep("decoder"))
        decoder.box_head.register_forward_hook(self._keep("offsets"))
        sam3.dot_product_scoring.register_forward_hook(self._keep("logits"))

    def _keep(self, name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.seen[name] = output

        return hook

    def layers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [L, B, Q] and boxes [L, B, Q, 4] (x1, y1, x2, y2) of every decoder layer of
        the last forward, the last layer being the model's own `pred_logits`/`pred_boxes`."""
        from transformers.models.sam3.modeling_sam3 import box_cxcywh_to_xyxy, inverse_sigmoid

        seen, self.seen = self.seen, {}  # hold no graph past the forward that made it
        boxes = (inverse_sigmoid(seen["decoder"].reference_boxes) + seen["offsets"]).sigmoid()
        return seen["logits"].squeeze(-1), box_cxcywh_to_xyxy(boxes)

"""The Deformable DETR detector: backbone, input projections, transformer and prediction heads."""
from __future__ import annotations

import copy
import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .box_ops import inverse_sigmoid
from .transformer import DeformableTransformer


class MLP(nn.Module):
    """Feed-forward head (`bbox_embed.N.layers.K`)."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        self.num_layers = num_layers
        hidden = [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip([input_dim] + hidden, hidden + [output_dim]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if index < self.num_layers - 1 else layer(x)
        return x


def _projection(in_channels: int, hidden_dim: int, extra_level: bool) -> nn.Sequential:
    conv = (nn.Conv2d(in_channels, hidden_dim, kernel_size=3, stride=2, padding=1) if extra_level
            else nn.Conv2d(in_channels, hidden_dim, kernel_size=1))
    return nn.Sequential(conv, nn.GroupNorm(32, hidden_dim))


class DeformableDETR(nn.Module):
    """Deformable DETR (Zhu et al., ICLR 2021) with the original's module and parameter names.

    `backbone` is a `Joiner` returning the chosen stages; its first `num_backbone_levels`
    outputs are projected, and every further level is made by a stride-2 conv, the first
    from the backbone's last output, the next ones from the previous extra level.
    """

    def __init__(self, backbone: nn.Module, transformer: DeformableTransformer, num_classes: int,
                 num_queries: int, num_feature_levels: int, num_backbone_levels: Optional[int] = None,
                 aux_loss: bool = True, with_box_refine: bool = False, two_stage: bool = False) -> None:
        super().__init__()
        self.num_queries = num_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.num_feature_levels = num_feature_levels
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries, hidden_dim * 2)
        channels = list(backbone.num_channels)
        self.num_backbone_levels = len(channels) if num_backbone_levels is None else num_backbone_levels
        projections = [_projection(channels[i], hidden_dim, False) for i in range(self.num_backbone_levels)]
        in_channels = channels[-1]
        for _ in range(num_feature_levels - self.num_backbone_levels):
            projections.append(_projection(in_channels, hidden_dim, True))
            in_channels = hidden_dim
        self.input_proj = nn.ModuleList(projections)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.with_box_refine = with_box_refine
        self.two_stage = two_stage

        # Initialisation of the original: classes start at a 1% prior, box deltas at zero.
        bias_value = -math.log((1 - 0.01) / 0.01)
        self.class_embed.bias.data = torch.ones(num_classes) * bias_value
        nn.init.constant_(self.bbox_embed.layers[-1].weight.data, 0)
        nn.init.constant_(self.bbox_embed.layers[-1].bias.data, 0)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        num_pred = transformer.decoder.num_layers + (1 if two_stage else 0)
        if with_box_refine:
            self.class_embed = nn.ModuleList([copy.deepcopy(self.class_embed) for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([copy.deepcopy(self.bbox_embed) for _ in range(num_pred)])
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias.data[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
        else:
            nn.init.constant_(self.bbox_embed.layers[-1].bias.data[2:], -2.0)
            # One shared head, listed once per prediction as the original does (class_embed.0..N).
            self.class_embed = nn.ModuleList([self.class_embed for _ in range(num_pred)])
            self.bbox_embed = nn.ModuleList([self.bbox_embed for _ in range(num_pred)])
            self.transformer.decoder.bbox_embed = None
        if two_stage:
            self.transformer.decoder.class_embed = self.class_embed
            for box_embed in self.bbox_embed:
                nn.init.constant_(box_embed.layers[-1].bias.data[2:], 0.0)

    @property
    def attention_padding(self) -> str:
        """`masked` (the original's) or `unmasked` (TAO's): see model.attention_padding."""
        return "masked" if self.transformer.mask_padding_in_attention else "unmasked"

    @attention_padding.setter
    def attention_padding(self, value: str) -> None:
        if value not in ("masked", "unmasked"):
            raise ValueError(f"attention_padding: {value!r}; accepted: masked, unmasked")
        self.transformer.mask_padding_in_attention = value == "masked"

    def set_activation_checkpoint(self, enabled: bool) -> None:
        """Recompute encoder and decoder layers in backward (training only)."""
        self.transformer.set_activation_checkpoint(enabled)

    def _multi_scale_inputs(self, images: torch.Tensor, masks: torch.Tensor):
        features, pos = self.backbone(images, masks)
        srcs, level_masks, level_pos = [], [], []
        for level in range(self.num_backbone_levels):
            feature, mask = features[level]
            srcs.append(self.input_proj[level](feature))
            level_masks.append(mask)
            level_pos.append(pos[level])
        previous = features[-1][0]
        for level in range(self.num_backbone_levels, self.num_feature_levels):
            src = self.input_proj[level](previous)
            mask = F.interpolate(masks[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            level_masks.append(mask)
            level_pos.append(self.backbone[1](mask).to(src.dtype))
            previous = src
        return srcs, level_masks, level_pos

    def forward(self, images: torch.Tensor, masks: torch.Tensor) -> Dict[str, object]:
        """images [B, 3, H, W] normalised; masks [B, H, W] bool, True on padding."""
        srcs, level_masks, level_pos = self._multi_scale_inputs(images, masks)
        query_embeds = None if self.two_stage else self.query_embed.weight
        hs, init_reference, inter_references, enc_class, enc_coord_unact = self.transformer(
            srcs, level_masks, level_pos, query_embeds)

        classes = [self.class_embed[level](hs[level]) for level in range(hs.shape[0])]
        if self.transformer.decoder.bbox_embed is not None:
            # Box refinement: the decoder computed each layer's boxes with these same heads, as
            # below, to refine its references; the original computes them a second time here.
            coords = list(inter_references)
        else:
            coords = []
            for level in range(hs.shape[0]):
                reference = inverse_sigmoid(init_reference if level == 0 else inter_references[level - 1])
                delta = self.bbox_embed[level](hs[level])
                if reference.shape[-1] == 4:
                    coord = delta + reference
                else:
                    coord = torch.cat([delta[..., :2] + reference, delta[..., 2:]], -1)
                coords.append(coord.sigmoid())

        out: Dict[str, object] = {"pred_logits": classes[-1], "pred_boxes": coords[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": c, "pred_boxes": b} for c, b in zip(classes[:-1], coords[:-1])]
        if self.two_stage:
            out["enc_outputs"] = {"pred_logits": enc_class, "pred_boxes": enc_coord_unact.sigmoid()}
        return out

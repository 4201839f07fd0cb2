"""Deformable transformer: encoder and decoder of the original, with its parameter names."""
from __future__ import annotations

import copy
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .attention import MSDeformAttn
from .box_ops import inverse_sigmoid


def _clones(module: nn.Module, count: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(count)])


class Dropout(nn.Dropout):
    """nn.Dropout (the same module: no parameters, nothing in checkpoints) whose mask, on CPU in
    training, is drawn as `uniform >= p` with torch.rand_like instead of PyTorch's bernoulli_,
    which its CPU kernel draws about 2.5x slower (1.6 ms against 0.6 ms for the 2 x 340 x 256
    activations of a 128 px step's encoder feed-forward). The same distribution (each value kept
    with probability 1 - p and scaled by 1 / (1 - p)); another random stream. Elsewhere (GPU,
    evaluation, p = 0, tracing) it is nn.Dropout's own path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.inplace or not 0.0 < self.p < 1.0 or x.device.type != "cpu" \
                or not x.is_floating_point() or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return super().forward(x)
        scaled_mask = torch.rand_like(x).ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * scaled_mask


def _relu(hidden: torch.Tensor) -> torch.Tensor:
    """The feed-forward's ReLU, written over the first linear's output (which nothing else reads,
    autograd included): no second [tokens x d_ffn] tensor to allocate and fill."""
    return F.relu(hidden, inplace=True)


def _with_pos(tensor: torch.Tensor, pos: Optional[torch.Tensor]) -> torch.Tensor:
    return tensor if pos is None else tensor + pos


class DeformableTransformerEncoderLayer(nn.Module):
    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1,
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout2 = Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src, pos, reference_points, spatial_shapes, level_start_index, padding_mask=None):
        attended = self.self_attn(_with_pos(src, pos), reference_points, src, spatial_shapes,
                                  level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        ffn = self.linear2(self.dropout2(_relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, encoder_layer: DeformableTransformerEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = _clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.activation_checkpoint = False

    @staticmethod
    def get_reference_points(spatial_shapes: List[Tuple[int, int]], valid_ratios: torch.Tensor) -> torch.Tensor:
        """Pixel centres of every level, normalised by each image's valid area -> [B, S, L, 2]."""
        points = []
        for level, (height, width) in enumerate(spatial_shapes):
            # arange + 0.5 equals the original's linspace(0.5, n - 0.5, n); unlike linspace it exports to
            # ONNX correctly for a single row or column (linspace's step divides by n - 1).
            ref_y, ref_x = torch.meshgrid(
                torch.arange(height, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
                torch.arange(width, dtype=valid_ratios.dtype, device=valid_ratios.device) + 0.5,
                indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            points.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(points, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(self, src, spatial_shapes, shape_list, level_start_index, valid_ratios, pos=None, padding_mask=None):
        output = src
        reference_points = self.get_reference_points(shape_list, valid_ratios)
        for layer in self.layers:
            if self.activation_checkpoint and self.training:
                output = checkpoint(layer, output, pos, reference_points, spatial_shapes, level_start_index,
                                    padding_mask, use_reentrant=False)
            else:
                output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class DeformableTransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1,
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4) -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout)
        self.dropout2 = Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.dropout3 = Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(self, tgt, query_pos, reference_points, src, spatial_shapes, level_start_index, padding_mask=None):
        q = k = _with_pos(tgt, query_pos)
        # nn.MultiheadAttention is sequence-first. Without the (unused) averaged attention weights
        # it runs PyTorch's fused scaled_dot_product_attention instead of bmm, softmax and bmm.
        attended = self.self_attn(q.transpose(0, 1), k.transpose(0, 1), tgt.transpose(0, 1),
                                  need_weights=False)[0].transpose(0, 1)
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(_with_pos(tgt, query_pos), reference_points, src, spatial_shapes,
                                   level_start_index, padding_mask)
        tgt = self.norm1(tgt + self.dropout1(attended))
        ffn = self.linear2(self.dropout3(_relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(ffn))


class DeformableTransformerDecoder(nn.Module):
    def __init__(self, decoder_layer: DeformableTransformerDecoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = _clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.activation_checkpoint = False
        # Set by the detector: box refinement and two-stage share its heads (as in the original).
        self.bbox_embed: Optional[nn.ModuleList] = None
        self.class_embed: Optional[nn.ModuleList] = None

    def forward(self, tgt, reference_points, src, spatial_shapes, level_start_index, valid_ratios,
                query_pos=None, padding_mask=None):
        """-> the layers' outputs [layers, B, Q, C] and, with box refinement, the boxes each layer predicts
        (sigmoid, [layers, B, Q, 4]), else the reference points every layer used."""
        output = tgt
        states, references = [], []
        for index, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                reference_input = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                reference_input = reference_points[:, :, None] * valid_ratios[:, None]
            if self.activation_checkpoint and self.training:
                output = checkpoint(layer, output, query_pos, reference_input, src, spatial_shapes,
                                    level_start_index, padding_mask, use_reentrant=False)
            else:
                output = layer(output, query_pos, reference_input, src, spatial_shapes, level_start_index,
                               padding_mask)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[index](output)
                if reference_points.shape[-1] == 4:
                    refined = (delta + inverse_sigmoid(reference_points)).sigmoid()
                else:
                    refined = torch.cat([delta[..., :2] + inverse_sigmoid(reference_points), delta[..., 2:]], -1)
                    refined = refined.sigmoid()
                # Each layer refines the previous boxes; gradients do not flow through the references,
                # but do through the boxes returned (the detector's outputs as they are).
                reference_points = refined.detach()
            states.append(output)
            references.append(refined if self.bbox_embed is not None else reference_points)
        return torch.stack(states), torch.stack(references)


class DeformableTransformer(nn.Module):
    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 1024, dropout: float = 0.1,
                 num_feature_levels: int = 4, dec_n_points: int = 4, enc_n_points: int = 4,
                 two_stage: bool = False, two_stage_num_proposals: int = 300) -> None:
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        self.two_stage = two_stage
        self.two_stage_num_proposals = two_stage_num_proposals
        encoder_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                          nhead, enc_n_points)
        self.encoder = DeformableTransformerEncoder(encoder_layer, num_encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(d_model, dim_feedforward, dropout, num_feature_levels,
                                                          nhead, dec_n_points)
        self.decoder = DeformableTransformerDecoder(decoder_layer, num_decoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        # Whether deformable attention zeroes the values it samples at padded pixels (the original
        # masks; TAO never passes the mask in). A checkpoint behaves as it was trained: set by
        # model.checkpoint_compat from `model.attention_padding`; changes no weights.
        self.mask_padding_in_attention = True
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def set_activation_checkpoint(self, enabled: bool) -> None:
        self.encoder.activation_checkpoint = enabled
        self.decoder.activation_checkpoint = enabled

    def get_proposal_pos_embed(self, proposals: torch.Tensor) -> torch.Tensor:
        """Sine embedding of proposal boxes (logits) -> [B, K, 2*d_model]."""
        num_pos_feats = self.d_model // 2
        temperature = 10000
        scale = 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
        proposals = proposals.sigmoid() * scale
        pos = proposals[:, :, :, None] / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def gen_encoder_output_proposals(self, memory: torch.Tensor, padding_mask: torch.Tensor,
                                     shape_list: List[Tuple[int, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        """One proposal box per encoder pixel (two-stage): its centre, size 0.05 * 2**level."""
        batch = memory.shape[0]
        proposals = []
        start = 0
        for level, (height, width) in enumerate(shape_list):
            level_mask = padding_mask[:, start:start + height * width].view(batch, height, width, 1)
            valid_h = torch.sum(~level_mask[:, :, 0, 0], 1)
            valid_w = torch.sum(~level_mask[:, 0, :, 0], 1)
            grid_y, grid_x = torch.meshgrid(
                torch.arange(height, dtype=memory.dtype, device=memory.device),
                torch.arange(width, dtype=memory.dtype, device=memory.device), indexing="ij")
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(batch, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(batch, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** level)
            proposals.append(torch.cat((grid, wh), -1).view(batch, -1, 4))
            start += height * width
        output_proposals = torch.cat(proposals, 1)
        valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1, keepdim=True)
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        output_proposals = output_proposals.masked_fill(padding_mask.unsqueeze(-1), float("inf"))
        output_proposals = output_proposals.masked_fill(~valid, float("inf"))
        output_memory = memory.masked_fill(padding_mask.unsqueeze(-1), 0.0).masked_fill(~valid, 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, output_proposals

    @staticmethod
    def get_valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """Share of each padded map that holds the image: [B, 2] as (w, h)."""
        _, height, width = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / width, valid_h.float() / height], -1)

    def forward(self, srcs: List[torch.Tensor], masks: List[torch.Tensor], pos_embeds: List[torch.Tensor],
                query_embed: Optional[torch.Tensor] = None):
        src_flatten, mask_flatten, pos_flatten, shape_list = [], [], [], []
        for level, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            _, _, height, width = src.shape
            shape_list.append((height, width))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            pos_flatten.append(pos.flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        mask_flatten = torch.cat(mask_flatten, 1)
        pos_flatten = torch.cat(pos_flatten, 1)
        spatial_shapes = torch.as_tensor(shape_list, dtype=torch.long, device=src_flatten.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1).to(src_flatten.dtype)

        attention_mask = mask_flatten if self.mask_padding_in_attention else None
        memory = self.encoder(src_flatten, spatial_shapes, shape_list, level_start_index, valid_ratios,
                              pos_flatten, attention_mask)

        batch, _, channels = memory.shape
        enc_outputs_class = enc_outputs_coord_unact = None
        if self.two_stage:
            output_memory, output_proposals = self.gen_encoder_output_proposals(memory, mask_flatten, shape_list)
            # The extra (last) head scores every encoder pixel as a proposal.
            enc_outputs_class = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            enc_outputs_coord_unact = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + output_proposals
            topk = self.two_stage_num_proposals
            topk_proposals = torch.topk(enc_outputs_class[..., 0], topk, dim=1)[1]
            topk_coords_unact = torch.gather(enc_outputs_coord_unact, 1, topk_proposals.unsqueeze(-1).repeat(1, 1, 4))
            topk_coords_unact = topk_coords_unact.detach()
            reference_points = topk_coords_unact.sigmoid()
            init_reference = reference_points
            pos_trans_out = self.pos_trans_norm(self.pos_trans(self.get_proposal_pos_embed(topk_coords_unact)))
            query_pos, tgt = torch.split(pos_trans_out, channels, dim=2)
        else:
            query_pos, tgt = torch.split(query_embed, channels, dim=1)
            query_pos = query_pos.unsqueeze(0).expand(batch, -1, -1)
            tgt = tgt.unsqueeze(0).expand(batch, -1, -1)
            reference_points = self.reference_points(query_pos).sigmoid()
            init_reference = reference_points

        hs, inter_references = self.decoder(tgt, reference_points, memory, spatial_shapes, level_start_index,
                                            valid_ratios, query_pos, attention_mask)
        return hs, init_reference, inter_references, enc_outputs_class, enc_outputs_coord_unact

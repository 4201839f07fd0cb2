"""Backbones: torchvision ResNets with frozen BatchNorm, and GC-ViT (timm's modules, TAO's semantics).

`backbone.0.body` holds the network under its library's own parameter names (torchvision
for ResNet, as the original Deformable DETR; timm for GC-ViT, plus TAO's output norms `norm{i}`),
`backbone.1` the position encoding, so the detector's keys read `backbone.0.body.layer1.0.conv1.weight`
as in the original checkpoints. TAO's GC-ViT names are converted on load (model/gcvit.py).
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops.misc import FrozenBatchNorm2d

from .position_encoding import PositionEmbeddingSine


RESNETS = {"resnet_18": resnet.resnet18, "resnet_34": resnet.resnet34,
           "resnet_50": resnet.resnet50, "resnet_101": resnet.resnet101}
GC_VITS = {"gc_vit_xxtiny": "gcvit_xxtiny", "gc_vit_xtiny": "gcvit_xtiny", "gc_vit_tiny": "gcvit_tiny",
           "gc_vit_small": "gcvit_small", "gc_vit_base": "gcvit_base",
           "gc_vit_large": "gcvit_large", "gc_vit_large_384": "gcvit_large_384"}

# `model.return_interm_indices` value of the extra level made from the last stage by a stride-2 conv.
EXTRA_LEVEL = 4


def resnet_network(name: str, dilation: bool = False) -> resnet.ResNet:
    """A torchvision ResNet without pretrained weights, BatchNorm frozen as in the original."""
    return RESNETS[name](weights=None, norm_layer=FrozenBatchNorm2d,
                         replace_stride_with_dilation=[False, False, dilation])


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """The ResNet stem's max pooling, run in channels-last layout on CPU: PyTorch's CPU kernel for
    contiguous (NCHW) maps is not vectorised across channels and took 2.3 ms of a 128 px training
    step on 2 cores, the channels-last one 0.13 ms (1.1 ms with the two layout copies). Same values,
    same module (no parameters), so checkpoints and export are unaffected; traced and non-CPU
    inputs take the plain path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or x.dim() != 4 or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() \
                or torch.compiler.is_compiling():
            return super().forward(x)
        pooled = super().forward(x.contiguous(memory_format=torch.channels_last))
        return pooled.contiguous()


class FoldedFrozenBatchNorm2d(FrozenBatchNorm2d):
    """A frozen BatchNorm whose scale and shift the convolution before it applies
    (ConvFrozenBatchNorm2d): it only holds its buffers, under their usual state-dict names."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def scale_shift(self) -> Tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        return scale, self.bias - self.running_mean * scale


class ConvFrozenBatchNorm2d(nn.Conv2d):
    """A convolution and the frozen BatchNorm after it run as one convolution: the BatchNorm's
    scale folded into the weights, its shift as the bias, which saves a pass over every output
    map (a few percent of a ResNet-50 step on CPU). Same parameters (shared), same names; the
    folded weights are cached while nothing writes the weights (tensor versions) and autograd does
    not need them. Traced, exported and compiled graphs get the convolution then the BatchNorm,
    as before; so does `folding = False` (the benchmark's comparison)."""

    folding = True

    @classmethod
    def around(cls, conv: nn.Conv2d, norm: FoldedFrozenBatchNorm2d) -> "ConvFrozenBatchNorm2d":
        folded = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, device="meta")
        folded.weight, folded.bias = conv.weight, conv.bias
        folded._norm = (norm,)  # a tuple: not a submodule, so the norm's names stay where they are
        folded._cache = None
        return folded

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = self._norm[0]
        if not self.folding or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() \
                or torch.compiler.is_compiling():
            return FrozenBatchNorm2d.forward(norm, super().forward(x))
        weight, bias = self._folded(norm)
        return self._conv_forward(x, weight, bias)

    def _folded(self, norm: FoldedFrozenBatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
        tensors = [self.weight, norm.weight, norm.bias, norm.running_mean, norm.running_var]
        if self.bias is not None:
            tensors.append(self.bias)
        cacheable = not (torch.is_grad_enabled() and self.weight.requires_grad) and \
            not any(t.is_inference() for t in tensors)
        key = (torch.is_inference_mode_enabled(), *((t.data_ptr(), t._version) for t in tensors)) \
            if cacheable else None
        if key is not None and self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        scale, shift = norm.scale_shift()
        weight = self.weight * scale.reshape(-1, 1, 1, 1)
        bias = shift if self.bias is None else self.bias * scale + shift
        self._cache = (key, weight, bias) if key is not None else None
        return weight, bias


def fold_frozen_batchnorms(network: nn.Module) -> None:
    """Each convolution directly followed (in registration order) by a FrozenBatchNorm2d becomes a
    ConvFrozenBatchNorm2d; the parameters and their names stay as they are."""
    for parent in list(network.modules()):
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if type(conv) is nn.Conv2d and type(norm) is FrozenBatchNorm2d \
                    and conv.out_channels == norm.weight.shape[0]:
                folded_norm = FoldedFrozenBatchNorm2d(conv.out_channels, norm.eps)
                folded_norm._buffers.update(norm._buffers)  # the same tensors
                parent._modules[norm_name] = folded_norm
                parent._modules[conv_name] = ConvFrozenBatchNorm2d.around(conv, folded_norm)


def set_batchnorm_folding(model: nn.Module, enabled: bool) -> None:
    for module in model.modules():
        if isinstance(module, ConvFrozenBatchNorm2d):
            module.folding = enabled


def _resize_mask(mask: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(mask[None].float(), size=tuple(size)).to(torch.bool)[0]


class _BackboneBase(nn.Module):
    """Feature maps of the chosen stages with their padding masks (`backbone.0`)."""

    num_channels: List[int]
    strides: List[int]

    def stage_features(self, images: torch.Tensor) -> List[torch.Tensor]:
        raise NotImplementedError

    def forward(self, images: torch.Tensor, mask: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        return [(feature, _resize_mask(mask, feature.shape[-2:])) for feature in self.stage_features(images)]


class ResNetBackbone(_BackboneBase):
    """A torchvision ResNet (frozen BatchNorm) cut after the last stage it needs."""

    def __init__(self, network: resnet.ResNet, stage_indices: Sequence[int], train_backbone: bool,
                 dilation: bool = False) -> None:
        super().__init__()
        for name, parameter in network.named_parameters():
            # As the original: the stem and layer1 stay frozen even when the backbone trains.
            if not train_backbone or not any(f"layer{i}" in name for i in (2, 3, 4)):
                parameter.requires_grad_(False)
        if type(network.maxpool) is nn.MaxPool2d:
            pool = network.maxpool
            network.maxpool = ChannelsLastMaxPool2d(pool.kernel_size, pool.stride, pool.padding, pool.dilation,
                                                    pool.return_indices, pool.ceil_mode)
        fold_frozen_batchnorms(network)
        return_layers = {f"layer{i + 1}": str(i) for i in stage_indices}
        stages = [network.layer1, network.layer2, network.layer3, network.layer4]
        self.body = IntermediateLayerGetter(network, return_layers=return_layers)
        self.num_channels = [_block_out_channels(stages[i][-1]) for i in stage_indices]
        # A dilated layer4 keeps layer3's stride.
        self.strides = [4 * 2 ** min(i, 2 if dilation else 3) for i in stage_indices]

    def stage_features(self, images: torch.Tensor) -> List[torch.Tensor]:
        return list(self.body(images).values())


def _block_out_channels(block: nn.Module) -> int:
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return int(last_bn.weight.shape[0])


class GcVitBackbone(_BackboneBase):
    """GC-ViT (model/gcvit.py) returning the chosen stages, each through its output norm; any input size."""

    def __init__(self, network: nn.Module, stage_indices: Sequence[int], train_backbone: bool) -> None:
        super().__init__()
        self.body = network
        self.stage_indices = list(stage_indices)
        if list(network.out_indices) != sorted(self.stage_indices):
            raise ValueError(f"GC-ViT built for stages {network.out_indices}, asked for {self.stage_indices}")
        if not train_backbone:
            for parameter in network.parameters():
                parameter.requires_grad_(False)
        info = network.feature_info
        self.num_channels = [int(info[i]["num_chs"]) for i in stage_indices]
        self.strides = [int(info[i]["reduction"]) for i in stage_indices]

    def stage_features(self, images: torch.Tensor) -> List[torch.Tensor]:
        return self.body(images)  # any input size: windows are padded, global queries resized (as TAO)


class Joiner(nn.Sequential):
    """`backbone.0` (network) and `backbone.1` (position encoding), as the original."""

    def __init__(self, backbone: nn.Module, position_embedding: PositionEmbeddingSine) -> None:
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels
        self.strides = backbone.strides

    def forward(self, images: torch.Tensor, mask: torch.Tensor):
        features = self[0](images, mask)
        pos = [self[1](m).to(f.dtype) for f, m in features]
        return features, pos

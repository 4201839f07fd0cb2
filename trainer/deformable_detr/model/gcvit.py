"""GC-ViT backbone with TAO's detection semantics on timm's modules, and TAO's parameter names.

The network holds timm's `stem` and `stages` (timm's names, so timm weights load as they are) built
with the 224-pixel layout that TAO's deformable_detr uses for every input size: windows of 7, 7, 14, 7
(12, 12, 24, 12 for gc_vit_large_384) and global-query generators of 3, 2, 1 and 1 blocks. Any input
size runs; its forward follows TAO's detection backbone:

- windows are padded (right and bottom, with zeros after the first norm) to a multiple of the window;
- a global query whose size differs from the window is resized to it (bicubic);
- every returned stage goes through its own LayerNorm `norm{i}` (TAO's output norms);
- the last stage has no stage norm (timm's `stages.3.norm` belongs to its classifier).

At 224 pixels this is timm's forward followed by the output norms. TAO names the same tensors
differently (`patch_embed`, `levels.{i}`, a stage's downsampling at the end of the previous level,
Linear SE layers, `gamma1/2`, a stored relative position index); `tao_state_from_gcvit` and
`gcvit_state_from_tao` convert between the two namings, one tensor to one tensor.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable, List, Mapping, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UsageError
from ..runtime.logging import get_logger

log = get_logger("model.gcvit")

# TAO builds its detection GC-ViT for a 224-pixel image whatever the input (`resolution=224`).
LAYOUT_SIZE = 224
# TAO's large variants, which timm does not register: its GlobalContextVit with TAO's depths, heads,
# width, MLP ratio and layer scale. gc_vit_large_384's windows (12, 12, 24, 12) are timm's layout
# for 384 pixels, whose global-query generators have the same 3, 2, 1, 1 blocks as at 224.
_LARGE = dict(depths=(3, 4, 19, 5), num_heads=(6, 12, 24, 48), embed_dim=192, mlp_ratio=2, layer_scale=1e-5)
_UNREGISTERED = {"gcvit_large": (_LARGE, LAYOUT_SIZE), "gcvit_large_384": (_LARGE, 384)}
# Keys of classification checkpoints that a detection backbone does not use (TAO/NVlabs and timm).
_CLASSIFIER_KEYS = re.compile(r"^(head\..*|norm\.(weight|bias)|stages\.\d+\.norm\.(weight|bias))$")
_OUTPUT_NORM_PATTERN = r"norm\d+\.(weight|bias)"
_OUTPUT_NORM = re.compile(_OUTPUT_NORM_PATTERN)
_TAO_ROOTS = ("patch_embed.", "levels.")


def _window_partition(x: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    batch, height, width, channels = x.shape
    x = x.view(batch, height // window[0], window[0], width // window[1], window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], channels)


def _window_reverse(windows: torch.Tensor, window: Tuple[int, int], height: int, width: int) -> torch.Tensor:
    channels = windows.shape[-1]
    x = windows.view(-1, height // window[0], width // window[1], window[0], window[1], channels)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, height, width, channels)


class GcVitNetwork(nn.Module):
    """timm's GC-ViT stem and stages, run as TAO's detection backbone, with output norms `norm{i}`."""

    def __init__(self, timm_name: str, out_indices: Sequence[int]) -> None:
        super().__init__()
        import timm

        if timm_name in _UNREGISTERED:
            from timm.models.gcvit import GlobalContextVit

            layout, size = _UNREGISTERED[timm_name]
            network = GlobalContextVit(num_classes=0, img_size=size, **layout)
        else:
            network = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=LAYOUT_SIZE)
        self.stem = network.stem
        self.stages = network.stages
        self.stages[-1].norm = nn.Identity()
        self.feature_info = network.feature_info
        self.out_indices = sorted(out_indices)
        for index in self.out_indices:
            self.add_module(f"norm{index}", nn.LayerNorm(int(self.feature_info[index]["num_chs"])))

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        x = self.stem(images)
        outputs = []
        for index, stage in enumerate(self.stages[:self.out_indices[-1] + 1]):
            x = self._stage(stage, stage.downsample(x))  # channels last
            if index in self.out_indices:
                outputs.append(getattr(self, f"norm{index}")(x).permute(0, 3, 1, 2).contiguous())
            x = x.permute(0, 3, 1, 2)
        return outputs

    @staticmethod
    def _stage(stage: nn.Module, x: torch.Tensor) -> torch.Tensor:
        window = tuple(stage.blocks[0].window_size)
        query = stage.global_block(x)
        if tuple(query.shape[-2:]) != window:
            query = F.interpolate(query, size=window, mode="bicubic", align_corners=False)
        query = stage.global_norm(query.permute(0, 2, 3, 1))
        x = x.permute(0, 2, 3, 1)
        for block in stage.blocks:
            x = GcVitNetwork._block(block, x, query, window)
        return stage.norm(x)

    @staticmethod
    def _block(block: nn.Module, x: torch.Tensor, query: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
        height, width = int(x.shape[1]), int(x.shape[2])
        pad_bottom, pad_right = (-height) % window[0], (-width) % window[1]
        y = block.norm1(x)
        if pad_bottom or pad_right:
            y = F.pad(y, (0, 0, 0, pad_right, 0, pad_bottom))
        padded_height, padded_width = height + pad_bottom, width + pad_right
        y = block.attn(_window_partition(y, window), query)
        y = _window_reverse(y, window, padded_height, padded_width)
        if pad_bottom or pad_right:
            y = y[:, :height, :width, :].contiguous()
        x = x + block.drop_path1(block.ls1(y))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


# --- TAO naming ------------------------------------------------------------------------------------

# timm's MbConvBlock (depthwise conv, SE with 1x1 convs, pointwise conv) is TAO's `conv` Sequential
# (depthwise conv, GELU, SE with Linear layers, pointwise conv).
_MBCONV_TO_TAO = {"conv_dw.weight": "conv.0.weight", "se.fc1.weight": "conv.2.fc.0.weight",
                  "se.fc2.weight": "conv.2.fc.2.weight", "conv_pw.weight": "conv.3.weight"}
_BLOCK_TO_TAO = {"ls1.gamma": "gamma1", "ls2.gamma": "gamma2",
                 "attn.rel_pos.relative_position_bias_table": "attn.relative_position_bias_table"}
_BLOCK_SAME = {f"{module}.{kind}" for module in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
               for kind in ("weight", "bias")}
_SE_WEIGHT = re.compile(r"\.se\.fc[12]\.weight$")
_REL_TABLE = "attn.rel_pos.relative_position_bias_table"


def _downsample_to_tao(rest: str) -> str:
    if rest.startswith("conv_block."):
        return _MBCONV_TO_TAO[rest[len("conv_block."):]]
    if rest.split(".")[0] in ("norm1", "norm2", "reduction"):
        return rest
    raise KeyError(rest)


def tao_name(name: str) -> str:
    """TAO's name of one GC-ViT tensor given its name here (timm's, plus `norm{i}`); KeyError if none."""
    if match := re.fullmatch(r"stem\.conv1\.(weight|bias)", name):
        return f"patch_embed.proj.{match[1]}"
    if match := re.fullmatch(r"stem\.down\.(.+)", name):
        return "patch_embed.conv_down." + _downsample_to_tao(match[1])
    # timm downsamples at the start of stage i, TAO at the end of level i - 1.
    if match := re.fullmatch(r"stages\.(\d+)\.downsample\.(.+)", name):
        return f"levels.{int(match[1]) - 1}.downsample." + _downsample_to_tao(match[2])
    if match := re.fullmatch(r"stages\.(\d+)\.global_block\.blocks\.conv(\d+)\.(.+)", name):
        return f"levels.{match[1]}.q_global_gen.to_q_global.{int(match[2]) - 1}." + _MBCONV_TO_TAO[match[3]]
    if match := re.fullmatch(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", name):
        rest = match[3]
        if rest in _BLOCK_SAME:
            return f"levels.{match[1]}.blocks.{match[2]}.{rest}"
        return f"levels.{match[1]}.blocks.{match[2]}." + _BLOCK_TO_TAO[rest]
    if _OUTPUT_NORM.fullmatch(name):
        return name
    raise KeyError(name)


def _tao_index_name(table_name: str) -> str:
    return tao_name(table_name).replace("relative_position_bias_table", "relative_position_index")


def _relative_position_index(network: nn.Module, table_name: str) -> torch.Tensor:
    """The (window area, window area) index TAO stores next to each table; timm derives it, unsaved."""
    module = network.get_submodule(table_name.rsplit(".", 1)[0])
    area = module.window_area
    return module.relative_position_index.view(area, area)


def name_map(network: GcVitNetwork) -> Dict[str, str]:
    """{name here: TAO name} for every tensor of `network`'s state dict; one to one."""
    mapping = {name: tao_name(name) for name in network.state_dict()}
    if len(set(mapping.values())) != len(mapping):  # a rule that folds two tensors into one name
        raise AssertionError("GC-ViT naming map is not one to one")
    return mapping


def tao_state_from_gcvit(network: GcVitNetwork, state: Mapping[str, torch.Tensor] | None = None
                         ) -> Dict[str, torch.Tensor]:
    """`network`'s weights (or `state`, in its naming) under TAO's names and layouts."""
    state = network.state_dict() if state is None else state
    tao: Dict[str, torch.Tensor] = {}
    for name, tao_key in name_map(network).items():
        value = state[name]
        tao[tao_key] = value.flatten(1) if _SE_WEIGHT.search(name) else value  # 1x1 conv -> Linear
        if name.endswith(_REL_TABLE):
            tao[_tao_index_name(name)] = _relative_position_index(network, name).clone()
    return tao


def is_tao_naming(keys: Iterable[str]) -> bool:
    return any(key.startswith(_TAO_ROOTS) for key in keys)


def _listing(keys: List[str]) -> str:
    return f"{len(keys)} ({', '.join(keys[:5])}{', ...' if len(keys) > 5 else ''})"


def gcvit_state_from_tao(network: GcVitNetwork, tao: Mapping[str, torch.Tensor], source: str,
                         optional: Sequence[str] = ()) -> Dict[str, torch.Tensor]:
    """TAO-named GC-ViT weights under this network's names; an error when any key is left unmatched.

    optional: regular expressions of this network's keys that `tao` may lack (left as they are).
    Keys TAO derives (relative position indices) must equal the network's and are dropped.
    """
    own = network.state_dict()
    to_ours = {tao_key: name for name, tao_key in name_map(network).items()}
    indices = {_tao_index_name(name): _relative_position_index(network, name)
               for name in own if name.endswith(_REL_TABLE)}
    converted: Dict[str, torch.Tensor] = {}
    unmatched, wrong_index = [], []
    for key, value in tao.items():
        if key in indices:
            if value.shape != indices[key].shape or not torch.equal(value.to(indices[key].device), indices[key]):
                wrong_index.append(key)
            continue
        name = to_ours.get(key)
        if name is None:
            unmatched.append(key)
            continue
        linear_se = _SE_WEIGHT.search(name) and value.dim() == 2 and value.numel() == own[name].numel()
        converted[name] = value.reshape(own[name].shape) if linear_se else value  # Linear -> 1x1 conv
    missing = [name for name in own if name not in converted
               and not any(re.fullmatch(pattern, name) for pattern in optional)]
    if unmatched or missing or wrong_index:
        problems = []
        if unmatched:
            problems.append(f"{_listing(unmatched)} TAO keys match no tensor of the backbone")
        if missing:
            problems.append(f"{_listing([tao_name(name) for name in missing])} backbone tensors (TAO names) "
                            "are not in the file")
        if wrong_index:
            problems.append(f"{_listing(wrong_index)} relative position indices differ from this window layout")
        raise UsageError(f"{source}: TAO GC-ViT weights do not fit the configured backbone: "
                         + "; ".join(problems) + "; check model.backbone (gc_vit_xxtiny ... gc_vit_large_384) "
                         "against the checkpoint's")
    return converted


def resize_relative_tables(network: GcVitNetwork, state: Dict[str, torch.Tensor]) -> List[str]:
    """Bicubically resize relative position tables made for other windows to this network's (in place)."""
    own = network.state_dict()
    resized = []
    for name, value in list(state.items()):
        if not name.endswith("relative_position_bias_table") or name not in own or own[name].shape == value.shape:
            continue
        rows, heads = value.shape
        side, new_side = round(rows ** 0.5), round(own[name].shape[0] ** 0.5)
        if side * side != rows or heads != own[name].shape[1]:
            continue  # left for the shape check to report
        grid = value.t().reshape(1, heads, side, side).float()
        grid = F.interpolate(grid, size=(new_side, new_side), mode="bicubic", align_corners=False)
        state[name] = grid.reshape(heads, new_side * new_side).t().to(value.dtype)
        resized.append(name)
    return resized


def load_gcvit_backbone_weights(network: GcVitNetwork, state: Mapping[str, torch.Tensor], path: str) -> None:
    """Backbone weights in timm's or TAO's naming into `network`, strictly.

    Classifier-only tensors (head, final norm) are skipped and the detection output norms may be
    absent (TAO leaves them freshly initialised too); any other key without a counterpart is an error.
    """
    source = f"model.pretrained_backbone_path {path}"
    skipped = sorted(key for key in state if _CLASSIFIER_KEYS.fullmatch(key))
    kept = {key: value for key, value in state.items() if key not in skipped}
    if is_tao_naming(kept):
        naming = "TAO"
        kept = gcvit_state_from_tao(network, kept, source, optional=(_OUTPUT_NORM_PATTERN,))
    else:
        naming = "timm"
        own = network.state_dict()
        unexpected = sorted(set(kept) - set(own))
        missing = sorted(key for key in own if key not in kept and not _OUTPUT_NORM.fullmatch(key))
        if unexpected or missing:
            raise UsageError(f"{source}: GC-ViT weights do not fit the configured backbone: "
                             f"{_listing(unexpected)} keys match no tensor of the backbone, {_listing(missing)} "
                             "backbone tensors are not in the file; accepted: timm's or TAO's GC-ViT of the "
                             "configured model.backbone")
    resized = resize_relative_tables(network, kept)
    own = network.state_dict()
    mismatched = [f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}" for key, value in kept.items()
                  if value.shape != own[key].shape]
    if mismatched:
        raise UsageError(f"{source}: {len(mismatched)} GC-ViT tensors have other shapes than the configured "
                         f"backbone's (e.g. {'; '.join(mismatched[:3])}); check model.backbone")
    result = network.load_state_dict(kept, strict=False)
    log.info("backbone weights from %s (%s naming): %d tensors loaded, %d output norms left initialised, "
             "%d classifier tensors skipped%s", path, naming, len(kept), len(result.missing_keys), len(skipped),
             f", {len(resized)} relative position tables resized to this window layout" if resized else "")


def convert_tao_gcvit_keys(model: nn.Module, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A full checkpoint's state dict with every GC-ViT backbone in TAO naming renamed to this model's.

    Only backbones whose keys are in TAO naming are touched; the rest of `state` passes unchanged.
    """
    for prefix, module in model.named_modules():
        if not isinstance(module, GcVitNetwork):
            continue
        prefix = f"{prefix}." if prefix else ""
        section = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        if not is_tao_naming(section):
            continue
        converted = gcvit_state_from_tao(module, section, source=f"checkpoint ({prefix}*)")
        state = {key: value for key, value in state.items() if not key.startswith(prefix)}
        state.update({prefix + key: value for key, value in converted.items()})
        log.info("GC-ViT backbone %s* converted from TAO naming (%d tensors)", prefix, len(converted))
    return state

"""Teacher-student model, its configuration and the named ablation variants."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from .anomaly_map import AnomalyMap
from .attention import CBAM
from .backbones import build_backbone, build_deep_teacher, build_teacher
from .heads import ImageHeads
from .losses import channel_cosine_loss, position_cosine_loss, spatial_kl_loss, stfpm_loss

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ModelConfig:
    method: str = "dcam"               # "dcam" (sum of maps) or "stfpm" (product of maps, STFPM loss)
    backbone: str = "mobilenet_v2"
    input_size: int = 256
    attention: bool = True             # CBAM on each student scale before the losses (training only)
    attend_teacher: bool = False       # also multiply the teacher map by the (detached) student CBAM masks
    w_cos: float = 1.0                 # channel-wise cosine distance (over H*W)
    w_kl: float = 1.0                  # spatial KL at temperature T
    w_pos: float = 0.0                 # per-position cosine (over channels) on the raw, un-attended maps
    temperature: float = 4.0
    reduction: int = 4
    scale_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    blur_sigma: float = 4.0
    combine: str = ""                  # how per-scale maps are merged: "sum" / "prod"; "" = sum for dcam, prod for stfpm
    score_rule: str = "max"            # image score: "max" of the map or "top1pct_mean" (see anomaly_map.py)
    # Heads fitted after training (heads.py); "" = the score is the map score alone (the old model).
    density: str = ""                  # "" / "map" (pooled 3 map stages) / "deep" (+ stride-32 stages)
    tta_views: int = 1                 # flip/transpose views averaged for the density features (1, 2, 4, 8)
    pixel_norm: str = ""               # per-pixel map normalisation from held-out normals: "" off, "score" for the
                                       # image score only (output map stays raw), "map" for the output map too
    w_map: float = 1.0                 # fused score = z_density + w_map * z_map

    def to_dict(self) -> dict:
        return asdict(self)


# Ablation variants; "dcam" is the method as specified in the paper/issue.
VARIANTS: dict[str, ModelConfig] = {
    "stfpm": ModelConfig(method="stfpm", attention=False, w_cos=0, w_kl=0),
    "dcam": ModelConfig(),
    "dcam_noatt": ModelConfig(attention=False),
    "dcam_cos": ModelConfig(w_kl=0.0),
    "dcam_kl": ModelConfig(w_cos=0.0),
    # Fix for both docs/DESIGN.md section 7 suspects: masks on teacher too, plus the per-position term on raw maps.
    "dcam_fixed": ModelConfig(attend_teacher=True, w_pos=1.0),
    # Same as dcam_fixed but merges the scales like STFPM (product): tests the map fusion, not the loss.
    "dcam_fixed_prod": ModelConfig(attend_teacher=True, w_pos=1.0, combine="prod"),
}


def variant_config(name: str, **overrides) -> ModelConfig:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(VARIANTS[name], **overrides)


class Normalize(nn.Module):
    """uint8 NHWC RGB -> float NCHW, ImageNet-normalised (inside the exported graph)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255, persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.permute(0, 3, 1, 2).float() - self.mean) / self.std


class DistillModel(nn.Module):
    def __init__(self, cfg: ModelConfig, teacher_weights: str | None = None, teacher: nn.Module | None = None):
        super().__init__()
        self.cfg = cfg
        self.normalize = Normalize()
        self.teacher = teacher if teacher is not None else build_teacher(cfg.backbone, teacher_weights)
        self.student = build_backbone(cfg.backbone)  # same architecture, random init
        chans = self.student.channels
        self.attention = nn.ModuleList(CBAM(c, cfg.reduction) for c in chans) if cfg.attention else None
        combine = cfg.combine or ("prod" if cfg.method == "stfpm" else "sum")
        self.anomaly_map = AnomalyMap(cfg.input_size, combine, cfg.blur_sigma, cfg.score_rule)
        self.heads: ImageHeads | None = None  # attach_heads() after training
        self._teacher_weights = teacher_weights

    def attach_heads(self, classes: list[str]) -> ImageHeads:
        cfg = self.cfg
        deep = build_deep_teacher(cfg.backbone, self._teacher_weights) if cfg.density == "deep" else None
        dims = list(self.teacher.channels) + (list(deep.channels) if deep is not None else [])
        self.heads = ImageHeads(classes, dims, cfg.input_size, cfg.tta_views, cfg.pixel_norm, cfg.w_map, deep).eval()
        return self.heads

    @torch.no_grad()
    def student_map(self, images_u8) -> torch.Tensor:
        """The raw (un-normalised) anomaly map, for fitting the heads."""
        x = self.normalize(torch.as_tensor(images_u8))
        return self.anomaly_map.map(self.teacher(x), self.student(x))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher is frozen, BN statistics included
        if self.heads is not None:
            self.heads.eval()  # fitted, never trained
        return self

    @torch.no_grad()
    def teacher_features(self, images_u8: torch.Tensor) -> list[torch.Tensor]:
        return self.teacher(self.normalize(images_u8))

    def loss(self, t_feats: list[torch.Tensor], s_feats: list[torch.Tensor]) -> tuple[torch.Tensor, dict]:
        cfg, total, parts = self.cfg, 0.0, {"cos": 0.0, "kl": 0.0, "pos": 0.0, "stfpm": 0.0}
        for i, (t, s, w) in enumerate(zip(t_feats, s_feats, cfg.scale_weights)):
            if cfg.method == "stfpm":
                terms = {"stfpm": stfpm_loss(t, s)}
            else:
                terms = {}
                if cfg.w_pos:
                    terms["pos"] = cfg.w_pos * position_cosine_loss(t, s)
                ta, sa = t, s
                if self.attention is not None:
                    mc, ms = self.attention[i].masks(s)
                    sa = s * mc * ms
                    if cfg.attend_teacher:
                        ta = t * (mc * ms).detach()
                if cfg.w_cos:
                    terms["cos"] = cfg.w_cos * channel_cosine_loss(ta, sa)
                if cfg.w_kl:
                    terms["kl"] = cfg.w_kl * spatial_kl_loss(ta, sa, cfg.temperature)
            for k, v in terms.items():
                parts[k] += float(v.detach()) * w
                total = total + w * v
        return total, parts

    def forward(self, images_u8: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inference path (attention dropped): uint8 NHWC -> (anomaly_map [N,S,S], score [N])."""
        x = self.normalize(images_u8)
        t = self.teacher(x)
        if self.heads is None:
            return self.anomaly_map(t, self.student(x))
        amap = self.anomaly_map.map(t, self.student(x))
        return self.heads.fuse(amap, self.anomaly_map.score, self.heads.pooled(self.teacher, x, t))


def save_checkpoint(model: DistillModel, path, extra: dict | None = None) -> None:
    # The frozen ImageNet stages come from the weight packages again at load time.
    state = {k: v for k, v in model.state_dict().items() if not _is_teacher(k)}
    heads = {"classes": model.heads.classes} if model.heads is not None else None
    torch.save({"config": model.cfg.to_dict(), "state_dict": state, "heads": heads, **(extra or {})}, path)


def _is_teacher(key: str) -> bool:
    return key.startswith("teacher.") or key.startswith("heads.deep.")


def load_checkpoint(path, teacher_weights: str | None = None) -> tuple[DistillModel, dict]:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfgd = dict(ckpt["config"])
    cfgd["scale_weights"] = tuple(cfgd["scale_weights"])
    model = DistillModel(ModelConfig(**cfgd), teacher_weights or ckpt.get("teacher_weights"))
    if ckpt.get("heads"):
        model.attach_heads(ckpt["heads"]["classes"])
    missing, unexpected = model.load_state_dict(ckpt["state_dict"], strict=False)
    assert not unexpected and all(_is_teacher(k) for k in missing), (missing, unexpected)
    model.eval()
    return model, ckpt

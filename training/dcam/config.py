"""Model configuration and the named ablation variants."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from enum import Enum


class Mode(str, Enum):
    """A choice among named modes. Its value is what the CLI takes and the exported `dcam.train_config`
    holds (a str subclass, so JSON writes the value)."""

    def __str__(self) -> str:
        return self.value

    @classmethod
    def _missing_(cls, value):
        # Files written before the modes were typed said "" for off.
        return cls("none") if value == "" and "none" in cls._value2member_map_ else None


class Method(Mode):
    DCAM = "dcam"      # CBAM + channel-wise cosine + spatial KL (losses.py)
    STFPM = "stfpm"    # per-position cosine, no attention


class Combine(Mode):
    SUM = "sum"
    PROD = "prod"


class ScoreRule(Mode):
    MAX = "max"
    TOP1PCT_MEAN = "top1pct_mean"


class Density(Mode):
    NONE = "none"      # the score is the map score alone
    MAP = "map"        # pooled map stages
    DEEP = "deep"      # + the teacher's stride-32 stages


class PixelNormMode(Mode):
    NONE = "none"
    SCORE = "score"    # for the image score only (the output map stays raw)
    MAP = "map"        # for the output map too


_MODES = {"method": Method, "combine": Combine, "score_rule": ScoreRule, "density": Density, "pixel_norm": PixelNormMode}


@dataclass
class ModelConfig:
    method: Method = Method.DCAM       # dcam (sum of maps) or stfpm (product of maps, STFPM loss)
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
    combine: Combine | None = None     # how per-scale maps are merged; None: sum for dcam, prod for stfpm
    score_rule: ScoreRule = ScoreRule.MAX  # image score: max of the map or the mean of its top 1 % (anomaly_map.py)
    # Heads fitted after training (heads.py); density none = the score is the map score alone (the old model).
    density: Density = Density.NONE
    tta_views: int = 1                 # flip/transpose views averaged for the density features (1, 2, 4, 8)
    pixel_norm: PixelNormMode = PixelNormMode.NONE  # per-pixel map normalisation from held-out normals
    w_map: float = 1.0                 # fused score = z_density + w_map * z_map
    density_groups: int = 1            # up to this many Gaussians per class (k-means groups, >= 50 images each)
    density_tie_dim: int = 0           # stages at least this wide share one covariance across a class's groups (0: none)
    bank_fraction: float = 0.0         # local patch bank (patch_bank.py): share of each class's training positions kept (0: none)
    bank_max_entries: int = 10_000     # the bank's size cap over all classes (the search's cost grows with it; 0: none)
    bank_dims: int = 64                # PCA dimensions of the bank's descriptors (0: all 128)
    bank_w_student: float = 0.0        # the student's map in the raw map, relative to the bank map (both at their held-out 99th pct.)

    def __post_init__(self):
        # Strings from the CLI, a checkpoint or an exported file become modes (a wrong one fails here).
        for name, mode in _MODES.items():
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, mode(value))
        if self.combine is None:
            self.combine = Combine.PROD if self.method is Method.STFPM else Combine.SUM

    @property
    def has_heads(self) -> bool:
        return self.density is not Density.NONE

    def to_dict(self) -> dict:
        return {k: (v.value if isinstance(v, Mode) else v) for k, v in asdict(self).items()}

    @classmethod
    def field_values(cls, d: dict) -> dict:
        """The entries of `d` (a saved config or a train_config) that are fields, JSON lists as tuples."""
        names = {f.name for f in fields(cls)}
        values = {k: (tuple(v) if k == "scale_weights" else v) for k, v in d.items() if k in names}
        if values.get("combine") == "":  # before the modes were typed "" meant the method's own
            values["combine"] = None
        return values


# Ablation variants; "dcam" is the method as specified in the paper/issue.
VARIANTS: dict[str, ModelConfig] = {
    "stfpm": ModelConfig(method=Method.STFPM, attention=False, w_cos=0, w_kl=0),
    "dcam": ModelConfig(),
    "dcam_noatt": ModelConfig(attention=False),
    "dcam_cos": ModelConfig(w_kl=0.0),
    "dcam_kl": ModelConfig(w_cos=0.0),
    # Fix for both docs/DESIGN.md section 7 suspects: masks on teacher too, plus the per-position term on raw maps.
    "dcam_fixed": ModelConfig(attend_teacher=True, w_pos=1.0),
    # Same as dcam_fixed but merges the scales like STFPM (product): tests the map fusion, not the loss.
    "dcam_fixed_prod": ModelConfig(attend_teacher=True, w_pos=1.0, combine=Combine.PROD),
}


def variant_config(name: str, **overrides) -> ModelConfig:
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(VARIANTS[name], **overrides)


def config_from_train_config(tc: dict) -> ModelConfig:
    """The config an exported file (its `dcam.train_config`) was made with: its variant, then its fields."""
    return replace(variant_config(tc.get("variant", "stfpm")), **ModelConfig.field_values(tc))

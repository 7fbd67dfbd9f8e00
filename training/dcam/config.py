"""Model configuration and the named ablation variants."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
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


def _as_modes(obj, modes: dict) -> None:
    # Strings from the CLI, a checkpoint or an exported file become modes (a wrong one fails here).
    for name, mode in modes.items():
        value = getattr(obj, name)
        if value is not None:
            setattr(obj, name, mode(value))


def _plain(d: dict) -> dict:
    return {k: (v.value if isinstance(v, Mode) else v) for k, v in d.items()}


@dataclass
class HeadsConfig:
    """The heads fitted on a trained student without gradient steps (heads.py); density none = the score is
    the map score alone (the model before heads)."""
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
        _as_modes(self, {"density": Density, "pixel_norm": PixelNormMode})

    @property
    def enabled(self) -> bool:
        return self.density is not Density.NONE


_HEAD_KEYS = frozenset(f.name for f in fields(HeadsConfig))


@dataclass
class ModelConfig:
    """The student, its training objective and the map (their fields), and the heads (`heads`). Exported
    flat (`to_dict`): the keys of `dcam.train_config`."""
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
    score_rule: ScoreRule = ScoreRule.MAX  # map score: its max or the mean of its top 1 % (anomaly_map.py)
    heads: HeadsConfig = field(default_factory=HeadsConfig)

    def __post_init__(self):
        _as_modes(self, {"method": Method, "combine": Combine, "score_rule": ScoreRule})
        if self.combine is None:
            self.combine = Combine.PROD if self.method is Method.STFPM else Combine.SUM

    def to_dict(self) -> dict:
        own = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "heads"}
        return _plain({**own, **asdict(self.heads)})

    def with_changes(self, **changes) -> ModelConfig:
        """A copy with `changes` (flat keys, as `to_dict` writes them) applied to the model or its heads."""
        heads = {k: v for k, v in changes.items() if k in _HEAD_KEYS}
        own = {k: v for k, v in changes.items() if k not in _HEAD_KEYS}
        if "method" in own and "combine" not in own:
            own["combine"] = None  # a new method brings its own merge unless one is given
        return replace(self, **own, heads=replace(self.heads, **heads))

    @classmethod
    def known(cls, d: dict) -> dict:
        """The entries of `d` (a saved config or a train_config, flat) that are fields of the model or its
        heads, JSON lists as tuples; "" for combine (written before the modes were typed) = the method's own."""
        names = ({f.name for f in fields(cls)} - {"heads"}) | _HEAD_KEYS
        values = {k: (tuple(v) if k == "scale_weights" else v) for k, v in d.items() if k in names}
        if values.get("combine") == "":
            values["combine"] = None
        return values

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        values = cls.known(d)
        return cls(**{k: v for k, v in values.items() if k not in _HEAD_KEYS},
                   heads=HeadsConfig(**{k: v for k, v in values.items() if k in _HEAD_KEYS}))


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
    return VARIANTS[name].with_changes(**{k: v for k, v in overrides.items() if v is not None})


def config_from_train_config(tc: dict) -> ModelConfig:
    """The config an exported file (its `dcam.train_config`) was made with: its variant, then its fields."""
    return variant_config(tc.get("variant", "stfpm")).with_changes(**ModelConfig.known(tc))

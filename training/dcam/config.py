"""Model configuration and the named ablation variants."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace


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
    density_groups: int = 1            # up to this many Gaussians per class (k-means groups, >= 50 images each)
    density_tie_dim: int = 0           # stages at least this wide share one covariance across a class's groups (0: none)
    bank_fraction: float = 0.0         # local patch bank (patch_bank.py): share of each class's training positions kept (0: none)
    bank_max_entries: int = 10_000     # the bank's size cap over all classes (the search's cost grows with it; 0: none)
    bank_dims: int = 64                # PCA dimensions of the bank's descriptors (0: all 128)
    bank_w_student: float = 0.0        # the student's map in the raw map, relative to the bank map (both at their held-out 99th pct.)

    @property
    def map_combine(self) -> str:
        return self.combine or ("prod" if self.method == "stfpm" else "sum")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_values(cls, d: dict) -> dict:
        """The entries of `d` (a saved config or a train_config) that are fields, JSON lists as tuples."""
        names = {f.name for f in fields(cls)}
        return {k: (tuple(v) if k == "scale_weights" else v) for k, v in d.items() if k in names}


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


def config_from_train_config(tc: dict) -> ModelConfig:
    """The config an exported file (its `dcam.train_config`) was made with: its variant, then its fields."""
    return replace(variant_config(tc.get("variant", "stfpm")), **ModelConfig.field_values(tc))

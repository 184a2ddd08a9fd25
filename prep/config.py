"""PrepConfig: every setting that decides what a shard holds, saved in each shard's stats, the run config and the manifest."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from shards import schema

SOURCE_KINDS = ("coco", "imagenet", "folder")
SS_MODES = ("fast", "quality", "single")
# Settings added after outputs were first made, with the value that gives what was made before they existed.
_BEFORE_RECORDED = {"fallback_min_side": None}


@dataclass(frozen=True)
class PrepConfig:
    # source
    kind: str  # one of SOURCE_KINDS
    root: str  # as given on the command line (kept for the record, not part of the fingerprint)
    annotations: str | None = None  # COCO instances JSON
    # selective search (defaults from ORL / UniVIP)
    mode: str = "fast"
    ss_max_side: int = 500  # image resized so its longer side is at most this before selective search
    seed: int = 0  # per-image C rand() seed = f(seed, key): same boxes, same order, in any process
    # filters, applied in selective-search order (prep.proposals.tiered_filter)
    min_side: int = 96  # px, in stored-image pixels (ORL, UniVIP)
    # second tier, only for images where fewer than min_boxes boxes of min_side survive: boxes down to this side
    # (UniVIP's 64); None: no second tier. A value >= min_side could add nothing and is stored as None.
    fallback_min_side: int | None = 64
    max_aspect: float = 3.0
    iou: float = 0.5  # greedy suppression threshold
    max_boxes: int = 100
    min_boxes: int = 4  # K of UniVIP: fewer first-tier boxes call the second tier; fewer in all are counted few_boxes
    # storage
    max_side: int | None = None  # downscale stored images so the longer side is at most this
    jpeg_quality: int = 95
    max_pixels: int = 89_478_485  # decompression-bomb limit (PIL's default), refused without decoding
    shard_size: int = 1000
    prefix: str = ""  # shard name prefix; "" means the source kind

    def __post_init__(self) -> None:
        for f in fields(self):
            # one spelling per value: 3 from the Python API and 3.0 from the CLI must give the same fingerprint
            if f.type == "float" and isinstance(getattr(self, f.name), int):
                object.__setattr__(self, f.name, float(getattr(self, f.name)))
        if self.kind not in SOURCE_KINDS:
            raise ValueError(f"kind must be one of {SOURCE_KINDS}, got {self.kind!r}")
        if self.mode not in SS_MODES:
            raise ValueError(f"mode must be one of {SS_MODES}, got {self.mode!r}")
        for name in ("ss_max_side", "max_boxes", "shard_size", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_boxes > schema.MAX_BOXES:
            raise ValueError(f"max_boxes must be at most {schema.MAX_BOXES} (readers skip samples with more)")
        if not 0 < self.iou <= 1:
            raise ValueError(f"iou must be in (0, 1], got {self.iou}")
        if self.max_aspect < 1:
            raise ValueError(f"max_aspect must be >= 1, got {self.max_aspect}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.fallback_min_side is not None and self.fallback_min_side < 1:
            raise ValueError(f"fallback_min_side must be positive or None, got {self.fallback_min_side}")
        if self.fallback_min_side is not None and self.fallback_min_side >= self.min_side:
            # one spelling per content: a second tier that cannot add a box is no second tier (same fingerprint)
            object.__setattr__(self, "fallback_min_side", None)
        if self.max_side is not None and self.max_side < 16:
            raise ValueError(f"max_side must be >= 16, got {self.max_side}")

    @property
    def shard_prefix(self) -> str:
        return self.prefix or self.kind

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrepConfig:
        """The settings of a recorded config (stats, manifest, run config). A setting added later is absent from
        older records and takes the value that reproduces them, not today's default (``_BEFORE_RECORDED``)."""
        names = {f.name for f in fields(cls)}
        return cls(**{**_BEFORE_RECORDED, **{k: v for k, v in d.items() if k in names}})

    def fingerprint(self) -> str:
        """Digest of the settings that decide shard content; ``root`` is left out so a moved dataset can resume."""
        d = self.to_dict()
        d.pop("root")
        return schema.fingerprint(d)

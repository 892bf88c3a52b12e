"""Typed config of ``pipelines/evaluate.py`` and ``pipelines/export.py`` (keys in DESIGN.md are a contract)."""

from __future__ import annotations

from dataclasses import dataclass

from deo.bands import parse_band_order
from deo.config import option

BASELINES: tuple[str, ...] = ("random", "pixels", "teacher")
BRANCHES: tuple[str, ...] = ("ms", "optical")


@dataclass
class EvalConfig:
    """pipelines/evaluate.py: kNN, linear and few-shot probes of a frozen backbone, and pca.png."""

    checkpoint: str = option("runs/default", help="run folder (latest checkpoint), checkpoint_* folder or .safetensors")
    dataset: str = option("", help="labelled set split into train/test (seeded, stratified): class folders or .csv/.parquet list",
                          replaces=("train_set", "test_set"))
    # train_set / test_set on the command line take the place of the config file's dataset (the default
    # config names the committed samples, so the documented train_set= test_set= command would clash)
    train_set: str = option("", help="labelled training set (with test_set, instead of dataset)", replaces=("dataset",))
    test_set: str = option("", help="labelled test set (with train_set)", replaces=("dataset",))
    s2_band_order: list[str] = option(
        ["eurosat"], help="band order of stacked S2 files: a preset (eurosat, s2_13, s2_l2a_12, deo), a list "
        "[B01,...,B8A] or a comma string B01,...,B8A",
    )
    out: str = option("", help="output folder (empty: <run folder>/eval/<dataset name>)")
    baselines: list[str] = option([], help="extra rows: random (random-init student), pixels (per-band mean/std), teacher (optical teacher)")
    branches: list[str] = option([], help="inputs to probe: ms, optical (empty: ms and optical (S2 true colour) on MS sets, optical on RGB sets)")
    test_fraction: float = option(0.2, help="test share of `dataset` per class")
    seed: int = option(0, help="seed of the split, l2 selection, few-shot draws and random-init baseline")
    image_size: int = option(0, help="resize samples to this side (0: native; needed when sizes differ)")
    batch_size: int = option(64, help="feature extraction batch")
    device: str = option("auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    knn_ks: list[int] = option([5, 10, 20, 50, 100, 200], help="kNN k values (those not below the train size are dropped)")
    knn_temperature: float = option(0.07, help="kNN vote temperature T (weights exp(sim / T))")
    l2_grid: list[float] = option([1e-5, 1e-4, 1e-3, 1e-2, 1e-1], help="linear-probe l2 candidates (chosen on a validation split)")
    few_shot: list[int] = option([1, 5, 10], help="few-shot probes: samples per class (empty: off)")
    few_shot_trials: int = option(5, help="seeded draws per few-shot size")
    pca_tiles: int = option(4, help="tiles in pca.png (0: no figure)")
    pca_size: int = option(128, help="side the PCA tiles are resized to before the backbone")
    pca_stage: int = option(2, help="0-based Swin stage whose patch features pca.png shows")
    quiet: bool = option(False, help="no progress lines")

    def __post_init__(self) -> None:
        parse_band_order(self.s2_band_order)  # raises ValueError naming an unknown preset or band
        bad = [b for b in self.baselines if b not in BASELINES]
        if bad:
            raise ValueError(f"baselines must be among {BASELINES}, got {bad}")
        bad = [b for b in self.branches if b not in BRANCHES]
        if bad:
            raise ValueError(f"branches must be among {BRANCHES}, got {bad}")
        if bool(self.train_set) != bool(self.test_set):
            raise ValueError("train_set and test_set go together")
        if self.dataset and self.train_set:
            raise ValueError("give either dataset or train_set + test_set, not both")
        if not 0 < self.test_fraction < 1:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.knn_temperature <= 0:
            raise ValueError(f"knn_temperature must be > 0, got {self.knn_temperature}")
        for k in ("batch_size", "few_shot_trials", "pca_size"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if not self.l2_grid or min(self.l2_grid) <= 0:
            raise ValueError(f"l2_grid must hold values > 0, got {self.l2_grid}")


@dataclass
class ExportConfig:
    """pipelines/export.py: write backbone.safetensors from a run."""

    checkpoint: str = option("runs/default", help="run folder (latest checkpoint), checkpoint_* folder or .safetensors")
    out: str = option("", help="destination .safetensors path or URI (empty: <run folder>/backbone.safetensors)")
    summary: str = option("", help="where to write the summary JSON (empty: beside the export, "
                          "backbone.safetensors -> backbone.summary.json)")

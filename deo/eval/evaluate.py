"""The evaluation behind ``pipelines/evaluate.py``: probes of the frozen backbone and its baselines.

For each branch (``ms`` on multispectral sets; ``optical`` on RGB sets, or on the S2 true colour of
multispectral sets) and each method (the trained backbone, and on request a random-init student of
the same architecture, raw per-band mean/std pixel features, the optical teacher's [cls]), features
of the train and test parts are probed by weighted kNN, a linear probe and few-shot linear probes.
Every number, the dataset, the checkpoint's weight hash and the config go to ``report.json``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any

import numpy as np
import torch

from deo.bands import band_order_warning, true_colour_max
from deo.eval.checkpoint import build_student_from_config, load_checkpoint_student
from deo.eval.config import EvalConfig
from deo.eval.datasets import (
    LabelledSet,
    detect_modality,
    load_images,
    load_labelled_set,
    s2_true_colour,
)
from deo.eval.features import (
    Progress,
    extract_features,
    normalise,
    pixel_features,
    student_features,
)
from deo.eval.knn import knn_evaluate
from deo.eval.linear_probe import few_shot_evaluate, linear_probe_evaluate
from deo.eval.pca_image import save_pca_figure
from deo.eval.report import REPORT_VERSION, write_report
from deo.eval.splits import stratified_split
from deo.io import storage

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _align(train: LabelledSet, test: LabelledSet) -> tuple[LabelledSet, LabelledSet]:
    """Re-index both sets' labels on the union of their class names."""
    if train.multi_label != test.multi_label:
        raise ValueError(f"{train.source} and {test.source}: one is multi-label, the other not")
    classes = sorted(set(train.classes) | set(test.classes))

    def remap(ds: LabelledSet) -> LabelledSet:
        pos = np.array([classes.index(c) for c in ds.classes], dtype=np.int64)
        if ds.multi_label:
            labels = np.zeros((len(ds), len(classes)), dtype=np.int64)
            labels[:, pos] = ds.labels
        else:
            labels = pos[ds.labels]
        return LabelledSet(ds.source, ds.items, labels, classes)

    return remap(train), remap(test)


def load_sets(cfg: EvalConfig) -> tuple[LabelledSet, LabelledSet, dict[str, Any]]:
    """Train and test sets from ``dataset`` (seeded stratified split) or ``train_set`` + ``test_set``."""
    if cfg.dataset:
        full = load_labelled_set(cfg.dataset)
        tr, te = stratified_split(full.labels, cfg.test_fraction, cfg.seed)
        info = {"source": cfg.dataset, "split": {"test_fraction": cfg.test_fraction, "seed": cfg.seed}}
        return full.subset(tr), full.subset(te), info
    if cfg.train_set:
        train, test = _align(load_labelled_set(cfg.train_set), load_labelled_set(cfg.test_set))
        return train, test, {"train_set": cfg.train_set, "test_set": cfg.test_set}
    raise ValueError("no labelled data: set dataset=PATH, or train_set=PATH and test_set=PATH")


def probe(cfg: EvalConfig, ftr: torch.Tensor, ytr: torch.Tensor, fte: torch.Tensor, yte: torch.Tensor,
          num_classes: int) -> dict[str, Any]:
    """kNN, linear and (single-label) few-shot probes of one feature set."""
    knn = knn_evaluate(ftr, ytr, fte, yte, num_classes, cfg.knn_ks, cfg.knn_temperature)
    linear = linear_probe_evaluate(ftr, ytr, fte, yte, num_classes, cfg.l2_grid, cfg.seed)
    out: dict[str, Any] = {"feature_dim": int(ftr.shape[1]), "knn": knn, "linear": linear}
    if cfg.few_shot and ytr.ndim == 1:
        out["few_shot"] = few_shot_evaluate(
            ftr, ytr, fte, yte, num_classes, linear["l2"], cfg.few_shot, cfg.few_shot_trials, cfg.seed
        )
    return out


def _teacher(run_cfg: dict[str, Any], meta: dict[str, Any], device: torch.device) -> torch.nn.Module:
    from deo.models.dinov3 import build_teacher
    from deo.train.config import TeacherConfig

    # the baseline reads the final [cls] only: the teacher's own blocks, whatever the run distilled
    tcfg = dataclasses.replace(TeacherConfig(**run_cfg["teacher"]), layers=[])
    random_state = meta.get("optical_teacher")
    if not tcfg.weights and random_state is None:
        raise ValueError(
            "baseline 'teacher' needs the run's teacher.weights, or a checkpoint holding its random teacher "
            "(exports do not carry the teacher)"
        )
    if random_state is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the random-init warning: the weights come next
            teacher = build_teacher(dataclasses.replace(tcfg, weights="", dtype="fp32"), "cpu")
        teacher.load_state_dict(random_state)
        return teacher.to(device)
    return build_teacher(dataclasses.replace(tcfg, dtype="fp32"), device)


def teacher_features(teacher: torch.nn.Module, rgb: torch.Tensor, batch_size: int, device: torch.device,
                     progress: Any = None) -> torch.Tensor:
    """[cls] of the optical teacher for (N, 3, H, W) RGB in [0, 255] (ImageNet normalisation)."""
    if rgb.shape[-1] % 16 or rgb.shape[-2] % 16:
        raise ValueError(f"the teacher needs sides that are multiples of 16, got {tuple(rgb.shape[-2:])}; set image_size")
    stats = {"mean": [255 * m for m in IMAGENET_MEAN], "std": [255 * s for s in IMAGENET_STD]}
    return extract_features(lambda x: teacher(normalise(x, stats))[0], rgb, batch_size, device, progress)


def _pca_figure(cfg: EvalConfig, student: torch.nn.Module, stats: dict[str, Any], test: LabelledSet,
                test_x: torch.Tensor, out: str, device: torch.device) -> str:
    labels = test.labels if not test.multi_label else test.labels.argmax(1)
    picks: list[int] = []
    for c in np.unique(labels):
        picks.append(int(np.nonzero(labels == c)[0][0]))
    idx = picks[: cfg.pca_tiles]
    ms = torch.nn.functional.interpolate(test_x[idx], size=(cfg.pca_size,) * 2, mode="bilinear",
                                         antialias=True, align_corners=False)
    rgb = s2_true_colour(ms, true_colour_max(stats))

    def patches(x: torch.Tensor, modality: str) -> torch.Tensor:
        fn = lambda b: student.forward_intermediates(  # noqa: E731
            normalise(b, stats[modality]), modality, indices=[cfg.pca_stage], intermediates_only=True
        )[0].permute(0, 2, 3, 1)
        return extract_features(fn, x, cfg.batch_size, device)

    uri = storage.join(out, "pca.png")
    save_pca_figure(uri, rgb, patches(ms, "ms"), rgb, patches(rgb, "optical"))
    return uri


def default_out(checkpoint: str, cfg: EvalConfig) -> str:
    """``<run folder>/eval/<dataset name>``: evaluations on different sets keep their own reports."""
    labelled = (cfg.dataset or cfg.train_set).rstrip("/")
    name = labelled.rsplit("/", 1)[-1].rsplit(".", 1)[0] or "dataset"
    return storage.join(checkpoint.rsplit("/", 1)[0] if "/" in checkpoint else ".", "eval", name)


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Run every probe and write ``report.json`` (and ``pca.png``) into ``cfg.out``.

    Returns:
        The report dict (also written as JSON).

    Raises:
        ValueError: bad data, bands, or a baseline that cannot run; FileNotFoundError: missing inputs.
    """
    started = time.perf_counter()
    device = resolve_device(cfg.device)
    student, run_cfg, meta = load_checkpoint_student(cfg.checkpoint)
    student = student.to(device)
    ckpt = meta["checkpoint"]
    out = cfg.out or default_out(ckpt, cfg)
    train, test, source = load_sets(cfg)
    data_mod = detect_modality(train.items[0])
    read = lambda ds, part: load_images(  # noqa: E731
        ds, data_mod, cfg.s2_band_order, cfg.image_size, Progress(f"read {part}", quiet=cfg.quiet)
    )
    train_x, test_x = read(train, "train"), read(test, "test")
    order_warning = None
    if data_mod == "ms":  # stacks carry no band names: a wrong preset reads plausible-looking bands
        order_warning = band_order_warning(train_x.mean(dim=(0, 2, 3)).tolist(),
                                           f"s2_band_order={','.join(cfg.s2_band_order)}")
        if order_warning:
            warnings.warn(order_warning, stacklevel=2)
    branches = list(cfg.branches) or (["ms", "optical"] if data_mod == "ms" else ["optical"])
    if "ms" in branches and data_mod != "ms":
        raise ValueError(f"branch 'ms' needs a multispectral set; {train.items[0]} looks like RGB")
    ytr, yte = torch.from_numpy(train.labels), torch.from_numpy(test.labels)
    n_cls = len(train.classes)

    models: list[tuple[str, torch.nn.Module]] = [("backbone", student)]
    if "random" in cfg.baselines:
        torch.manual_seed(cfg.seed)
        models.append(("random_init", build_student_from_config(run_cfg).eval().to(device)))
    results: dict[str, Any] = {}
    stretch = true_colour_max(meta["stats"])  # the S2 true colour as the run's shards made it
    for branch in branches:
        if branch not in meta["stats"]:
            raise ValueError(f"the checkpoint has no '{branch}' normalisation stats (has {sorted(meta['stats'])})")
        stats = meta["stats"][branch]
        xtr = train_x if branch == data_mod else s2_true_colour(train_x, stretch)
        xte = test_x if branch == data_mod else s2_true_colour(test_x, stretch)
        for name, model in models:
            feats = [student_features(model, x, branch, stats, cfg.batch_size, device,
                                      progress=Progress(f"{name}/{branch} {part}", quiet=cfg.quiet))
                     for x, part in ((xtr, "train"), (xte, "test"))]
            results[f"{name}/{branch}"] = probe(cfg, feats[0], ytr, feats[1], yte, n_cls)
        if "pixels" in cfg.baselines:
            results[f"pixels/{branch}"] = probe(cfg, pixel_features(xtr, stats), ytr, pixel_features(xte, stats), yte, n_cls)
        if "teacher" in cfg.baselines and branch == "optical":
            teacher = _teacher(run_cfg, meta, device)
            ftr = teacher_features(teacher, xtr, cfg.batch_size, device, Progress("teacher train", quiet=cfg.quiet))
            fte = teacher_features(teacher, xte, cfg.batch_size, device, Progress("teacher test", quiet=cfg.quiet))
            results["teacher/optical"] = probe(cfg, ftr, ytr, fte, yte, n_cls)

    pca: str | None = None
    if cfg.pca_tiles and data_mod == "ms" and "optical" in meta["stats"]:
        pca = _pca_figure(cfg, student, meta["stats"], test, test_x, out, device)
    import deo

    report = {
        "report_version": REPORT_VERSION,
        "deo_version": deo.__version__,
        "checkpoint": {"uri": cfg.checkpoint, "resolved": ckpt, "step": meta["step"],
                       "weights_sha256": meta["weights_sha256"], "architecture": run_cfg["model"]["student"]},
        "dataset": {**source, "modality": data_mod, "s2_band_order": cfg.s2_band_order,
                    "image_size": cfg.image_size or int(train_x.shape[-1]), "multi_label": train.multi_label,
                    "classes": train.classes, "n_train": len(train), "n_test": len(test),
                    "train_counts": train.counts(), "test_counts": test.counts(),
                    "test_items": [i.rsplit("/", 1)[-1] for i in test.items],
                    "warnings": [order_warning] if order_warning else []},
        "config": dataclasses.asdict(cfg),
        "results": results,
        "pca_png": pca,
        "device": str(device),
        "seconds": round(time.perf_counter() - started, 2),
        "report_json": storage.join(out, "report.json"),
    }
    write_report(out, report)
    return report

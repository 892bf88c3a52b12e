"""Typed config of ``pipelines/pretrain.py`` (keys listed in DESIGN.md are a contract)."""

from __future__ import annotations

from dataclasses import dataclass

from deo.bands import parse_band_order
from deo.config import nested, option

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
STRATEGIES = ("ddp", "fsdp")


@dataclass
class RunConfig:
    """Where the run folder lives and what it records."""

    storage: str = option("runs", help="folder or URI (s3://, gs://) holding run folders")
    name: str = option("default", help="run name; rerunning the same name resumes it")
    checkpoint_every: int = option(50, help="save a Ray Train checkpoint every N steps (and at the end)")
    keep_checkpoints: int = option(2, help="keep the last K checkpoints")
    log_every: int = option(10, help="print a progress line and append metrics every N steps")
    report_every: int = option(50, help="call ray.train.report every N steps (each costs ~2 s)")
    tensorboard: bool = option(True, help="write TensorBoard event files into the run folder")
    mlflow_uri: str = option("", help="MLflow tracking URI (empty: off)")
    export: bool = option(True, help="export backbone.safetensors at the end")

    def __post_init__(self) -> None:
        for k in ("checkpoint_every", "keep_checkpoints", "log_every", "report_every"):
            if getattr(self, k) < 1:
                raise ValueError(f"run.{k} must be >= 1, got {getattr(self, k)}")
        if not self.name or "/" in self.name:
            raise ValueError(f"run.name must be a non-empty name without '/', got {self.name!r}")


@dataclass
class TrainConfig:
    """Optimisation: steps, batch, schedules, precision."""

    max_steps: int = option(300, help="optimizer steps in total")
    batch_size: int = option(16, help="GLOBAL batch (samples per step over all workers)")
    lr: float = option(5e-4, help="peak AdamW learning rate (per-iteration cosine after warmup); see lr_reference_batch")
    lr_reference_batch: int = option(
        0, help="0: train.lr is the peak rate. N > 0: train.lr is given for a global batch of N, and the peak is "
        "lr x batch_size / N (the linear scaling rule; DINO and the public DEO code use 256)"
    )
    min_lr: float = option(1e-6, help="final learning rate")
    warmup_steps: int = option(20, help="linear LR warmup steps")
    weight_decay: float = option(0.04, help="initial weight decay (cosine to weight_decay_end)")
    weight_decay_end: float = option(0.4, help="final weight decay (0.4: DINO and the public DEO code)")
    ema_momentum: float = option(0.996, help="initial EMA teacher momentum, cosine to ema_momentum_end "
                                 "(0.996: DINO and the public DEO code)")
    ema_momentum_end: float = option(1.0, help="final EMA teacher momentum")
    clip_grad: float = option(3.0, help="total-norm gradient clipping (0: off)")
    grad_accum: int = option(1, help="gradient accumulation micro-steps per optimizer step")
    activation_checkpointing: bool = option(False, help="recompute Swin blocks in backward (memory mode)")
    precision: str = option("auto", help="auto (bf16 on GPU, fp32 on CPU), fp32, bf16 or fp16")
    compile: bool = option(
        False, help="torch.compile block by block: Swin blocks and patch mergings, DINOv3 blocks (GPU)"
    )
    compile_mode: str = option(
        "default",
        help="torch.compile mode of train.compile: default, reduce-overhead (CUDA graphs: fewer kernel "
        "launches from the host), max-autotune-no-cudagraphs or max-autotune (slower to compile)",
    )
    cuda_graph: bool = option(
        False,
        help="record the whole step (augmentation, forward, backward, clipping, AdamW, EMA) as one CUDA "
        "graph after 3 eager steps and replay it: no per-kernel launch cost on the host (one GPU; "
        "grad_accum 1, bf16 or fp32, no activation checkpointing; combines with train.compile in its "
        "default mode)",
    )
    overlap_teachers: bool = option(
        False,
        help="run the frozen teachers (EMA, DINOv3) on a second CUDA stream, beside the student's forward "
        "(same results, more memory; GPU only; not with scaling.strategy=fsdp over several workers or "
        "train.compile_mode=reduce-overhead)",
    )
    compile_cache: str = option(
        "",
        help="folder (local or s3://) of the compiled code saved by train.compile, loaded at start so "
        "a resume, a restarted worker or another trial skips compiling ('': <run folder>/compile_cache)",
    )
    shuffle_buffer: int = option(
        256,
        help="rows in each worker's shuffle window; its row groups stay decoded in RAM until read "
        "(a 256 px row is 1.5 MB: 4096 rows hold about 6 GB per worker)",
    )
    loader_threads: int = option(
        0, help="threads decoding shard row groups per worker (0: half of scaling.cpus_per_worker, 1 to 8)"
    )
    data_order: str = option(
        "lanes",
        help="lanes: each row group read by one worker (for object storage at scale); global: every "
        "global batch identical for any number of workers (exact comparisons across world sizes)",
    )
    seed: int = option(0, help="seed of init, augmentation and shuffling")

    @property
    def compile_cuda_graphs(self) -> bool:
        """Whether ``compile_mode`` records CUDA graphs per compiled region (then every step starts with
        ``torch.compiler.cudagraph_mark_step_begin()``: the previous step's graph outputs may be reused).
        ``cuda_graph`` is the other, whole-step form."""
        return self.compile and self.compile_mode in CUDA_GRAPH_MODES

    @property
    def peak_lr(self) -> float:
        """The peak learning rate: ``lr``, scaled by ``batch_size / lr_reference_batch`` when that is set."""
        return self.lr * self.batch_size / self.lr_reference_batch if self.lr_reference_batch else self.lr

    def __post_init__(self) -> None:
        if self.data_order not in ("lanes", "global"):
            raise ValueError(f"train.data_order must be lanes or global, got {self.data_order!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"train.compile_mode must be one of {COMPILE_MODES}, got {self.compile_mode!r}")
        if self.loader_threads < 0:
            raise ValueError(f"train.loader_threads must be >= 0 (0: automatic), got {self.loader_threads}")
        for k in ("max_steps", "batch_size", "grad_accum"):
            if getattr(self, k) < 1:
                raise ValueError(f"train.{k} must be >= 1, got {getattr(self, k)}")
        if self.lr_reference_batch < 0:
            raise ValueError(f"train.lr_reference_batch must be >= 0 (0: train.lr is the peak rate), got "
                             f"{self.lr_reference_batch}")
        if self.cuda_graph:
            why = {
                "train.grad_accum > 1": self.grad_accum > 1,
                "train.precision=fp16 (the grad scaler reads found-inf on the host)": self.precision == "fp16",
                "train.activation_checkpointing (recomputation saves and restores the RNG state on the "
                "host)": self.activation_checkpointing,
                f"train.compile_mode={self.compile_mode} (CUDA graphs inside a CUDA graph)": self.compile_cuda_graphs,
            }
            bad = [k for k, v in why.items() if v]
            if bad:
                raise ValueError(f"train.cuda_graph=true does not combine with {', '.join(bad)}")
        if self.overlap_teachers and self.compile_cuda_graphs:
            # the per-region graphs share one memory pool that assumes they replay one after another
            raise ValueError(f"train.overlap_teachers=true does not combine with train.compile_mode="
                             f"{self.compile_mode} (its per-region CUDA graphs replay in one pool, in order): "
                             "use compile_mode=default, with train.cuda_graph for the whole step")
        if self.compile_cuda_graphs and self.grad_accum > 1:
            # a second micro-step replays the graphs whose memory holds the first one's gradients
            raise ValueError(
                f"train.compile_mode={self.compile_mode} (CUDA graphs) needs train.grad_accum=1, got {self.grad_accum}"
            )
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"train.batch_size={self.batch_size} is not divisible by train.grad_accum={self.grad_accum}"
            )


@dataclass
class ScalingConfig:
    """Ray Train workers."""

    num_workers: int = option(1, help="training workers (one per GPU when use_gpu)")
    use_gpu: bool = option(False, help="train on GPUs (NCCL) instead of CPUs (gloo)")
    cpus_per_worker: float = option(1.0, help="CPUs reserved per worker (0.5 lets 2 workers share 2 CPUs)")
    gpus_per_worker: float = option(1.0, help="GPUs per worker when use_gpu")
    worker_resources: dict[str, float] = option(
        {}, help="extra custom resources per worker, e.g. {deo_train: 1} so training lands on the GPU pool"
    )
    max_failures: int = option(3, help="restarts of the worker group after a lost worker or node")
    strategy: str = option(
        "ddp",
        help="ddp: replicate the student on every worker; fsdp: shard its weights, gradients and AdamW "
        "state over the workers (FSDP2; memory mode for big students, see docs/training.md)",
    )
    address: str = option("", help="Ray address (empty: RAY_ADDRESS, as in a job's driver, else the cluster `ray start` left running here, else a new local Ray)")

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"scaling.num_workers must be >= 1, got {self.num_workers}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"scaling.strategy must be one of {STRATEGIES}, got {self.strategy!r}")


@dataclass
class ModelConfig:
    """The Swin student and its heads."""

    student: str = option(
        "swin_deo_tiny",
        help="swin_deo_tiny (about 3M params, tests/default), or a timm Swin name such as "
        "swin_tiny_patch4_window7_224 (reference) or swin_base_patch4_window7_224 (paper)",
    )
    rgb_weights: str = option("", help="ImageNet-style timm Swin weights (path/URI) for the RGB patch embed and stages")
    ms_embed_init: str = option(
        "spectral", help="MS patch-embed init: spectral (with pretrained RGB weights, from model.rgb_weights or a timm "
        "model.init_from: copy the RGB kernels to the nearest bands, their mean elsewhere; random otherwise) or random"
    )
    head_hidden: int = option(2048, help="head_ms MLP hidden width")
    head_out: int = option(256, help="head_ms output width d")
    head_layers: int = option(3, help="head_ms MLP layers")
    drop_path: float = option(0.1, help="stochastic depth rate of the student")
    init_from: str = option("", help="continual pretraining: start from this backbone (exported deo or timm) and keep it frozen as domain teacher")
    sar: bool = option(False, help="add a 2-channel SAR patch embedding (needs a `sar` column)")

    def __post_init__(self) -> None:
        if self.init_from and self.rgb_weights:
            raise ValueError(
                f"set either model.init_from ({self.init_from!r}) or model.rgb_weights "
                f"({self.rgb_weights!r}), not both"
            )


@dataclass
class TeacherConfig:
    """The frozen DINOv3 optical teacher."""

    name: str = option(
        "vit_deo_tiny_dinov3",
        help="vit_deo_tiny_dinov3 (random tiny DINOv3-shaped ViT) or a timm vit_*_patch16_dinov3* name",
    )
    weights: str = option("", help="DINOv3 weights: path or s3:// URI (safetensors, timm or Meta .pth); empty: random init with a warning")
    layers: list[int] = option(
        [], help="0-based [mid, final] blocks for [p]_mid and [p]_F, final the last block; empty: the public "
        "DEO code's choice for the teacher's depth (ViT-S/B: [8, 11], ViT-L: [15, 23])",
    )
    dtype: str = option("auto", help="teacher compute dtype: auto (bf16 on GPU), fp32, bf16")


@dataclass
class ViewConfig:
    """Multi-crop views (same geometry for MS and optical)."""

    global_size: int = option(64, help="global view side in MS pixels (paper: 224)")
    local_size: int = option(32, help="local view side (paper: 96)")
    optical_global_size: int = option(64, help="optical global view side fed to the teacher (paper: 224)")
    n_global: int = option(2, help="global views per sample")
    n_local: int = option(4, help="local views per sample (paper: 10)")
    global_scale: list[float] = option([0.4, 1.0], help="global crop area range")
    local_scale: list[float] = option([0.05, 0.4], help="local crop area range")
    uniform_local: bool = option(False, help="SatDINO uniform view sampling: one local view per segment of local_scale")

    def __post_init__(self) -> None:
        if self.n_global != 2:
            raise ValueError(f"views.n_global must be 2 (pairs of global views), got {self.n_global}")
        for k in ("global_scale", "local_scale"):
            lo, hi = getattr(self, k)
            if not 0 < lo < hi <= 1:
                raise ValueError(f"views.{k} must be [lo, hi] with 0 < lo < hi <= 1, got {[lo, hi]}")


@dataclass
class LossConfig:
    """Weights of the objective L = -C - gamma R - (a1 cls + a2 pF + a3 pmid) + lambda MSAD + w GSD."""

    alpha1: float = option(1.0, help="weight of the optical [cls] cosine")
    alpha2: float = option(0.5, help="weight of the optical final-patch cosine")
    alpha3: float = option(0.5, help="weight of the optical intermediate-patch cosine")
    gamma: float = option(1.0, help="weight of the coding rate R (expansion)")
    eps: float = option(0.05, help="coding-rate epsilon (plays the role of eps^2)")
    msad_lambda: float = option(0.0, help="weight of X-STARS MSAD (X-STARS default 0.1; 0: off)")
    msad_tau: float = option(0.1, help="MSAD temperature")
    msad_smoothing: float = option(0.3, help="MSAD label smoothing alpha")
    gsd_weight: float = option(0.0, help="weight of SatDINO log-GSD regression (0: off)")

    def __post_init__(self) -> None:
        for k in ("alpha1", "alpha2", "alpha3", "gamma", "msad_lambda", "gsd_weight"):
            if getattr(self, k) < 0:
                raise ValueError(f"loss.{k} must be >= 0, got {getattr(self, k)}")
        if self.eps <= 0:
            raise ValueError(f"loss.eps must be > 0, got {self.eps}")
        if self.msad_tau <= 0:
            raise ValueError(f"loss.msad_tau must be > 0, got {self.msad_tau}")
        if not 0 <= self.msad_smoothing < 1:
            raise ValueError(f"loss.msad_smoothing must be in [0, 1), got {self.msad_smoothing}")

    @property
    def needs_teacher(self) -> bool:
        """Whether any optical distillation term is on, i.e. the frozen DINOv3 teacher is built."""
        return self.alpha1 > 0 or self.alpha2 > 0 or self.alpha3 > 0


@dataclass
class ProbeConfig:
    """In-loop kNN probe (the sweep's objective ``probe/knn_avg``)."""

    every: int = option(0, help="run the kNN probe every N steps (0: off)")
    dataset: str = option("", help="labelled folder of class subfolders (EuroSAT layout) or a Parquet/CSV list")
    s2_band_order: list[str] = option(
        ["eurosat"], help="band order of the probe set's stacked files: a preset, a list [B01,...,B8A] or a "
        "comma string",
    )
    max_samples: int = option(512, help="cap on probe samples")

    def __post_init__(self) -> None:
        parse_band_order(self.s2_band_order)  # raises ValueError naming an unknown preset or band


@dataclass
class PretrainConfig:
    """pipelines/pretrain.py: DEO pretraining (with X-STARS / SatDINO options) on Ray Train."""

    data: str = option("runs/shards/samples", help="shard dataset (folder or URI with manifest.json)")
    run: RunConfig = nested(RunConfig)
    train: TrainConfig = nested(TrainConfig)
    scaling: ScalingConfig = nested(ScalingConfig)
    model: ModelConfig = nested(ModelConfig)
    teacher: TeacherConfig = nested(TeacherConfig)
    views: ViewConfig = nested(ViewConfig)
    loss: LossConfig = nested(LossConfig)
    probe: ProbeConfig = nested(ProbeConfig)

    def __post_init__(self) -> None:
        if self.train.overlap_teachers and self.scaling.strategy == "fsdp" and self.scaling.num_workers > 1:
            # the sharded EMA teacher all-gathers its weights on FSDP's streams, ordered by the stream it runs on
            raise ValueError("train.overlap_teachers=true does not combine with scaling.strategy=fsdp over "
                             f"{self.scaling.num_workers} workers: use scaling.strategy=ddp or "
                             "train.overlap_teachers=false")
        if self.train.batch_size % (self.scaling.num_workers * self.train.grad_accum):
            raise ValueError(
                f"train.batch_size={self.train.batch_size} must be divisible by scaling.num_workers="
                f"{self.scaling.num_workers} x train.grad_accum={self.train.grad_accum}"
            )

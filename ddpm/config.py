"""The typed configuration: the single source of truth for every run.

`params.yaml` is validated into `Config`. Every section forbids unknown keys (a typo is an error),
every choice is a `Literal`, every number has a range, and the checks that span sections (image
size vs. U-Net depth, attention resolutions that exist) live on `TrainingConfig`. The training
sections are stored as plain data inside each checkpoint (`Config.training_dict`) and rebuilt from
it as a `TrainingConfig`. The defaults here are params.yaml's values (a test keeps the two equal).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Self

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from ddpm.errors import UserError

Schedule = Literal["linear", "cosine"]
Prediction = Literal["eps", "x0", "v"]
Variance = Literal["fixed_small", "fixed_large"]
SamplerName = Literal["ddpm", "ddim", "dpm_solver"]
Spacing = Literal["time", "logsnr"]
# how DPM-Solver ends: "clean" on the model's x0 prediction (sigma = 0, diffusers' final_sigmas_type="zero"),
# "noisy" at t = 0 with the residual noise sqrt(1 - alpha_bar_0) of x_0
FinalStep = Literal["clean", "noisy"]
LossWeighting = Literal["uniform", "min_snr"]
Precision = Literal["fp32", "bf16", "fp16"]
DeviceName = Literal["auto", "cpu", "cuda"]
CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
DatasetName = Literal["cifar10", "folder", "shapes"]


def _check_interval(interval: tuple[float, float]) -> tuple[float, float]:
    lo, hi = interval
    if not 0.0 <= lo <= hi:  # NaN fails too
        raise ValueError("a guidance interval [lo, hi] needs 0 <= lo <= hi (in EDM sigma)")
    return interval


# (lo, hi] in EDM's noise level sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) (finite; null: every step)
GuidanceInterval = Annotated[tuple[float, float], AfterValidator(_check_interval)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are immutable, floats are finite
    (`.inf` / `.nan` in YAML are refused everywhere)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class DataConfig(Section):
    """Where the images come from and how they are prepared."""

    dataset: DatasetName = "cifar10"
    raw_dir: str = "data/raw"  # cifar10: torchvision's download / offline archive location
    folder: str | None = None  # folder: an ImageFolder-style directory (one subfolder per class)
    image_size: int = Field(32, ge=8, le=512)
    hflip: bool = True  # random horizontal flips during training
    holdout_fraction: float = Field(0.1, gt=0.0, lt=1.0)  # folder/shapes; cifar10 uses its test batch
    shapes_per_class: int = Field(1000, ge=10)  # shapes: images generated per class

    @model_validator(mode="after")
    def _folder_needs_path(self) -> DataConfig:
        if self.dataset == "folder" and not self.folder:
            raise ValueError("data.dataset is 'folder' but data.folder is not set: give the image directory")
        return self


class ModelConfig(Section):
    """The conditional U-Net. Defaults are the DDPM CIFAR-10 network (35.7M parameters)."""

    channels: int = Field(128, ge=8)
    channel_mult: tuple[int, ...] = Field((1, 2, 2, 2), min_length=1)
    num_res_blocks: int = Field(2, ge=1)
    attention_resolutions: tuple[int, ...] = (16,)
    num_heads: int = Field(1, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    num_groups: int = Field(32, ge=1)  # GroupNorm groups; must divide every channel count
    num_classes: int = Field(10, ge=0)  # 0: unconditional; else num_classes + 1 embedding rows (last = null)

    @model_validator(mode="after")
    def _groups_divide_channels(self) -> ModelConfig:
        for mult in (1, *self.channel_mult):
            ch = self.channels * mult
            if ch % self.num_groups:
                raise ValueError(f"model.num_groups={self.num_groups} does not divide {ch} channels (channels="
                                 f"{self.channels} x mult {mult}); choose channels divisible by num_groups")
            if ch % self.num_heads:
                raise ValueError(f"model.num_heads={self.num_heads} does not divide {ch} channels")
        if any(m < 1 for m in self.channel_mult):
            raise ValueError("model.channel_mult entries must be >= 1")
        return self


class DiffusionConfig(Section):
    """The forward process and how the network's output is read (the schedule name is top-level)."""

    timesteps: int = Field(1000, ge=2, le=100_000)
    beta_start: float = Field(1e-4, gt=0.0, lt=1.0)  # linear schedule
    beta_end: float = Field(0.02, gt=0.0, lt=1.0)  # linear schedule
    cosine_s: float = Field(0.008, ge=0.0, lt=1.0)  # cosine schedule offset s
    max_beta: float = Field(0.999, gt=0.0, lt=1.0)  # cosine schedule clip
    prediction: Prediction = "eps"
    variance: Variance = "fixed_large"  # DDPM sampler variance: beta_t (large) or beta-tilde_t (small)
    clip_x0: bool = True  # clip the predicted x0 to [-1, 1] while sampling

    @model_validator(mode="after")
    def _beta_order(self) -> DiffusionConfig:
        if self.beta_start >= self.beta_end:
            raise ValueError(f"diffusion.beta_start ({self.beta_start}) must be smaller than diffusion.beta_end "
                             f"({self.beta_end})")
        return self


class TrainConfig(Section):
    """Optimisation, precision, logging cadence and fault handling."""

    device: DeviceName = "auto"  # auto: cuda when available, else cpu (the choice is logged)
    batch_size: int = Field(128, ge=1)  # global batch (split across ranks under torchrun)
    steps: int = Field(800_000, ge=1)
    lr: float = Field(2e-4, gt=0.0)
    warmup_steps: int = Field(5000, ge=0)
    weight_decay: float = Field(0.0, ge=0.0)
    grad_clip: float = Field(1.0, ge=0.0)  # 0 disables clipping
    grad_accum: int = Field(1, ge=1)
    ema_decay: float = Field(0.9999, gt=0.0, lt=1.0)
    ema_warmup: bool = True  # decay_n = min(decay, (1 + n) / (10 + n))
    p_uncond: float = Field(0.1, ge=0.0, le=1.0)  # classifier-free guidance: label dropout probability
    # min_snr: Hang et al. 2023, each example's loss weighted by min(SNR(t), gamma) in x0 terms
    loss_weighting: LossWeighting = "uniform"
    min_snr_gamma: float = Field(5.0, gt=0.0)
    precision: Precision = "bf16"  # autocast dtype (fp16 uses a GradScaler and needs CUDA)
    compile: bool = True
    compile_mode: CompileMode = "default"
    # auto: channels_last exactly when compiled (eager, CUDA runs GroupNorm NCHW: transposes around each one)
    channels_last: bool | Literal["auto"] = "auto"
    deterministic: bool = False  # torch deterministic algorithms (GPU: slower)
    data_on_device: bool = True  # keep the uint8 dataset on the training device; else a DataLoader
    num_workers: int = Field(4, ge=0)  # DataLoader workers when data_on_device is false
    sample_every: int = Field(20_000, ge=0)  # progress grids; 0: only the final model's
    # the progress grids' own sampler settings: training must not depend on the sample stage's params
    # (changing sample.guidance_scale re-runs sampling, never the training)
    progress_sampler: SamplerName = "ddim"
    progress_steps: int = Field(50, ge=1)
    progress_spacing: Spacing = "time"
    progress_guidance_scale: float = Field(1.0, ge=0.0)
    progress_per_class: int = Field(8, ge=1)
    # EMA snapshots for the progress stage's quality curve (models/snapshots/, scored after training, so changing
    # the curve's evaluation never retrains): every snapshot_every steps (0: at the progress points, every
    # sample_every steps) and at the end, thinned evenly to at most max_snapshots (0: none; a disk bound)
    snapshot_every: int = Field(0, ge=0)
    max_snapshots: int = Field(16, ge=0)
    checkpoint_every: int = Field(5000, ge=1)
    max_bad_steps: int = Field(10, ge=0)  # consecutive non-finite steps tolerated before stopping
    # how many training processes the stage starts (PyTorch's elastic launcher, ddpm.pipeline.launch): not in
    # `training_dict()` (LAUNCH_KEYS); the world size the workers really train with is in the resume key
    nproc_per_node: int = Field(1, ge=1)  # workers on this node (one per GPU); 1 with nnodes 1: no launcher
    nnodes: int = Field(1, ge=1)  # nodes joining the c10d rendezvous; > 1 needs rdzv_endpoint
    rdzv_endpoint: str | None = Field(None, min_length=1)  # HOST:PORT of the rendezvous; null: 127.0.0.1, a free port
    rdzv_id: str = Field("ddpm", min_length=1)  # the job's name in the rendezvous (the same on every node)

    @model_validator(mode="after")
    def _nodes_need_an_endpoint(self) -> TrainConfig:
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError(f"train.nnodes={self.nnodes} needs train.rdzv_endpoint: HOST:PORT of the rendezvous, "
                             "the same on every node (HOST: the first node's address)")
        return self


# the TrainConfig fields that say how many processes train, not what they train: out of `training_dict()`
# (checkpoints, models/ema.pt, the params part of the resume key); the world size itself joins the resume key
LAUNCH_KEYS = ("nproc_per_node", "nnodes", "rdzv_endpoint", "rdzv_id")


class SampleConfig(Section):
    """How the sample stage generates images from the EMA model."""

    sampler: SamplerName = "ddim"
    steps: int = Field(100, ge=1)
    spacing: Spacing = "time"  # time-uniform or log-SNR-uniform sampling steps
    eta: float = Field(0.0, ge=0.0, le=1.0)  # DDIM: 0 deterministic, 1 DDPM-like noise; above 1 is undefined
    guidance_scale: float = Field(1.0, ge=0.0)  # w in eps = (1+w) eps(x,t,y) - w eps(x,t,null)
    # guidance only where the EDM noise level sigma_t = sqrt((1 - ab_t) / ab_t) lies in (lo, hi]; elsewhere the
    # conditional branch alone (half the cost). None: everywhere. Kynkaanniemi et al. 2024 use (0.28, 5.42]
    guidance_interval: GuidanceInterval | None = None
    final_step: FinalStep = "clean"  # DPM-Solver's last step: "clean" x0 prediction or "noisy" x_0 at t = 0
    num_samples: int = Field(50_000, ge=1)  # the evaluation set: 50k for FID-50k as in the papers
    precision: Precision = "fp32"  # autocast for evaluation sampling (not train.precision: metrics want fp32)
    batch_size: int = Field(1000, ge=1)  # bounds memory independently of num_samples
    grid_per_class: int = Field(10, ge=1)  # columns of samples/grid.png
    denoise_frames: int = Field(8, ge=2)  # columns of samples/denoise.png
    compile: bool = False  # torch.compile the EMA network for sampling (pays off for large sample sets)


class ProgressConfig(Section):
    """The progress stage: how the EMA snapshots of `train.snapshot_every` are scored into the quality curve.

    The same seeds and classes for every snapshot, so the curve measures the model, not the draw.
    """

    num_samples: int = Field(2000, ge=10)  # class-balanced samples per snapshot (FD/precision/recall at this size)
    sampler: SamplerName = "dpm_solver"
    steps: int = Field(25, ge=1)
    spacing: Spacing = "logsnr"
    guidance_scale: float = Field(1.0, ge=0.0)
    precision: Precision = "fp32"
    batch_size: int = Field(1000, ge=1)
    fid: bool = True  # FID at num_samples too, when evaluate.fid made the Inception statistics


class ClassifierConfig(Section):
    """The small ResNet-like classifier used for offline evaluation metrics."""

    width: int = Field(64, ge=8)
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(256, ge=1)
    lr: float = Field(0.1, gt=0.0)
    weight_decay: float = Field(5e-4, ge=0.0)


class EvaluateConfig(Section):
    """Offline class-conditional metrics, standard FID/IS and the guidance sweep."""

    classifier: ClassifierConfig = ClassifierConfig()
    fid: bool = True
    inception_weights: str | None = None  # a local pt_inception-2015-12-05 file; else cache or download
    download_inception: bool = True  # fetch the weights into the torch hub cache when neither is there
    guidance_sweep: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0)
    # sweep every guidance scale on each of these intervals (null entry: everywhere); empty: sample.guidance_interval
    guidance_interval_sweep: tuple[GuidanceInterval | None, ...] = ()
    sweep_samples: int = Field(2000, ge=10)  # samples per sweep point
    pr_k: int = Field(3, ge=1)  # k of the k-NN manifolds for precision/recall

    @model_validator(mode="after")
    def _sweep_non_negative(self) -> EvaluateConfig:
        bad = [w for w in self.guidance_sweep if w < 0]
        if bad:
            raise ValueError(f"evaluate.guidance_sweep holds negative guidance scales {bad}; use values >= 0")
        return self


class TrackingConfig(Section):
    """Where metrics go besides the DVC files."""

    mlflow: bool = True
    tensorboard: bool = True
    experiment: str = "ddpm"
    log_every: int = Field(100, ge=1)  # loss read back from the device and logged every N steps
    system_metrics: bool = True
    register_model: str | None = Field(None, min_length=1)  # Model Registry name for the training's EMA model


def network_resolutions(model: ModelConfig, image_size: int) -> list[int]:
    """The feature-map size of each U-Net level; ValueError when the network cannot fit `image_size` images.

    The one place this rule lives: `TrainingConfig` applies it when params load, the U-Net when it is built.
    """
    levels = len(model.channel_mult)
    factor = 2 ** (levels - 1)
    if image_size % factor:
        raise ValueError(
            f"data.image_size={image_size} is not divisible by 2^(levels-1)={factor} for "
            f"model.channel_mult={list(model.channel_mult)}; use a multiple of {factor} or fewer levels"
        )
    resolutions = [image_size // 2**i for i in range(levels)]
    missing = [r for r in model.attention_resolutions if r not in resolutions]
    if missing:
        raise ValueError(
            f"model.attention_resolutions {missing} do not occur in the network; its resolutions are {resolutions}"
        )
    return resolutions


def _fits_the_schedule(param: str, steps: int, timesteps: int) -> None:
    if steps > timesteps:
        raise ValueError(f"{param}={steps} exceeds diffusion.timesteps={timesteps}; use at most {timesteps}")


class TrainingConfig(Section):
    """The sections that determine the trained weights: what a checkpoint stores and the resume key hashes.

    The sample, evaluate and tracking params can change without touching the training or its outputs,
    so a checkpoint carries exactly this (never sections filled with defaults nobody chose).
    """

    seed: int = Field(0, ge=0)
    schedule: Schedule = "linear"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    diffusion: DiffusionConfig = DiffusionConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _network_fits_images(self) -> TrainingConfig:
        network_resolutions(self.model, self.data.image_size)
        return self

    @model_validator(mode="after")
    def _progress_steps_fit(self) -> TrainingConfig:
        """Checked when the params load, not at the first progress grid hours into training.

        (sample.steps is checked by the sampler: a checkpoint's stored training config carries no sample
        section, so a cross-section check here would judge default sample params against it.)
        """
        _fits_the_schedule("train.progress_steps", self.train.progress_steps, self.diffusion.timesteps)
        every, steps = self.train.snapshot_every, self.train.steps
        if every > steps:
            raise ValueError(f"train.snapshot_every={every} exceeds train.steps={steps}: the curve would have only the "
                             f"final point; use at most {steps}, or 0 for the progress points")
        return self

    def to_dict(self) -> dict[str, Any]:
        """Plain data (lists, not tuples) for checkpoints, YAML and MLflow."""
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> Self:
        """Validate plain data, turning pydantic's errors into one readable UserError."""
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(source, err) from None


# the params that determine the trained weights (the train stage's inputs besides the data)
TRAINING_SECTIONS = tuple(TrainingConfig.model_fields)


class Config(TrainingConfig):
    """The whole of params.yaml. `seed` and `schedule` are top-level for `dvc exp run -S schedule=cosine`."""

    sample: SampleConfig = SampleConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    progress: ProgressConfig = ProgressConfig()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _curve_steps_fit_the_schedule(self) -> Config:
        _fits_the_schedule("progress.steps", self.progress.steps, self.diffusion.timesteps)
        return self

    def training(self) -> TrainingConfig:
        """The training sections alone (`TRAINING_SECTIONS`)."""
        return TrainingConfig(**{k: getattr(self, k) for k in TRAINING_SECTIONS})

    def training_dict(self) -> dict[str, Any]:
        """The training sections as plain data: what a checkpoint stores and what the resume key hashes.

        Without the launch settings (`LAUNCH_KEYS`): a rendezvous address never changes the weights, and the
        world size is keyed by what the workers really run with (`ddpm.pipeline.resume.params_key`), which
        a hand-started `torchrun` sets without these params."""
        return self.training().model_dump(mode="json", exclude={"train": set(LAUNCH_KEYS)})


class ConfigError(UserError):
    """params.yaml (or a stored config) failed validation; the message names every bad field."""

    def __init__(self, source: str, err: ValidationError):
        problems = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
            msg = e["msg"].removeprefix("Value error, ")
            if e["type"] == "extra_forbidden":
                msg = "unknown key (check the spelling; see params.yaml for the allowed keys)"
            # a cross-field check names its fields in the message; its "input" is a whole section
            shown = e["type"] != "missing" and not isinstance(e["input"], dict)
            problems.append(f"{loc}: {msg} (got {e['input']!r})" if shown else f"{loc}: {msg}")
        fix = f"correct it in {source}" if len(problems) == 1 else f"correct them in {source}"
        if len(problems) == 1:  # the usual case: one line naming the problem and the fix
            super().__init__(f"invalid configuration in {source}: {problems[0]}; {fix}")
        else:
            super().__init__("\n".join([f"invalid configuration in {source} ({fix}):", *(f"  {p}" for p in problems)]))


def load_config(path: str | Path = "params.yaml") -> Config:
    """Read and validate a params file; every problem is reported as a `ConfigError`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"params file {path} not found; run from the repository root or pass --params")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping of params, got {type(data).__name__}")
    return Config.from_dict(data, source=str(path))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """`{"model": {"channels": 128}}` -> `{"model.channels": 128}` (for MLflow params and run comparison)."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, prefix=f"{name}."))
        else:
            out[name] = value
    return out

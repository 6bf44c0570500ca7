"""The student's training config: every option of ``stillroom train`` and ``POST /v1/train-jobs``
(``pipelines.options``), the recipe's own (``pipelines.train_recipe.RecipeOptions``: optimizer, schedule, EMA,
precision, clipping, accumulation, named as timm's ``train.py``) among them.

A config file (``--config FILE.yaml``) holds any of them under their names (``opt: sgd``, ``warmup_epochs: 5``);
flags override it (``student.commands``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from stillroom.pipelines.core import UsageError, check_options, option
from stillroom.pipelines.data import DATASET_HELP
from stillroom.pipelines.training import RecipeOptions
from stillroom.student import losses as L
from stillroom.student.methods import method_class, method_names
from stillroom.student.online import ONLINE_TARGETS
from stillroom.student.tracking import TRACKERS

LOSSES = method_names()  # ce, kd, deit-soft, deit-hard, mealv2, sampled, tat
TAT_VARIANTS = L.TAT_VARIANTS  # full, patch, anchor, patch-anchor
BEST_METRICS = ("top1", "top5")
BEST_WEIGHTS = ("auto", "model", "ema")


@dataclass(frozen=True, kw_only=True)
class TrainConfig(RecipeOptions):
    """Everything ``stillroom train`` and ``POST /v1/train-jobs`` take (``pipelines.options``); saved, resolved,
    as ``RUN_DIR/config.json``.

    ``temperature=None`` means the loss's default (4 for ``kd``, 1 otherwise). ``seeds=None``
    uses every complete seed of the store. ``max_steps`` stops each epoch early (tests, benchmarks);
    ``eval_limit`` scores a fixed class-balanced subset of the eval split.
    """

    store: str = option(help="the label store: its directory (<root>/<cache_key>) or its cache key under "
                             "--store-root")
    dataset: str = option(help="default: the data set the store was labeled from (its manifest); " + DATASET_HELP,
                          cli={"default": None})
    split: str = option("train", help="default: the split the store was labeled from", choices=("train", "val", "test"),
                        cli={"default": None})
    data_root: str | None = option(None, help="where the data set's files are (default: the one the store was "
                                              "labeled with)")
    student: str = option(help="a timm model name, e.g. resnet18, deit_tiny_distilled_patch16_224")
    student_kwargs: dict[str, Any] = option(default_factory=dict, help='JSON architecture kwargs, e.g. '
                                            '\'{"patch_size": 4}\'', cli={"default": "{}"})
    loss: str = option("kd", help="the distillation loss", choices=method_names, cli={"required": True})
    out: str = option(help="the run directory")
    epochs: int = option(1, help="passes over the store's seeds (epoch e reads seed seeds[e % len(seeds)])",
                         ge=1, le=1000)
    batch_size: int = option(128, help="training batch size (per worker)", ge=1, le=65536)
    alpha: float = option(0.5, help="weight of the teacher term, the ground truth's being 1 - alpha (kd, deit-soft, "
                                    "tat). torchdistill's KDLoss alpha weights the ground truth instead. deit-hard "
                                    "takes no --alpha: DeiT's hard distillation is fixed at 0.5/0.5", ge=0, le=1)
    temperature: float | None = option(None, help="default: 4 for kd, 1 otherwise (tat: KD at 1)", gt=0, le=100)
    seeds: tuple[int, ...] | None = option(None, help="store seeds to cycle through, e.g. 0-3 (default: every "
                                                       "complete seed when the run starts; a resumed run keeps "
                                                       "its own list)")
    view_order: str = option("cycle", help="which stored view an epoch replays: cycle (epoch e: seed seeds[e % S]; a "
                                           "run of E epochs sees min(E, S) distinct views of each sample) or random "
                                           "(ml-dr: each epoch, each sample's view from one of the S seeds at random, "
                                           "drawn from --seed, the epoch and the id; about S(1 - (1 - 1/S)^E) "
                                           "distinct views of each sample; the run prints the figure)",
                             choices=("cycle", "random"))
    views_per_image: int = option(1, help="K views of each image in a batch (FKD's multi-crop): a batch of B views "
                                          "holds B/K images, view j of each from seed seeds[(e*K + j) % S] in epoch e, "
                                          "each image decoded once for its K crops; a run sees min(E*K, S) distinct "
                                          "views of each sample. K must divide --batch-size", ge=1, le=64)
    workers: int = option(1, help="> 1: data-parallel through Ray Train", ge=1, le=1024)
    max_failures: int = option(3, help="workers > 1: times Ray Train restarts the run from its last epoch's "
                                       "checkpoint after a worker dies (Ray's FailureConfig; -1: without limit)",
                               ge=-1, le=1000)
    init: str | None = option(None, help="pretrained student weights to start from")
    resume: bool = option(False, help="continue the run in --out from its last checkpoint")
    online: bool = option(False, help="run the store's teacher(s) in the loop on the same views (baseline): "
                                      "'full' (default) trains on their full float32 distribution; 'encoded' on the "
                                      "store's encoding of it (float16 top-k and tail), which a cached run matches "
                                      "exactly", cli={"nargs": "?", "const": "full", "default": None,
                                                      "choices": ONLINE_TARGETS, "type": str})
    online_targets: str = option("full", help="online: train on the teachers' full float32 distribution (full) or "
                                              "on the store's encoding of it (encoded)", choices=ONLINE_TARGETS,
                                 flags=("--online",), via="the value of --online")
    eval_split: str = option("test", help="the split scored after each epoch", choices=("train", "val", "test"))
    eval_limit: int | None = option(None, help="score a fixed class-balanced subset of N eval samples (the same in "
                                               "every run: each class in turn, its samples drawn with a fixed seed), "
                                               "not the first N of a split sorted by class", ge=1)
    seed: int = option(0, help="student init and shuffling", ge=0)
    distill_token: bool = option(False, help="require a student with a distillation token (deit-soft/deit-hard)")
    deit_soft_reduction: str = option("numel", help="deit-soft: divide the summed KL by B*C as DeiT's code does "
                                                    "(numel) or by B (batch)", choices=L.DEIT_SOFT_REDUCTIONS)
    mealv2_form: str = option("authors", help="mealv2: the authors' discriminator (1x1 convs C -> C/8 -> C/64 -> 2, "
                                              "its loss in the student's objective, one backward) or a GAN generator "
                                              "term", choices=L.MEALV2_FORMS)
    adv_weight: float = option(1.0, help="mealv2: weight of the discriminator term", ge=0, le=1000)
    disc_lr: float = option(1e-4, help="mealv2: discriminator learning rate", gt=0, le=10)
    tat_variant: str = option("full", help="tat: full, patch, anchor or patch-anchor", choices=TAT_VARIANTS)
    tat_weight: float = option(1.0, help="tat: weight of the feature term", ge=0, le=1000)
    tat_groups: int = option(2, help="tat patch: patches per side of the teacher map", ge=1, le=64)
    tat_patches_per_group: int = option(2, help="tat patch: neighbouring patches sharing one attention (TaT-seg "
                                                "uses 2 or 4)", ge=1, le=4096)
    tat_anchors: int = option(2, help="tat anchor: anchors per side of the teacher map", ge=1, le=64)
    student_layer: str = option("final", help="tat: the student layer to match ('final' or a name)")
    eval_interval: int = option(1, help="evaluate every N epochs (and after the last)", ge=1, le=1000)
    best_metric: str = option("top1", help="the eval metric that chooses best.pt", choices=BEST_METRICS)
    best_weights: str = option("auto", help="the weights scored for best.pt and saved in it: the model's, the "
                                            "EMA's, or auto (the EMA's with --model-ema, as timm)",
                               choices=BEST_WEIGHTS)
    max_steps: int | None = option(None, help="stop each epoch after this many steps", ge=1)
    progress: bool = option(True, help="show a progress bar", flags=("--no-progress",),
                            cli={"action": "store_false", "help": "hide the progress bar"})
    tracker: str = option("tensorboard", help="TensorBoard event files in RUN_DIR/tensorboard; mlflow: those and an "
                                              "MLflow run (MLFLOW_TRACKING_URI; the mlflow extra); none",
                          choices=TRACKERS)
    log_interval: int = option(50, help="log losses, lr, gradient norm and images/s every N steps", ge=1,
                               le=1_000_000)
    loader_workers: int | None = option(None, help="processes that decode and build each batch (default: 0 for "
                                                   "in-memory data, whose views are one vectorised crop on the "
                                                   "device; for data on disk the cores per rank less one, 1 to 4)",
                                        ge=0, le=64)
    threads: int | None = option(None, help="torch's CPU threads in a one-process run (default: the cores this "
                                            "process may use less its loader workers, at least 1; OMP_NUM_THREADS "
                                            "when set)", ge=1, le=1024)

    def __post_init__(self) -> None:
        check_options(self)
        for _, why in self.conflicts(vars(self)):
            raise UsageError(why)

    @staticmethod
    def conflicts(values: dict[str, Any]) -> list[tuple[str, str]]:
        """Options each valid alone but not together, as ``(field, why)``: the config and the REST spec both ask."""
        out = []
        loss, smoothing = values.get("loss"), values.get("smoothing") or 0.0
        if smoothing > 0 and loss in method_names() and not method_class(loss).ground_truth:
            out.append(("smoothing", f"--smoothing {smoothing} with {loss}: it has no ground-truth term to smooth "
                                     "(the teacher's term is never smoothed)"))
        if values.get("best_weights") == "ema" and not values.get("model_ema"):
            out.append(("best_weights", "--best-weights ema needs --model-ema"))
        return out

    @property
    def resolved_temperature(self) -> float:
        # the method's own (kd: 4; every other: 1, TaT pairs its feature loss with KD at T = 1), asked of the
        # registry now: a method registered after this module was imported has its own too
        return self.temperature if self.temperature is not None else method_class(self.loss).default_temperature

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seeds"] = list(self.seeds) if self.seeds is not None else None
        d["temperature"] = self.resolved_temperature
        return d

    @property
    def scored_weights(self) -> str:
        """Which weights choose and fill ``best.pt``: ``model`` or ``ema``."""
        if self.best_weights == "auto":
            return "ema" if self.model_ema else "model"
        return self.best_weights


__all__ = ["LOSSES", "TAT_VARIANTS", "TrainConfig", "BEST_METRICS", "BEST_WEIGHTS"]

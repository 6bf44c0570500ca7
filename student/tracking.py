"""What a student run reports as it trains: TensorBoard event files in the run directory, MLflow when asked.

``Tracker.open(config, rank, world_size, out, start_step)`` on every rank; rank 0 writes
``RUN_DIR/tensorboard/events.out.tfevents.*`` (``torch.utils.tensorboard``, which needs the ``tensorboard``
package: the one that also reads the files and serves them, so no second writer package is needed) and, with
``--tracker mlflow``, logs the same scalars and the config to an MLflow run (tracking URI from
``MLFLOW_TRACKING_URI``; ``pip install 'stillroom[mlflow]'``).

Every ``--log-interval`` steps and at the end of each epoch (timm's ``train.py`` logs the same way):

- ``train/<loss>``: each named loss, the mean over the steps since the last log;
- ``train/lr``: the learning rate the step used (the recipe's schedule);
- ``train/grad_norm``: the L2 norm of the gradients of the last optimizer update, before clipping (the averaged
  gradient under DDP; unscaled under fp16);
- ``throughput/images_per_s``: rank 0's images/s since the last log.

After each epoch, on every rank (one all-reduce): ``throughput/images_per_s_rank<r>`` for each rank and
``throughput/images_per_s`` of all of them, ``eval/top1``, ``eval/top5`` and ``eval/ema_top1``/``eval/ema_top5``
when the epoch's record has them; the epoch's record gains ``lr``, ``images_per_s`` and ``images_per_s_per_rank``
(``metrics.jsonl``; ``lr`` is the epoch's last step's). A resumed run purges the events past the step it resumes from.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from stillroom.pipelines.core import UsageError

TRACKERS = ("tensorboard", "mlflow", "none")
EVAL_KEYS = ("top1", "top5", "ema_top1", "ema_top5")


def check_tracker(name: str) -> None:
    """UsageError for a tracker that cannot run here (``mlflow`` not installed), before training starts."""
    if name not in TRACKERS:
        raise UsageError(f"--tracker {name!r}: expected one of {', '.join(TRACKERS)}")
    if name == "mlflow":
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise UsageError("--tracker mlflow needs MLflow: pip install 'stillroom[mlflow]' (or mlflow)") from None


class Tracker:
    """One rank's reporting of a run (see the module docstring). Ranks other than 0 write nothing; every rank
    takes part in ``end_epoch``'s all-reduce."""

    def __init__(self, out: Path | None, rank: int, world_size: int, log_interval: int, mlflow_run: Any = None,
                 start_step: int = 0):
        self.rank, self.world_size, self.log_interval = rank, world_size, max(1, log_interval)
        self.writer: Any = None
        if out is not None and rank == 0:
            from torch.utils.tensorboard import SummaryWriter

            # steps count from 1: a run resumed after step `start_step` purges what a crash left past it
            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"),
                                        purge_step=start_step + 1 if start_step else None, flush_secs=10)
        self.mlflow = mlflow_run
        self._sums: dict[str, float] = {}
        self._steps = 0
        self._images = 0
        self._t = time.perf_counter()
        self.last_lr = float("nan")

    @classmethod
    def open(cls, tracker: str, out: Path, rank: int, world_size: int, log_interval: int, config: dict[str, Any],
             start_step: int = 0) -> Tracker:
        """The run's tracker: ``tracker`` is ``tensorboard``, ``mlflow`` (TensorBoard and MLflow) or ``none``."""
        check_tracker(tracker)
        mlflow_run = None
        if tracker == "mlflow" and rank == 0:
            mlflow_run = _start_mlflow(out, config)
        return cls(out if tracker != "none" else None, rank, world_size, log_interval, mlflow_run, start_step)

    @property
    def writing(self) -> bool:
        return self.writer is not None or self.mlflow is not None

    def after_step(self, global_step: int, losses: dict[str, float], images: int, lr: float,
                   grad_norm: Callable[[], float], last: bool = False) -> None:
        """After an optimiser step (``global_step`` counted from 1 over the run): every ``log_interval`` steps
        and at ``last``, the means since the last log, the learning rate, the gradient norm and images/s."""
        self.last_lr = lr
        if not self.writing:
            return
        for k, v in losses.items():
            self._sums[k] = self._sums.get(k, 0.0) + v
        self._steps += 1
        self._images += images
        if global_step % self.log_interval and not last:
            return
        now = time.perf_counter()
        scalars = {f"train/{k}": v / self._steps for k, v in self._sums.items()}
        scalars["train/lr"] = lr
        scalars["train/grad_norm"] = grad_norm()
        scalars["throughput/images_per_s"] = self._images / max(now - self._t, 1e-9)
        self._log(scalars, global_step)
        self._sums, self._steps, self._images, self._t = {}, 0, 0, now

    def end_epoch(self, record: dict[str, Any], global_step: int,
                  all_reduce_mean: Callable[[torch.Tensor], None]) -> dict[str, Any]:
        """On every rank after an epoch's evaluation: ``lr`` (that of the epoch's last step) and the images/s of
        each rank and of all (one all-reduce), logged by rank 0 with the eval accuracies; returns the fields for
        ``metrics.jsonl``."""
        own = record["samples"] / self.world_size / max(record["seconds"], 1e-9)  # samples: all ranks'
        rates = torch.zeros(self.world_size, dtype=torch.float64)
        rates[self.rank] = own
        if self.world_size > 1:
            all_reduce_mean(rates)
            rates.mul_(self.world_size)
        per_rank = [round(float(v), 1) for v in rates]
        total = round(sum(per_rank), 1)
        scalars = {f"throughput/images_per_s_rank{r}": v for r, v in enumerate(per_rank)}
        scalars["throughput/epoch_images_per_s"] = total
        scalars.update({f"eval/{k}": float(record[k]) for k in EVAL_KEYS if record.get(k) is not None})
        scalars["epoch"] = float(record["epoch"])
        self._log(scalars, global_step)
        if self.writer is not None:
            self.writer.flush()
        return {"lr": self.last_lr, "images_per_s": total, "images_per_s_per_rank": per_rank}

    def _log(self, scalars: dict[str, float], step: int) -> None:
        finite = {k: v for k, v in scalars.items() if math.isfinite(v)}
        if self.writer is not None:
            for k, v in finite.items():
                self.writer.add_scalar(k, v, step)
        if self.mlflow is not None:
            import mlflow

            mlflow.log_metrics({k.replace("/", "."): v for k, v in finite.items()}, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.mlflow is not None:
            import mlflow

            mlflow.end_run()
            self.mlflow = None


def _start_mlflow(out: Path, config: dict[str, Any]) -> Any:
    """Start (or, on resume, continue) the run's MLflow run; its id is kept in ``RUN_DIR/mlflow.json``."""
    import mlflow

    record = out / "mlflow.json"
    run_id = json.loads(record.read_text()).get("run_id") if record.exists() else None
    try:
        run = mlflow.start_run(run_id=run_id, run_name=None if run_id else out.name)
        if run_id is None:
            mlflow.log_params({k: json.dumps(v) if isinstance(v, list | dict | tuple) else v
                               for k, v in config.items()})
    except Exception as e:  # a tracking server that is not there, a store that refuses: say so, one line
        raise UsageError(f"--tracker mlflow: MLflow could not start a run at {mlflow.get_tracking_uri()} "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
    out.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"run_id": run.info.run_id, "tracking_uri": mlflow.get_tracking_uri()}))
    return run

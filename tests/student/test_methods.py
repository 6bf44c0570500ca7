"""The method registry: every registered method trains two steps on a tiny student and returns named losses
(composer's shape), a new method registered by name trains end to end without touching the trainer, each
run checks its config once, and a method's checkpoint state restores it."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.pipelines.training import TrainingRecipe
from stillroom.pipelines.views import NUM_VIEW_PARAMS
from stillroom.student import run as student_run
from stillroom.student import trainer
from stillroom.student.config import TrainConfig
from stillroom.student.data import Batch
from stillroom.student.methods import METHODS, Heads, Method, method_class, method_names, register_method
from stillroom.student.models import build_student
from stillroom.student.run import train
from stillroom.student.trainer import DistillationStep, train_step

CLASSES, SIDE, B = 4, 16, 8
TINY_DEIT = {"patch_size": 4, "depth": 1, "embed_dim": 32, "num_heads": 2}
FEATURES = (8, 2, 2)  # the stored teacher map: 8 channels on a 2x2 grid


def _batch(seed: int) -> Batch:
    """A hand-made batch carrying everything a store can hold: top-3 with the tail, argmax, sampled classes and a
    teacher feature map."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, CLASSES, generator=g) * 3
    top = logits.topk(3, dim=1)
    rest = logits.scatter(1, top.indices, float("-inf"))
    labels = torch.randint(0, CLASSES, (B,), generator=g)
    teacher = {"topk_idx": top.indices, "topk_logit": top.values, "tail_lse": rest.logsumexp(1),
               "lse": logits.logsumexp(1), "hard": logits.argmax(1),
               "sampled": torch.multinomial(logits.softmax(1), 5, replacement=True, generator=g),
               "features": torch.randn(B, *FEATURES, generator=g)}
    return Batch(ids=np.arange(B), views=torch.rand(B, 1, SIDE, SIDE, generator=g), labels=labels,
                 targets=F.one_hot(labels, CLASSES).float(), teacher=teacher,
                 params=np.zeros((B, NUM_VIEW_PARAMS), dtype=np.float32))


def _config(loss: str, **kw) -> TrainConfig:
    return TrainConfig(store="-", dataset="-", student="test_resnet", loss=loss, out="-", **kw)


def _step(config: TrainConfig) -> DistillationStep:
    method = method_class(config.loss)
    kwargs = TINY_DEIT if method.two_heads else {}
    torch.manual_seed(0)
    student = build_student("deit_tiny_distilled_patch16_224" if method.two_heads else "test_resnet", CLASSES, 1,
                            SIDE, kwargs)
    if method.two_heads:
        student.set_distilled_training(True)
    channels = (trainer.student_feature_channels(student, (1, SIDE, SIDE), config.student_layer)
                if method.student_features else None)
    return DistillationStep(student, config, CLASSES, FEATURES, channels)


def _recipe(step: DistillationStep, method_opt: torch.optim.Optimizer | None, lr: float = 1e-2) -> TrainingRecipe:
    """The run's recipe for the step's student (constant rate ``lr``), its method's optimizer stepped with it."""
    return TrainingRecipe.build(step.student, replace(step.config, lr=lr, sched="constant"), epochs=1,
                                updates_per_epoch=2, global_batch=B, device=torch.device("cpu"),
                                extra_params=step.method.student_side_parameters(), extra_optimizers=[method_opt])


def test_loss_names_are_the_registry():
    assert method_names() == tuple(METHODS) == trainer.LOSSES
    assert {name: 4.0 if name == "kd" else 1.0 for name in METHODS} == {
        name: _config(name).resolved_temperature for name in METHODS}
    with pytest.raises(UsageError, match="unknown loss 'nope': expected one of ce, kd"):
        method_class("nope")


VARIANTS = [(name, {}) for name in METHODS] + [
    ("mealv2", {"mealv2_form": "gan"}), ("tat", {"tat_variant": "patch-anchor", "tat_groups": 2, "tat_anchors": 1})]


@pytest.mark.parametrize(("loss", "options"), VARIANTS, ids=[f"{n}{'-' + '-'.join(map(str, o.values())) if o else ''}"
                                                              for n, o in VARIANTS])
def test_every_method_trains_two_steps_and_returns_named_losses(loss, options):
    config = _config(loss, **options)
    step = _step(config)
    method_opt = step.method.make_optimizer()
    recipe = _recipe(step, method_opt)
    before = {k: v.clone() for k, v in step.state_dict().items() if v.is_floating_point()}
    step.train()
    records = [train_step(step, _batch(i), recipe) for i in range(2)]
    for values in records:
        terms = [k for k in values if k != "loss" and k not in step.method.own_objectives]
        assert terms and all(math.isfinite(v) for v in values.values())
        assert values["loss"] == pytest.approx(sum(values[k] for k in terms), rel=1e-5)
    assert records[0] != records[1]
    moved = {k.split(".")[0] + "." + k.split(".")[1] for k, v in step.state_dict().items()
             if k in before and not torch.equal(v, before[k])}
    assert any(k.startswith("student.") for k in moved)
    for module in ("discriminator", "tat"):  # a method's own modules are trained too
        if hasattr(step.method, module):
            assert f"method.{module}" in moved, moved
    if options.get("mealv2_form") == "gan":
        assert set(records[0]) == {"soft_ce", "adv", "loss", "gan_disc"}
        assert list(records[0])[-1] == "gan_disc"  # its own objective, not in "loss"


def test_method_checkpoint_state_restores_its_modules_and_optimizer():
    config = _config("mealv2", mealv2_form="gan")
    step = _step(config)
    method_opt = step.method.make_optimizer()
    train_step(step, _batch(0), _recipe(step, method_opt))
    state = step.method.checkpoint_state(method_opt)
    assert set(state["step"]) == set(step.method.state_dict()) and state["step"]
    assert all(k.startswith("discriminator.") for k in state["step"])  # the keys checkpoints have always had
    fresh = _step(replace(config, seed=1))
    fresh_opt = fresh.method.make_optimizer()
    assert not all(torch.equal(fresh.method.state_dict()[k], v) for k, v in state["step"].items())
    fresh.method.load_checkpoint_state(state, fresh_opt)
    for k, v in step.method.state_dict().items():
        torch.testing.assert_close(fresh.method.state_dict()[k], v)
    assert fresh_opt.state_dict()["state"].keys() == method_opt.state_dict()["state"].keys()


def test_register_method_refuses_a_name_twice():
    with pytest.raises(ValueError, match="'kd' is registered twice"):
        register_method("kd")(type("AnotherKD", (Method,), {}))
    assert method_class("kd").__name__ == "KnowledgeDistillation"


@pytest.fixture
def smoothing_method():
    """A method registered by a test alone: label smoothing (Szegedy et al. 2016), no teacher."""

    @register_method("test-label-smoothing")
    class LabelSmoothing(Method):
        def forward(self, heads: Heads, batch: Batch) -> dict[str, torch.Tensor]:
            return {"smoothed_ce": F.cross_entropy(heads.cls, heads.truth(batch), label_smoothing=0.1)}

    yield "test-label-smoothing"
    del METHODS["test-label-smoothing"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher) -> str:
    config = LabelConfig(dataset="synthetic:n=64,classes=4,size=16", teachers=(tiny_teacher,),
                         store_root=str(tmp_path_factory.mktemp("stores")), batch_size=64, chunk_rows=64, top_k=2)
    return run_labeling(config, backend="local", progress=False)["store"]


def _train_config(store: str, out: Path, loss: str) -> TrainConfig:
    return TrainConfig(store=store, dataset="synthetic:n=64,classes=4,size=16", student="test_resnet", loss=loss,
                       out=str(out), batch_size=16, max_steps=2, progress=False)


def test_a_registered_method_trains_by_name_without_touching_the_trainer(store, tmp_path, smoothing_method):
    result = train(_train_config(store, tmp_path / "run", smoothing_method))
    assert result["loss"] == smoothing_method and set(result["losses"]) == {"smoothed_ce", "loss"}
    epoch = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert epoch["steps"] == 2 and len(epoch["step_losses"]["losses"]["smoothed_ce"]) == 2


def test_a_run_checks_its_config_once(store, tmp_path, monkeypatch):
    calls = []
    prepare = trainer.prepare

    def counting(config):
        calls.append(config.out)
        return prepare(config)

    monkeypatch.setattr(trainer, "prepare", counting)
    monkeypatch.setattr(student_run, "prepare", counting)
    train(_train_config(store, tmp_path / "run", "kd"))
    assert calls == [str(tmp_path / "run")]


def test_the_rest_spec_offers_every_registered_method():
    from stillroom.services.specs import TrainJobSpec

    assert tuple(TrainJobSpec.model_json_schema()["properties"]["loss"]["enum"]) == method_names()

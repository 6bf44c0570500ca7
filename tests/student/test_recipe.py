"""The training recipe from timm's parts (pipelines.train_recipe) and what the loop does with it: weight decay off
norms and biases, the learning rate of every step against timm's scheduler and the formula, accumulation,
autocast on CPU (bf16; fp16 with its scaler), label smoothing on the ground-truth term only, a resumed run equal
bit for bit to one run (weights and EMA), best.pt the best epoch's, seeds fixed at resume, --config files."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stillroom.pipelines.core import UsageError
from stillroom.pipelines.labeling import LabelConfig, run_labeling
from stillroom.pipelines.training import RecipeOptions, TrainingRecipe, amp_dtype, resolve_lr
from stillroom.services.cli import main as cli_main
from stillroom.student import losses as L
from stillroom.student.config import TrainConfig
from stillroom.student.evaluate import evaluate_checkpoint, read_checkpoint
from stillroom.student.models import build_student
from stillroom.student.run import train

DATA = "synthetic:n=64,classes=4,size=16"
CPU = torch.device("cpu")


def _label(root: Path, teacher: str, seeds: tuple[int, ...]) -> str:
    config = LabelConfig(dataset=DATA, teachers=(teacher,), store_root=str(root), batch_size=64, chunk_rows=64,
                         top_k=2, seeds=seeds)
    return run_labeling(config, backend="local", progress=False)["store"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher) -> str:
    return _label(tmp_path_factory.mktemp("stores"), tiny_teacher, (0, 1))


def _config(store: str, out: Path, **kw) -> TrainConfig:
    base = dict(store=store, dataset=DATA, student="test_resnet", loss="kd", out=str(out), batch_size=16,
                max_steps=2, epochs=1, progress=False)
    return TrainConfig(**{**base, **kw})


def _recipe(model: nn.Module, **kw) -> TrainingRecipe:
    return TrainingRecipe.build(model, RecipeOptions(**{"lr": 1e-2, **kw}), epochs=3, updates_per_epoch=5,
                                global_batch=16, device=CPU)


# -- optimizer and schedule -------------------------------------------------------------------------------


def test_no_weight_decay_on_norms_biases_and_the_models_own_list():
    vit = build_student("deit_tiny_distilled_patch16_224", 4, 1, 16, {"patch_size": 4, "depth": 1, "embed_dim": 32,
                                                                       "num_heads": 2})
    recipe = TrainingRecipe.build(vit, RecipeOptions(weight_decay=0.05), epochs=1, updates_per_epoch=1,
                                  global_batch=16, device=CPU)
    names = {id(p): n for n, p in vit.named_parameters()}
    groups = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in recipe.optimizer.param_groups}
    assert set(groups) == {0.0, 0.05}
    no_decay, decay = groups[0.0], groups[0.05]
    assert no_decay | decay == set(names.values()) and not no_decay & decay
    params = dict(vit.named_parameters())
    assert all(params[n].ndim >= 2 for n in decay)
    assert {n for n, p in params.items() if p.ndim <= 1} <= no_decay  # every norm weight and bias
    assert any(".norm" in n for n in no_decay) and any(n.endswith(".bias") for n in no_decay)
    assert set(vit.no_weight_decay()) & set(names.values()) <= no_decay  # pos_embed, cls_token, dist_token
    assert "pos_embed" in no_decay and "blocks.0.attn.qkv.weight" in decay


def test_the_extra_parameters_of_a_method_are_grouped_the_same_way():
    model, extra = nn.Linear(3, 2), nn.Linear(2, 2)
    recipe = TrainingRecipe.build(model, RecipeOptions(weight_decay=0.1), epochs=1, updates_per_epoch=1,
                                  global_batch=8, device=CPU, extra_params=extra.parameters())
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in recipe.optimizer.param_groups}
    assert by_decay[0.1] == {id(model.weight), id(extra.weight)}
    assert by_decay[0.0] == {id(model.bias), id(extra.bias)}


def test_the_learning_rate_at_every_step_is_timms_warmup_then_cosine():
    from timm.scheduler import CosineLRScheduler

    lr, warmup_lr, min_lr, epochs, per_epoch, warmup_epochs = 1e-2, 1e-4, 1e-5, 3, 5, 1.4
    model = nn.Linear(3, 2)
    recipe = TrainingRecipe.build(model, RecipeOptions(opt="sgd", lr=lr, warmup_epochs=warmup_epochs,
                                                       warmup_lr=warmup_lr, min_lr=min_lr),
                                  epochs=epochs, updates_per_epoch=per_epoch, global_batch=8, device=CPU)
    reference_opt = torch.optim.SGD(nn.Linear(3, 2).parameters(), lr=lr)
    reference = CosineLRScheduler(reference_opt, t_initial=epochs * per_epoch, lr_min=min_lr,
                                  warmup_t=warmup_epochs * per_epoch, warmup_lr_init=warmup_lr, t_in_epochs=False)
    total, warmup_t = epochs * per_epoch, warmup_epochs * per_epoch
    for t in range(total):
        used = recipe.current_lr  # the rate of update t (counted from 0)
        by_hand = (warmup_lr + t * (lr - warmup_lr) / warmup_t if t < warmup_t
                   else min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * t / total)))
        assert used == pytest.approx(by_hand, rel=1e-12, abs=1e-15), t
        assert used == reference_opt.param_groups[0]["lr"], t
        model(torch.randn(4, 3)).sum().backward()
        recipe.step()
        reference.step_update(num_updates=t + 1)
    assert recipe.num_updates == total


def test_the_learning_rate_scales_with_the_global_batch_as_timm():
    assert resolve_lr(RecipeOptions(opt="sgd", lr_base=0.1, lr_base_size=256), 1024) == pytest.approx(0.4)
    assert resolve_lr(RecipeOptions(opt="adamw", lr_base=1e-3, lr_base_size=256), 1024) == pytest.approx(2e-3)
    assert resolve_lr(RecipeOptions(opt="lamb", lr_base=1e-3, lr_base_size=256, lr_base_scale="linear"),
                      1024) == pytest.approx(4e-3)
    assert resolve_lr(RecipeOptions(lr=0.3, lr_base=0.1), 4096) == 0.3  # --lr wins
    assert resolve_lr(RecipeOptions(), 128) == 1e-3  # the default at the default batch: AdamW at 1e-3


def test_the_loop_follows_the_schedule_and_records_it(store, tmp_path):
    result = train(_config(store, tmp_path / "run", epochs=3, max_steps=4, lr=1e-2, warmup_epochs=1,
                           warmup_lr=1e-4, grad_accum_steps=2))
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["updates"] for r in records] == [2, 2, 2]  # 4 micro-batches, 2 a step
    # the rate of each epoch's last step: epoch 0's in the warmup (2 updates from 1e-4, its last step at update 1),
    # then the cosine at updates 3 and 5 of 6
    expected = [1e-4 + (1e-2 - 1e-4) / 2] + [0.5 * 1e-2 * (1 + math.cos(math.pi * t / 6)) for t in (3, 5)]
    assert [r["lr"] for r in records] == pytest.approx(expected, abs=1e-15)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["updates_per_epoch"] == 2 and config["global_batch"] == 32 and config["lr_resolved"] == 1e-2
    assert result["last"]["epoch"] == 2


def test_accumulated_micro_batches_equal_one_batch():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    one, two = nn.Linear(3, 2), nn.Linear(3, 2)
    two.load_state_dict(one.state_dict())
    whole = _recipe(one, opt="sgd", sched="constant", weight_decay=0.0)
    accumulated = _recipe(two, opt="sgd", sched="constant", weight_decay=0.0, grad_accum_steps=2)
    whole.scaled({"loss": F.cross_entropy(one(x), y)})["loss"].backward()
    whole.step()
    for i, half in enumerate((slice(0, 4), slice(4, 8))):
        accumulated.scaled({"loss": F.cross_entropy(two(x[half]), y[half])})["loss"].backward()
        assert accumulated.is_update(i, last=False) == (i == 1)
    accumulated.step()
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_accumulating_micro_batches_skip_ddps_all_reduce(tmp_path):
    """Under DDP a micro-batch that only accumulates runs in ``no_sync``: the gradients are all-reduced once, at the
    update's backward, and sum to what the accumulation gives without DDP."""
    import torch.distributed as dist
    from test_methods import _batch, _step
    from test_methods import _config as method_config

    from stillroom.student.trainer import train_step

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        config = method_config("kd", lr=1e-2, sched="constant", grad_accum_steps=2)
        plain, wrapped = _step(config), _step(config)
        wrapped.student = nn.parallel.DistributedDataParallel(wrapped.student)
        reductions: list[int] = []

        def count(state, bucket):  # DDP's default all-reduce, counted
            reductions.append(1)
            return dist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda f: f.value()[0])

        wrapped.student.register_comm_hook(None, count)
        recipes = [TrainingRecipe.build(s.student, config, epochs=1, updates_per_epoch=1,
                                        global_batch=16, device=CPU) for s in (plain, wrapped)]
        for i in range(2):
            for s, recipe in zip((plain, wrapped), recipes, strict=True):
                s.train()
                train_step(s, _batch(i), recipe, update=i == 1)
            assert bool(reductions) == (i == 1), reductions
        for a, b in zip(plain.student.parameters(), wrapped.student.module.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    finally:
        dist.destroy_process_group()


def test_torchcompile_trains_and_saves_the_models_own_weights(store, tmp_path):
    """``--torchcompile`` wraps the model the loop runs; the checkpoint keeps the model's own keys (no
    ``_orig_mod.``), so it loads for evaluation (the eager backend here: inductor needs a compiler run per test)."""
    train(_config(store, tmp_path / "run", torchcompile="eager"))
    ckpt = read_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["model"] and not any("_orig_mod" in k for k in ckpt["model"])
    assert json.loads((tmp_path / "run" / "config.json").read_text())["torchcompile"] == "eager"
    assert evaluate_checkpoint(str(tmp_path / "run" / "last.pt"), DATA)["top1"] >= 0


# -- precision and devices -----------------------------------------------------------------------------------


def test_precision_defaults_bf16_on_cuda_fp32_on_cpu():
    assert amp_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert amp_dtype("auto", CPU) == torch.float32
    assert amp_dtype("float16", CPU) == torch.float16


def test_bf16_autocast_on_cpu_runs_the_forward_in_bf16(store, tmp_path):
    model = build_student("test_resnet", 4, 1, 16)
    recipe = TrainingRecipe.build(model, RecipeOptions(amp_dtype="bfloat16"), epochs=1, updates_per_epoch=1,
                                  global_batch=8, device=CPU)
    assert not recipe.scaler.is_enabled()  # bf16 needs no loss scaling
    with recipe.autocast():
        out = model(torch.rand(2, 1, 16, 16))
    assert out.dtype == torch.bfloat16
    result = train(_config(store, tmp_path / "run", amp_dtype="bfloat16", channels_last=True))
    assert all(math.isfinite(v) for v in result["losses"].values())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["precision"] == "bfloat16"


def test_fp16_uses_a_grad_scaler_whose_state_is_checkpointed(store, tmp_path):
    model = nn.Linear(3, 2)
    recipe = _recipe(model, amp_dtype="float16", clip_grad=1.0)
    assert recipe.scaler.is_enabled() and recipe.scaler.get_scale() == 65536.0
    with recipe.autocast():
        loss = model(torch.randn(4, 3)).float().pow(2).mean()
    before = model.weight.detach().clone()
    recipe.scaled({"loss": loss})["loss"].backward()
    assert model.weight.grad.abs().max() > 100  # the gradients were scaled
    recipe.step()
    assert not torch.equal(before, model.weight) and recipe.num_updates == 1
    train(_config(store, tmp_path / "run", amp_dtype="float16"))
    ckpt = read_checkpoint(tmp_path / "run" / "last.pt")
    assert ckpt["recipe"]["scaler"]["scale"] > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_a_run_is_bf16_by_default(store, tmp_path):
    result = train(_config(store, tmp_path / "run", device="cuda", model_ema=True))
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["precision"] == "bfloat16" and config["device"].startswith("cuda")
    assert all(math.isfinite(v) for v in result["losses"].values()) and result["last"]["ema_top1"] is not None


# -- label smoothing -------------------------------------------------------------------------------------------


def test_smoothing_touches_the_ground_truth_term_only():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    y = torch.randint(0, 5, (6,), generator=g)
    e, alpha, T = 0.1, 0.3, 2.0
    smoothed = (1 - e) * F.one_hot(y, 5) + e / 5
    ce_smoothed = -(smoothed * s.log_softmax(1)).sum(1).mean()  # by hand
    p = (t / T).softmax(1)
    plain = L.kd_loss(s, p, y, alpha=alpha, T=T)
    assert L.kd_loss(s, p, y, alpha=alpha, T=T, smoothing=e) - plain == pytest.approx(
        float((1 - alpha) * (ce_smoothed - F.cross_entropy(s, y))), abs=1e-6)
    soft = L.deit_soft_loss(s, p, y, alpha=alpha, T=T, smoothing=e) - L.deit_soft_loss(s, p, y, alpha=alpha, T=T)
    assert float(soft) == pytest.approx(float((1 - alpha) * (ce_smoothed - F.cross_entropy(s, y))), abs=1e-6)
    hard = L.deit_hard_loss(s, s.flip(0), y, t.argmax(1), smoothing=e)
    assert float(hard) == pytest.approx(float(0.5 * ce_smoothed + 0.5 * F.cross_entropy(s.flip(0), t.argmax(1))),
                                        abs=1e-6)
    # a two-head DeiT: the distillation head's term is the same with or without smoothing
    from stillroom.student.methods import Heads, method_class

    batch = SimpleNamespace(mixed=False, labels=y, targets=None,
                            teacher={"topk_idx": t.topk(2, 1).indices, "topk_logit": t.topk(2, 1).values,
                                     "tail_lse": t.logsumexp(1), "lse": t.logsumexp(1) + 0.1, "hard": t.argmax(1)})
    terms = {}
    for smoothing in (0.0, 0.1):
        config = TrainConfig(store="-", dataset="-", student="s", loss="deit-soft", out="-", smoothing=smoothing)
        terms[smoothing] = method_class("deit-soft")(config, 5)(Heads(s, s.flip(0)), batch)
    assert torch.equal(terms[0.0]["distill"], terms[0.1]["distill"])
    assert float(terms[0.1]["ce"] - terms[0.0]["ce"]) == pytest.approx(
        float(0.5 * (ce_smoothed - F.cross_entropy(s, y))), abs=1e-6)


@pytest.mark.parametrize("loss", ["mealv2", "sampled"])
def test_smoothing_is_refused_where_there_is_no_ground_truth(loss):
    with pytest.raises(UsageError, match=f"--smoothing 0.1 with {loss}: it has no ground-truth term"):
        TrainConfig(store="-", dataset="-", student="s", loss=loss, out="-", smoothing=0.1)


# -- EMA, best.pt, resume -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_four_epochs_equal_two_and_a_resume_of_two_bit_for_bit(store, tmp_path, monkeypatch):
    from stillroom.student import trainer

    recipe = dict(model_ema=True, model_ema_decay=0.9, warmup_epochs=1, lr=5e-3, smoothing=0.1, clip_grad=1.0,
                  max_steps=3, epochs=4)
    train(_config(store, tmp_path / "one", **recipe))
    one_epoch = trainer.train_one_epoch

    def dies_in_epoch_2(run, epoch):
        if epoch == 2:
            raise KeyboardInterrupt  # the run stops in its third epoch: last.pt holds epochs 0 and 1
        return one_epoch(run, epoch)

    monkeypatch.setattr(trainer, "train_one_epoch", dies_in_epoch_2)
    with pytest.raises(KeyboardInterrupt):
        train(_config(store, tmp_path / "two", **recipe))
    monkeypatch.setattr(trainer, "train_one_epoch", one_epoch)
    assert read_checkpoint(tmp_path / "two" / "last.pt")["epoch"] == 1
    train(_config(store, tmp_path / "two", resume=True, **recipe))
    one, two = read_checkpoint(tmp_path / "one" / "last.pt"), read_checkpoint(tmp_path / "two" / "last.pt")
    assert one["epoch"] == two["epoch"] == 3
    for key in ("model",):
        assert one[key].keys() == two[key].keys()
        assert all(torch.equal(one[key][k], two[key][k]) for k in one[key]), key
    ema_one, ema_two = one["recipe"]["model_ema"], two["recipe"]["model_ema"]
    assert all(torch.equal(ema_one[k], ema_two[k]) for k in ema_one)
    assert not all(torch.equal(ema_one[k], one["model"][k]) for k in ema_one)  # the EMA is not the model
    assert one["recipe"]["num_updates"] == two["recipe"]["num_updates"] == 12
    lines = [(tmp_path / d / "metrics.jsonl").read_text().splitlines() for d in ("one", "two")]
    timing = ("seconds", "samples_per_s", "images_per_s", "images_per_s_per_rank")
    strip = [[{k: v for k, v in json.loads(x).items() if k not in timing} for x in ls]
             for ls in lines]
    assert strip[0] == strip[1]  # same losses, learning rates and accuracies, epoch by epoch


@pytest.mark.slow
def test_best_pt_holds_the_best_epochs_weights_and_metrics_json_says_best_and_last(store, tmp_path):
    out = tmp_path / "run"
    result = train(_config(store, out, epochs=4, max_steps=2, lr=0.05, model_ema=True, model_ema_decay=0.5,
                           best_weights="model"))
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("ema_top1" in r and "top1" in r for r in records)  # EMA evaluated beside the model every epoch
    best_epoch = max(records, key=lambda r: (r["top1"], -r["epoch"]))  # the first of the best
    best = read_checkpoint(out / "best.pt")
    assert best["epoch"] == best_epoch["epoch"] == result["best"]["epoch"]
    assert result["best"] == {"epoch": best_epoch["epoch"], "weights": "model", "metric": "top1",
                              "top1": best_epoch["top1"], "top5": best_epoch["top5"]}
    assert result["last"]["epoch"] == 3 and result["last"]["top1"] == records[-1]["top1"]
    assert evaluate_checkpoint(out / "best.pt", DATA)["top1"] == pytest.approx(best_epoch["top1"])
    assert json.loads((out / "metrics.json").read_text())["best"] == result["best"]
    # the EMA's weights as best: best.pt scores as the EMA scored
    ema_out = tmp_path / "ema"
    ema_result = train(_config(store, ema_out, epochs=2, max_steps=2, model_ema=True, eval_interval=2))
    ema_records = [json.loads(x) for x in (ema_out / "metrics.jsonl").read_text().splitlines()]
    assert "top1" not in ema_records[0] and "ema_top1" in ema_records[1]  # --eval-interval 2
    assert ema_result["best"]["weights"] == "ema" and ema_result["best"]["epoch"] == 1
    assert evaluate_checkpoint(ema_out / "best.pt", DATA)["top1"] == pytest.approx(ema_records[1]["ema_top1"])
    last = read_checkpoint(ema_out / "last.pt")
    assert all(torch.equal(read_checkpoint(ema_out / "best.pt")["model"][k], v)
               for k, v in last["recipe"]["model_ema"].items())


@pytest.mark.slow
def test_a_resumed_run_keeps_its_seeds_when_the_store_grew(tiny_teacher, tmp_path):
    root = tmp_path / "stores"
    grown = _label(root, tiny_teacher, (0, 1))
    out = tmp_path / "run"
    train(_config(grown, out, epochs=1))
    assert json.loads((out / "config.json").read_text())["seeds"] == [0, 1]
    assert _label(root, tiny_teacher, (2,)) == grown  # a seed labeled in between, into the same store
    train(_config(grown, out, epochs=3, resume=True))  # no --seeds: the run's own [0, 1], not the store's
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in records] == [0, 1, 0]
    assert json.loads((out / "config.json").read_text())["seeds"] == [0, 1]
    assert read_checkpoint(out / "last.pt")["config"]["seeds"] == [0, 1]
    with pytest.raises(UsageError, match="different config than the saved run: seeds"):
        train(_config(grown, out, epochs=4, resume=True, seeds=(0, 1, 2)))
    train(_config(grown, tmp_path / "fresh", epochs=1))  # a new run takes every seed there is now
    assert json.loads((tmp_path / "fresh" / "config.json").read_text())["seeds"] == [0, 1, 2]


# -- --config files ------------------------------------------------------------------------------------------------


def test_a_config_file_sets_options_by_their_names_and_flags_override_it(store, tmp_path, capsys):
    recipe = tmp_path / "deit.yaml"
    recipe.write_text(f"store: {store}\nstudent: test_resnet\nloss: kd\nopt: sgd\nlr: 5e-4\nwarmup_epochs: 1\n"
                      "smoothing: 0.1\nmodel_ema: true\nseeds: [0, 1]\nmax_steps: 1\nbatch_size: 16\n"
                      "progress: false\n")
    out = tmp_path / "run"
    assert cli_main(["train", "--config", str(recipe), "--dataset", DATA, "--out", str(out), "--lr", "0.02"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert (config["opt"], config["lr"], config["warmup_epochs"], config["smoothing"]) == ("sgd", 0.02, 1.0, 0.1)
    assert config["model_ema"] is True and config["seeds"] == [0, 1] and config["progress"] is False
    assert read_checkpoint(out / "last.pt")["resolved_config"]["lr_resolved"] == 0.02
    capsys.readouterr()
    for text, message in [("warmup-epochs: 5\n", "'warmup-epochs' is no option (did you mean warmup_epochs?)"),
                          ("lr: fast\n", "lr: expected a number, got 'fast'"),
                          ("epochs: 1.5\n", "epochs: expected an integer"),
                          ("- opt\n", "expected a mapping")]:
        recipe.write_text(text)
        code = cli_main(["train", "--config", str(recipe), "--store", store, "--student", "s", "--loss", "kd",
                         "--out", str(tmp_path / "bad")])
        assert code == 2 and message in capsys.readouterr().err
    recipe.write_text("opt: sgd\n")
    with pytest.raises(SystemExit) as exit_info:  # what neither the file nor a flag gives: argparse's error
        cli_main(["train", "--config", str(recipe), "--store", store, "--out", str(tmp_path / "bad")])
    assert exit_info.value.code == 2
    assert "the following arguments are required: --student, --loss" in capsys.readouterr().err


def test_the_teacher_trains_on_the_same_recipe(tmp_path):
    from stillroom.pipelines.teachers import TeacherTrainConfig, train_teacher

    out = tmp_path / "t.pt"
    result = train_teacher(TeacherTrainConfig(dataset="synthetic:n=64,classes=4,size=16", model="test_resnet",
                                              out=str(out), epochs=2, batch_size=16, model_ema=True,
                                              model_ema_decay=0.5, opt="sgd", lr=0.05, amp_dtype="bfloat16",
                                              bn_samples=0), progress=False)
    assert result["weights"] == "ema" and result["device"] == "cpu" and result["precision"] == "bfloat16"
    assert 0 <= result["top1"] <= 1 and 0 <= result["model_top1"] <= 1 and result["lr"] == 0.05
    saved = json.loads(out.with_name("t.config.json").read_text())
    assert saved["opt"] == "sgd" and saved["warmup_epochs"] == 0.3 and saved["lr_resolved"] == 0.05
    ckpt = torch.load(out, weights_only=True)
    assert ckpt["resolved_config"] == saved
    assert [h["lr"] for h in ckpt["history"]][-1] < 0.05  # warmed up, then decayed by the cosine


@pytest.mark.parametrize("name", ["deit-s-distilled-imagenet", "fkd-resnet50-imagenet"])
def test_the_imagenet_recipe_files_are_configs(name, capsys):
    from stillroom.services.cli import build_parser

    path = Path(__file__).resolve().parents[2] / "infra" / "recipes" / f"{name}.yaml"
    argv = ["train", "--config", str(path), "--store", "s", "--out", "o", "--dataset", "fashion-mnist"]
    parser = build_parser("train")
    from stillroom.pipelines.core import apply_config_file, options

    args = apply_config_file(parser.parse_args(argv), lambda: parser.parse_args(argv))
    fields = {k: getattr(args, k) for k in options(TrainConfig) if hasattr(args, k)}
    config = TrainConfig(**{**fields, "student_kwargs": json.loads(args.student_kwargs), "seeds": None,
                            "online": False, "online_targets": "full"})
    expected = {"deit-s-distilled-imagenet": ("adamw", "deit-hard", 1e-3), "fkd-resnet50-imagenet": ("sgd", "kd", 0.2)}
    opt, loss, lr_at_1024 = expected[name]
    assert (config.opt, config.loss, config.epochs, config.warmup_epochs) == (opt, loss, 300, 5.0)
    assert resolve_lr(config, 8 * config.batch_size) == pytest.approx(lr_at_1024)


def test_nothing_imports_the_loop_back():
    import subprocess
    import sys

    code = ("import sys; import stillroom.student.trainer; print(sorted(m for m in ('stillroom.student.run', "
            "'stillroom.student.train_ray', 'stillroom.services.cli.train') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"  # the loop imports the methods, the config and the recipe, not its callers
    code = ("import sys; import stillroom.student.config, stillroom.student.methods; "
            "print('stillroom.student.trainer' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"

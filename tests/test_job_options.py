"""One definition per job option: the CLI's arguments and the REST spec of each job hold the same options, with
the same help text, choices and bounds, as the job's config declares them (``pipelines.options``)."""

from __future__ import annotations

import argparse
import typing
from typing import Any

import pytest
from pydantic import ValidationError

from stillroom.pipelines.core import UsageError, default_of, flags_of, options
from stillroom.pipelines.labeling import LabelConfig
from stillroom.pipelines.teachers import TeacherTrainConfig
from stillroom.services.cli import build_parser
from stillroom.services.specs import _REST, NOT_OVER_REST, REST_ONLY, SPECS
from stillroom.student.config import TrainConfig

JOBS: dict[str, tuple[tuple[str, ...], type]] = {  # kind -> (CLI command, config)
    "teacher": (("teacher", "train"), TeacherTrainConfig),
    "label": (("label",), LabelConfig),
    "train": (("train",), TrainConfig),
}
# the least each config and spec needs to be made
CONFIG_REQUIRED: dict[str, dict[str, Any]] = {
    "teacher": {"out": "t.pt"},
    "label": {"teachers": ("test_resnet",)},
    "train": {"store": "s", "dataset": "fashion-mnist", "student": "test_resnet", "out": "run"},
}
SPEC_REQUIRED: dict[str, dict[str, Any]] = {
    "teacher": {}, "label": {"teachers": ["test_resnet"]}, "train": {"store": "0123abcd", "student": "test_resnet"},
}


# flags a command takes only to refuse them, in one line that names the right one (no option, so no REST field)
REFUSED = {"label": {"store"}}  # --store names one store; label writes under --store-root (test_cli_errors)


def cli_actions(command: tuple[str, ...]) -> dict[str, argparse.Action]:
    """The command's arguments by dest (``--help`` left out)."""
    parser: argparse.ArgumentParser = build_parser()
    for word in command:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[word]
    return {a.dest: a for a in parser._actions if not isinstance(a, argparse._HelpAction)}


def bounds_of(field: Any) -> dict[str, float]:
    return {name: getattr(m, name) for m in field.metadata for name in ("ge", "gt", "le", "lt") if hasattr(m, name)}


@pytest.mark.parametrize("kind", JOBS)
def test_the_cli_and_the_rest_spec_hold_the_same_options(kind):
    command, config = JOBS[kind]
    actions, spec, excluded = cli_actions(command), SPECS[kind].model_fields, NOT_OVER_REST[kind]
    missing_from_rest = sorted(set(actions) - set(spec) - set(excluded) - REFUSED.get(kind, set()))
    assert not missing_from_rest, f"CLI options of {kind} missing from its REST spec: {missing_from_rest}"
    flags = {flag for a in actions.values() for flag in a.option_strings}
    for name in spec:  # an option the spec has but the CLI lacks: only one set through another flag
        if name not in actions and name not in REST_ONLY[kind]:
            opt = options(config)[name][1]
            assert opt.via and flags_of(name, opt)[0] in flags, f"REST option {name} of {kind} has no CLI flag"
    assert set(excluded) <= set(actions), f"stale exclusions: {sorted(set(excluded) - set(actions))}"
    assert all(reason.strip() for reason in excluded.values())
    assert set(options(config)) - set(excluded) == set(spec) - set(REST_ONLY[kind]), "every option is in the spec"
    assert not set(REST_ONLY[kind]) & set(options(config)), "a REST-only field is no option of the config"


@pytest.mark.parametrize("kind", JOBS)
def test_help_choices_and_bounds_match(kind):
    command, config = JOBS[kind]
    actions, spec = cli_actions(command), SPECS[kind].model_fields
    for name, (f, opt) in options(config).items():
        if name in actions:
            action = actions[name]
            # the option's help, or the flag's own where the flag says the opposite (--no-progress: "hide ...")
            want = opt.cli.get("help", opt.help)
            assert action.help is not None and action.help.replace("%%", "%").startswith(want), name
            assert flags_of(name, opt)[0] in action.option_strings
            if opt.choices is not None and not callable(opt.choices):
                assert tuple(action.choices or ()) == opt.allowed(), name
            elif opt.choices is not None:  # checked by the config, not listed by argparse (it would import timm)
                assert action.choices is None, name
            if action.default is not None and "default" not in opt.cli and type(action.default) is not bool:
                assert action.default == default_of(f), name
        if name not in spec:
            continue
        field = spec[name]
        if "description" not in _REST[kind].get(name, (None, {}))[1]:
            assert field.description == opt.help, name
        assert bounds_of(field) == opt.bounds, name
        if opt.choices is not None:
            literal = next(a for a in (field.annotation, *typing.get_args(field.annotation))
                           if typing.get_origin(a) is typing.Literal)
            assert typing.get_args(literal) == opt.allowed(), name
        if "default" not in _REST[kind].get(name, (None, {}))[1] and default_of(f) is not typing.Any:
            assert field.is_required() or field.get_default(call_default_factory=True) == default_of(f), name


@pytest.mark.parametrize("kind", JOBS)
def test_a_value_out_of_bounds_is_refused_by_the_config_and_by_the_spec_naming_it(kind):
    command, config = JOBS[kind]
    spec = SPECS[kind]
    checked = 0
    for name, (_, opt) in options(config).items():
        for bound, limit in opt.bounds.items():
            outside = limit - 1 if bound == "ge" else limit if bound in ("gt", "lt") else limit + 1
            with pytest.raises(UsageError, match=f"^{flags_of(name, opt)[0]} {outside}: expected"):
                config(**{**CONFIG_REQUIRED[kind], name: outside})
            if name in spec.model_fields:
                with pytest.raises(ValidationError) as refused:
                    spec(**{**SPEC_REQUIRED[kind], name: outside})
                assert [e["loc"] for e in refused.value.errors()] == [(name,)], name
            checked += 1
        if opt.choices is not None:
            with pytest.raises(UsageError, match=f"unknown {flags_of(name, opt)[0]} 'no-such'"):
                config(**{**CONFIG_REQUIRED[kind], name: "no-such"})
    assert checked >= 5


def test_every_train_option_reaches_rest():
    fields = SPECS["train"].model_fields
    for name in ("tat_variant", "tat_weight", "tat_groups", "tat_patches_per_group", "tat_anchors", "student_layer",
                 "distill_token", "adv_weight", "disc_lr", "deit_soft_reduction", "mealv2_form", "online_targets",
                 "weight_decay", "seed", "max_steps", "eval_split"):
        assert name in fields, name
    spec = SPECS["train"](store="0123abcd", student="test_resnet", loss="tat", tat_variant="patch-anchor",
                          tat_groups=2, tat_patches_per_group=4, tat_anchors=3, tat_weight=2.0, student_layer="layer3")
    config = TrainConfig(**{**spec.model_dump(exclude=set(REST_ONLY["train"])), "dataset": "fashion-mnist",
                            "store": "s", "out": "run"})
    assert (config.tat_variant, config.tat_patches_per_group, config.student_layer) == ("patch-anchor", 4, "layer3")

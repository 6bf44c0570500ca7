"""One definition per job option: a config dataclass's fields carry their help text, bounds, choices and CLI
flag (``option(...)``), from which the CLI's arguments (``add_arguments``), the config's own checks
(``check_options``) and the REST spec (``services.specs``) are all derived.

A config is a frozen, keyword-only dataclass; each job option is declared once::

    epochs: int = option(2, help="passes over the training set", ge=1, le=1000)

A field without ``option`` metadata is no option (e.g. ``LabelConfig.extra``): no flag, no spec field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from stillroom.pipelines.core.errors import UsageError

BOUNDS = ("ge", "gt", "le", "lt")


@dataclass(frozen=True)
class Option:
    """What a config field says about itself beyond its type and default."""

    help: str
    flags: tuple[str, ...] = ()  # CLI flags; default: ``--`` + the field name with dashes
    bounds: dict[str, float] = field(default_factory=dict)  # ge/gt/le/lt, as pydantic names them
    # the allowed values, or a function that lists them when asked (a registry that may grow, e.g. methods)
    choices: tuple[str | int, ...] | Callable[[], Iterable[str]] | None = None
    cli: dict[str, Any] = field(default_factory=dict)  # argparse keywords that differ from the derived ones
    via: str | None = None  # set through another flag (why), not a flag of its own

    def allowed(self) -> tuple[str | int, ...] | None:
        """The allowed values now (``None``: any)."""
        return tuple(self.choices()) if callable(self.choices) else self.choices


def option(default: Any = MISSING, *, help: str, flags: tuple[str, ...] = (), ge: float | None = None,
           gt: float | None = None, le: float | None = None, lt: float | None = None,
           choices: tuple[str | int, ...] | Callable[[], Iterable[str]] | None = None,
           cli: dict[str, Any] | None = None, via: str | None = None,
           default_factory: Any = MISSING) -> Any:
    """A dataclass field that is a job option (see the module docstring)."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    meta = {"option": Option(help, flags, bounds, choices, cli or {}, via)}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def options(config: type) -> dict[str, tuple[dataclasses.Field, Option]]:
    """The job options of a config class, in declaration order."""
    return {f.name: (f, f.metadata["option"]) for f in dataclasses.fields(config) if "option" in f.metadata}


def flags_of(name: str, opt: Option) -> tuple[str, ...]:
    return opt.flags or ("--" + name.replace("_", "-"),)


def base_type(annotation: Any) -> Any:
    """``int | None`` -> ``int``; other annotations as they are."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0] if len(args) == 1 else annotation
    return annotation


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return MISSING


def add_arguments(parser: argparse.ArgumentParser, config: type, config_file: bool = False) -> None:
    """One argparse argument per option of ``config`` (``via`` options excepted), its dest the field's name.
    A tuple or dict option arrives as text for the command to parse (``cli`` says how). ``config_file``: also
    ``--config FILE.yaml`` (``apply_config_file``), which may hold the required options too."""
    hints = typing.get_type_hints(config)
    required: list[str] = []
    for name, (f, opt) in options(config).items():
        if opt.via:
            continue
        kind = base_type(hints[name])
        default = default_of(f)
        kwargs: dict[str, Any] = {"dest": name, "help": opt.help.replace("%", "%%")}
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = kind if kind in (int, float) else str
            if default is MISSING:
                kwargs["required"] = True
            else:
                kwargs["default"] = default
                if default is not None and default is not False and "default" not in opt.help:
                    kwargs["help"] += " (default: %(default)s)"
        if opt.choices is not None and not callable(opt.choices):
            # a callable's choices (timm's optimizers) are not listed here: listing them imports timm (and with it
            # torchvision), 3 s of every command's start; the config checks them (check_options)
            kwargs["choices"] = opt.allowed()
        kwargs.update(opt.cli)
        if "default" in opt.cli:
            kwargs.pop("required", None)
        if "nargs" in opt.cli or kwargs.get("action") == "store_false":
            kwargs.pop("action" if "nargs" in opt.cli else "type", None)
        if config_file and kwargs.pop("required", False):  # a --config file may give it: checked after it is read
            kwargs["default"] = None
            required.append(name)
        parser.add_argument(*flags_of(name, opt), **kwargs)
    if config_file:
        parser.add_argument("--config", dest="config_file", default=None, metavar="FILE.yaml", help=CONFIG_FILE_HELP)
        parser.set_defaults(config_parser=parser, config_class=config, config_required=tuple(required))


def check_options(config: Any) -> None:
    """UsageError naming the flag for an option outside its bounds or choices (None: unset, allowed)."""
    for name, (_, opt) in options(type(config)).items():
        value = getattr(config, name)
        if value is None:
            continue
        flag = flags_of(name, opt)[0]
        allowed = opt.allowed()
        if allowed is not None and value not in allowed:
            raise UsageError(f"unknown {flag} {value!r}: expected one of {', '.join(map(str, allowed))}")
        if opt.bounds and not isinstance(value, int | float):
            continue
        b = opt.bounds
        low = ("ge", b["ge"]) if "ge" in b else ("gt", b["gt"]) if "gt" in b else None
        high = ("le", b["le"]) if "le" in b else ("lt", b["lt"]) if "lt" in b else None
        ok = ((low is None or (value >= low[1] if low[0] == "ge" else value > low[1]))
              and (high is None or (value <= high[1] if high[0] == "le" else value < high[1])))
        if not ok:
            left = f"{low[1]:g} {'<=' if low[0] == 'ge' else '<'} " if low else ""
            right = f" {'<=' if high[0] == 'le' else '<'} {high[1]:g}" if high else ""
            raise UsageError(f"{flag} {value}: expected {left}value{right}")


def default_from(config: type, name: str, default: Any) -> Any:
    """The option ``name`` of ``config`` (its help, bounds, choices, flag) with another default: a config that
    inherits options (``pipelines.train_recipe.RecipeOptions``) gives some its own default without declaring
    them twice."""
    meta = {f.name: f for f in dataclasses.fields(config)}[name].metadata
    return field(default=default, metadata=meta)


CONFIG_FILE_HELP = ("a YAML file of options under their names with underscores (as timm's --config: 'opt: sgd', "
                    "'warmup_epochs: 5'); flags given as well override it")


def read_config_file(path: str, config: type) -> dict[str, Any]:
    """The options a ``--config`` YAML file sets, as the command's argparse defaults: each key an option of
    ``config``, each value of the option's type (lists and mappings as the text their flag takes)."""
    import json
    from pathlib import Path

    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise UsageError(f"--config {path}: cannot read it ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise UsageError(f"--config {path}: not YAML ({str(e).splitlines()[0]})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of option names to values")
    known = {name: (f, opt) for name, (f, opt) in options(config).items() if not opt.via}
    hints = typing.get_type_hints(config)
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key)
        if name not in known:
            hint = f" (did you mean {name.replace('-', '_')}?)" if name.replace("-", "_") in known else ""
            raise UsageError(f"--config {path}: {name!r} is no option{hint}; --help lists them (a flag's name with "
                             "underscores for dashes)")
        kind = base_type(hints[name])
        if value is None:
            out[name] = None
        elif isinstance(value, dict):
            out[name] = json.dumps(value)
        elif isinstance(value, list | tuple):
            out[name] = ",".join(str(v) for v in value)
        elif kind is bool:
            if not isinstance(value, bool):
                raise UsageError(f"--config {path}: {name}: expected true or false, got {value!r}")
            out[name] = value
        elif kind in (int, float):
            # YAML 1.1 reads 5e-4 (no dot) as text: a number written so is a number
            try:
                number = kind(value) if not isinstance(value, bool) else None
            except (TypeError, ValueError):
                number = None
            if number is None or (kind is int and isinstance(value, float) and not value.is_integer()):
                raise UsageError(f"--config {path}: {name}: expected a{'n integer' if kind is int else ' number'}, "
                                 f"got {value!r}")
            out[name] = number
        else:
            out[name] = str(value)
    return out


def apply_config_file(args: argparse.Namespace, parse: Callable[[], argparse.Namespace]) -> argparse.Namespace:
    """``args`` again, parsed by ``parse`` with the ``--config`` file's values as the command's defaults (so
    that flags override them), when the command took one and it was given; then the required options, from the
    flags or the file, are checked (argparse's error, exit 2)."""
    if not hasattr(args, "config_parser"):
        return args
    if args.config_file:
        args.config_parser.set_defaults(**read_config_file(args.config_file, args.config_class))
        args = parse()
    flags = {name: flags_of(name, opt)[0] for name, (_, opt) in options(args.config_class).items()}
    missing = [flags[name] for name in args.config_required if getattr(args, name) is None]
    if missing:
        args.config_parser.error(f"the following arguments are required: {', '.join(missing)}")
    return args


def json_object(text: str, flag: str, *, file: bool = False, example: str = '{"key": 1}') -> dict[str, Any]:
    """The JSON object a flag was given (``--model-kwargs``, ``--student-kwargs``, ``--spec``), as a dict.

    With ``file``, a value that does not start with ``{`` and names a file is read from that file. Raises
    ``UsageError`` naming the flag and the value when it is not JSON, or is JSON but not an object."""
    raw = Path(text).read_text() if file and not text.lstrip().startswith("{") and Path(text).is_file() else text
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        what = "neither a JSON object nor a JSON file" if file else "not JSON"
        raise UsageError(f"{flag} {text!r} is {what}: {e.msg}") from None
    if not isinstance(value, dict):
        raise UsageError(f"{flag} must be a JSON object, e.g. '{example}'")
    return value

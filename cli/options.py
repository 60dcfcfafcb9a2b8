"""Command-line options made from a config class: every field declared with help
(:func:`approxdarts_np.runs.config.setting`) is an option ``--field-name`` whose help shows the quick and
paper defaults, so a setting, its default and its help are written once, in the config."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.markup import escape

from approxdarts_np.runs.config import PRESETS, RunSettings, option_name
from approxdarts_np_cli._common import run_with_interrupts
from approxdarts_np_cli.progress import EpochProgress

#: ``--preset``: the config class's ``quick()`` or ``paper()``.
Preset = Enum("Preset", {name: name for name in PRESETS}, type=str)


def option_fields(config_cls) -> list[dataclasses.Field]:
    """The fields of ``config_cls`` that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(config_cls) if f.metadata.get("help")]


def _option_type(config_cls, field: dataclasses.Field):
    """The type the option is typed as: ``text``, a Path for folders, the preset enum, else the field's."""
    if field.metadata["text"] is not None:
        return field.metadata["text"]
    if field.name == "preset":
        return Preset
    if field.name.endswith("_dir"):
        return Path
    hint = typing.get_type_hints(config_cls)[field.name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _show(value) -> str:
    return "all" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _help(config_cls, field: dataclasses.Field) -> str:
    """The field's help and, in brackets, its default: ``shown``, else the quick and paper presets' values
    (a config without presets: its own default)."""
    text, shown = field.metadata["help"], field.metadata["shown"]
    if shown is False:
        return escape(text)
    if isinstance(shown, str):
        return escape(f"{text} [{shown}]")
    if not hasattr(config_cls, "paper"):
        return escape(f"{text} [{_show(getattr(config_cls(), field.name))}]")
    quick, paper = getattr(config_cls.quick(), field.name), getattr(config_cls.paper(), field.name)
    if quick == paper:
        return escape(f"{text} [{_show(quick)}]")
    return escape(f"{text} [quick {_show(quick)}, paper {_show(paper)}]")


def _help_across(field: dataclasses.Field, runs: dict) -> str:
    """The help of a setting passed to runs of several kinds: ``text [kind: quick Q, paper P; ...]``."""
    name = field.name
    if field.metadata["shown"] is False:
        return escape(field.metadata["help"])
    parts = [f"{kind}: quick {_show(getattr(cls.quick(), name))}, paper {_show(getattr(cls.paper(), name))}"
             for kind, cls in runs.items()]
    return escape(f"{field.metadata['help']} [{'; '.join(parts)}]")


def _parameter(config_cls, field: dataclasses.Field, help: str) -> inspect.Parameter:
    option = typer.Option(None, option_name(field.name), *field.metadata["aliases"], help=help)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                             annotation=Optional[_option_type(config_cls, field)])


def option_parameters(config_cls, first: tuple = ()) -> list[inspect.Parameter]:
    """One typer option per option field, all defaulting to None (not given); the fields named in ``first``
    lead the list."""
    fields = sorted(option_fields(config_cls), key=lambda f: f.name not in first)
    return [_parameter(config_cls, field, _help(config_cls, field)) for field in fields]


def config_values(config_cls, typed: dict, names=None) -> dict:
    """The config fields the user gave, from the options' values (None: not given); ``names``: only these."""
    values = {}
    for field in option_fields(config_cls):
        if names is not None and field.name not in names:
            continue
        value = typed.get(field.name)
        if value is None:
            continue
        if field.metadata["parse"] is not None:
            values.update(field.metadata["parse"](value))
        else:
            values[field.name] = value.value if isinstance(value, Enum) else \
                str(value) if isinstance(value, Path) else value
    return values


def config_command(config_cls, first: tuple = (), passed: tuple = (), runs: dict | None = None) -> Callable:
    """Decorate ``command(options, **others)`` into a typer command whose options are the option fields of
    ``config_cls`` (those in ``first`` leading), then the :class:`RunSettings` fields named in ``passed`` (a
    sweep's settings for its runs; their help shows the presets of each of ``runs``, kind: config class),
    then ``others`` (declared as usual). ``options`` holds the config fields given, and the passed ones
    as ``options["run_options"]``."""
    def decorate(func):
        others = list(inspect.signature(func).parameters.values())[1:]
        hints = typing.get_type_hints(func)
        others = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints.get(p.name, p.annotation))
                  for p in others]
        own = [f.name for f in option_fields(config_cls)]
        passed_fields = [f for f in option_fields(RunSettings) if f.name in passed]
        params = option_parameters(config_cls, first) + [
            _parameter(RunSettings, f, _help_across(f, runs)) for f in passed_fields]

        def command(**typed):
            options = config_values(config_cls, {name: typed.pop(name) for name in own})
            run_options = config_values(RunSettings, {f.name: typed.pop(f.name) for f in passed_fields}, passed)
            if run_options:
                options["run_options"] = run_options
            return func(options, **typed)

        command.__name__, command.__qualname__ = func.__name__, func.__qualname__
        command.__doc__, command.__module__ = func.__doc__, func.__module__
        command.__signature__ = inspect.Signature(params + others)
        return command

    return decorate


def start_run(config_cls, run: Callable, options: dict, resume: Path | None, **kwargs) -> tuple[Path, Callable]:
    """(folder, run) of a search or training: a new run from the preset and ``options``, or the run saved in
    ``resume`` with ``options`` as its overrides (an ``--output-dir`` equal to ``resume`` is no change)."""
    if resume is not None:
        if options.get("output_dir") == str(resume):
            options.pop("output_dir")
        return resume, functools.partial(run, resume=resume, overrides=options, **kwargs)
    make = config_cls.paper if options.pop("preset", "quick") == "paper" else config_cls.quick
    config = make(**options)
    return Path(config.output_dir), functools.partial(run, config, **kwargs)


def run_with_progress(console, kind: str, folder: Path, run: Callable) -> dict:
    """Run a search or training with its progress bar; Ctrl-C and signals as :func:`run_with_interrupts`."""
    with EpochProgress(console, kind, header=f"{kind} → {folder}") as progress:
        return run_with_interrupts(functools.partial(run, progress=progress), console,
                                   f"approxdarts-np {kind} --resume {folder}", folder)

"""`beam_options/*.yaml`: one file per way of running `kiln prepare`, turned into Beam flags.

A file is a YAML mapping of Beam pipeline options (the names Beam's own flags use, without `--`)
plus an optional `kiln:` section of kiln's own `prepare` settings (the keys are pipeline.config's
setting keys, the flags' names with underscores):

    runner: DataflowRunner            # -> --runner=DataflowRunner
    save_main_session: true           # -> --save_main_session      (a boolean flag)
    experiments: [use_runner_v2]      # -> --experiments=use_runner_v2 (a list repeats the flag)
    kiln:
      samples_per_shard: 5000         # default for --samples-per-shard
      gpu_resource_hint: "type:nvidia-l4;count:1;install-nvidia-driver"

    beam_argv, kiln_defaults = load_options_file("beam_options/dataflow.yaml")
    beam_argv = merge_beam_args(beam_argv, cli_beam_args)      # the command line wins

The command line always wins: a Beam option given on the command line replaces the file's value
(for options Beam lets you repeat, such as `--experiments`, the command line's values are added to
the file's), and a kiln flag typed on the command line beats the file's `kiln:` value
(`pipeline.config.config_from_namespace`, which checks every `kiln:` value against the schema). Option names are checked against Beam's own option classes, so a typo in
a committed file fails loudly instead of being dropped with a warning at submission time.

The model stages (CaptionToxicity, ImageFilters, EmbedT5) alone get the GPU on Dataflow: the
`kiln: gpu_resource_hint` value becomes an `accelerator` resource hint on exactly those
transforms (`model_stage_hints`, `hinted`), never on Download or the writers.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import yaml

from pipeline.errors import UserError

KILN_SECTION = "kiln"
# The labels of the transforms that load a model; the only ones an accelerator hint goes on.
MODEL_STAGE_LABELS = ("CaptionToxicity", "ImageFilters", "EmbedT5")


# The placeholders the shipped files use for values only their user knows (project, bucket, image).
PLACEHOLDER = re.compile(r"\byour-(project|bucket)\b")


class OptionsFileError(UserError, ValueError):
    """An options file that is not a mapping, names an unknown option, or has a bad value."""


# -- Beam's option parser, for names, aliases and flag kinds ---------------------------------------


def _beam_parser() -> argparse.ArgumentParser:
    """Every option Beam's PipelineOptions subclasses define (as PipelineOptions.get_all_options
    builds it), so names, aliases (`machine_type` = `worker_machine_type`) and kinds are Beam's."""
    from apache_beam.options import pipeline_options as po

    parser = po._BeamArgumentParser(allow_abbrev=False)  # noqa: SLF001 - the parser Beam itself uses
    seen = {}
    for cls in _all_subclasses(po.PipelineOptions):
        seen.setdefault(f"{cls.__module__}.{cls.__qualname__}", cls)
    for cls in seen.values():
        try:
            cls._add_argparse_args(parser)  # noqa: SLF001
        except argparse.ArgumentError:
            pass  # an options class defined twice (a test's, or a re-imported module's)
    return parser


def _all_subclasses(cls):
    out = []
    for sub in cls.__subclasses__():
        out.append(sub)
        out.extend(_all_subclasses(sub))
    return out


def _beam_action(parser: argparse.ArgumentParser, name: str):
    return parser._option_string_actions.get(f"--{name}")  # noqa: SLF001


def _is_flag(action) -> bool:
    """A flag that takes no value (store_true / store_false / store_const)."""
    return action is not None and action.nargs == 0


def _is_repeatable(action) -> bool:
    """An option whose repeats accumulate (`--experiments a --experiments b`): argparse's append /
    extend, and Beam's own accumulating actions (comma-separated lists, JSON dict unions)."""
    if action is None:
        return False
    if isinstance(action, (argparse._AppendAction, argparse._ExtendAction)):  # noqa: SLF001
        return True
    return type(action).__name__ in ("_CommaSeparatedListAction", "_DictUnionAction", "_GcsCustomAuditEntriesAction")


class BeamFlagError(UserError):
    """A flag that is neither kiln's nor Beam's (a typo), a Beam flag with a bad value, or an unknown runner."""


def check_beam_args(argv: list[str], kiln_flags: tuple[str, ...] = ()) -> None:
    """Refuse, before any work, what Beam itself would only warn about and drop: a flag neither kiln
    nor Beam knows (with the closest names, kiln's `kiln_flags` included), a stray argument, a bad
    value for a Beam option, and a --runner Beam cannot create."""
    import difflib

    parser = _beam_parser()

    def error(message):
        raise BeamFlagError(f"{message} (Beam pipeline options; see `kiln prepare --help`)")

    parser.error = error
    known, unknown = parser.parse_known_args(list(argv))
    for arg in unknown:
        if not arg.startswith("-"):
            raise BeamFlagError(f"unexpected argument {arg!r}: every kiln prepare setting is a --flag (did you forget a flag name, or quote a glob?)")
        name = arg.split("=", 1)[0]
        names = list(kiln_flags) + [o for o in parser._option_string_actions if o.startswith("--")]  # noqa: SLF001
        close = difflib.get_close_matches(name, names, n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close else "; see `kiln prepare --help` for kiln's flags and Beam's pipeline options for the rest"
        raise BeamFlagError(f"unknown flag {name}: neither a kiln prepare flag nor a Beam pipeline option{hint}")
    runner = getattr(known, "runner", None)
    if runner:
        from apache_beam.runners.runner import _RUNNER_MAP  # noqa: PLC2701 - the names create_runner accepts

        if runner.lower() not in _RUNNER_MAP and runner.lower() + "runner" not in _RUNNER_MAP:
            if "." not in runner:
                close = difflib.get_close_matches(runner.lower(), list(_RUNNER_MAP), n=1, cutoff=0.8)
                hint = f" (did you mean {close[0]}?)" if close else ""
                raise BeamFlagError(f"--runner {runner}: not a Beam runner{hint}; use DirectRunner locally, or "
                                    f"DataflowRunner, FlinkRunner, SparkRunner, PortableRunner, or a PipelineRunner's full import path")
            import importlib

            module, _, cls = runner.rpartition(".")
            try:
                found = getattr(importlib.import_module(module), cls, None)
            except ImportError as err:
                raise BeamFlagError(f"--runner {runner}: cannot import {module} ({err}); install it or name another runner") from None
            if found is None:
                raise BeamFlagError(f"--runner {runner}: {module} has no {cls}")


# -- YAML -> flags ---------------------------------------------------------------------------------


def options_to_argv(options: dict, *, source: str = "options") -> list[str]:
    """A mapping of Beam option names to values -> Beam command-line flags, in the mapping's order.

    `true` gives the bare flag (`--save_main_session`); `false` or `null` gives nothing (write the
    option's own negative form, e.g. `no_use_public_ips: true`, to turn a default-on option off);
    a list repeats the flag once per item; a mapping is passed as JSON; anything else as `str()`.
    """
    parser = _beam_parser()
    argv = []
    for key, value in options.items():
        if not isinstance(key, str) or not key or key.startswith("-"):
            raise OptionsFileError(f"{source}: option names are Beam's flag names without '--', got {key!r}")
        action = _beam_action(parser, key)
        if action is None:
            raise OptionsFileError(f"{source}: {key!r} is not a Beam pipeline option (a typo? kiln's own settings go under '{KILN_SECTION}:')")
        if value is None or value is False:
            if value is False and not _is_flag(action):
                # false for a valued option (e.g. save_main_session has no value, but
                # use_public_ips does not exist as a flag) is ambiguous: say so rather than guess.
                raise OptionsFileError(f"{source}: {key}: false is only meaningful for a flag; omit the option or give a value")
            continue
        if value is True:
            if not _is_flag(action):
                raise OptionsFileError(f"{source}: {key} takes a value, got true")
            argv.append(f"--{key}")
            continue
        if _is_flag(action):
            raise OptionsFileError(f"{source}: {key} is a flag: write true (or false to leave it off), got {value!r}")
        items = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not _is_repeatable(action) and len(value) != 1:
            raise OptionsFileError(f"{source}: {key} takes one value, got a list of {len(value)}")
        for item in items:
            if isinstance(item, (dict, list)):
                item = json.dumps(item, sort_keys=True)
            elif isinstance(item, bool):
                item = str(item).lower()
            if action.choices is not None:
                try:
                    typed = action.type(item) if action.type is not None else item
                except (TypeError, ValueError):
                    typed = item
                if typed not in action.choices and str(item) not in action.choices:
                    raise OptionsFileError(f"{source}: {key}: {item!r} is not one of {list(action.choices)}")
            argv.append(f"--{key}={item}")
    return argv


def load_options_file(path: str | Path) -> tuple[list[str], dict]:
    """A `beam_options/*.yaml` file -> (Beam argv, kiln defaults from its `kiln:` section)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise OptionsFileError(f"options file not found: {path}") from None
    except yaml.YAMLError as err:
        raise OptionsFileError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    except IsADirectoryError:
        raise OptionsFileError(f"--options {path} is a directory: give a YAML file such as beam_options/direct.yaml") from None
    except UnicodeDecodeError as err:
        raise OptionsFileError(f"--options {path} is not UTF-8 text ({err.reason} at byte {err.start}): give a YAML file") from None
    except OSError as err:
        raise OptionsFileError(f"--options {path} cannot be read: {err.strerror or err}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise OptionsFileError(f"{path}: an options file is a YAML mapping of option: value, got {type(data).__name__}")
    data = dict(data)
    kiln = data.pop(KILN_SECTION, None) or {}
    if not isinstance(kiln, dict):
        raise OptionsFileError(f"{path}: '{KILN_SECTION}:' must be a mapping of kiln prepare settings")
    kiln = {str(k).replace("-", "_"): v for k, v in kiln.items()}
    return options_to_argv(data, source=str(path)), kiln


# -- merging with the command line -----------------------------------------------------------------


def _split_flags(argv: list[str], parser: argparse.ArgumentParser) -> list[tuple[str | None, list[str]]]:
    """argv -> [(canonical dest or None, tokens)], keeping each option's value token with it."""
    out, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if not tok.startswith("--") or tok == "--":
            out.append((None, [tok]))
            i += 1
            continue
        name, eq, _ = tok[2:].partition("=")
        action = _beam_action(parser, name) or _beam_action(parser, name.replace("-", "_"))
        dest = action.dest if action is not None else name.replace("-", "_")
        tokens = [tok]
        takes_value = (action is None or not _is_flag(action)) and not eq
        if takes_value and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            tokens.append(argv[i + 1])
            i += 1
        out.append((dest, tokens))
        i += 1
    return out


# Options that configure the file's environment_type: a command-line --environment_type replaces
# them too (Beam refuses environment_config with LOOPBACK, and a DOCKER image option with PROCESS).
_ENVIRONMENT_DESTS = ("environment_config", "environment_options")


def merge_beam_args(file_args: list[str], cli_args: list[str]) -> list[str]:
    """The file's Beam flags, then the command line's; an option on the command line replaces the
    file's value (for a repeatable option such as --experiments, the command line adds to it). A
    command-line --environment_type also drops the file's environment_config / environment_options,
    which belong to the file's environment type (spark.yaml's DOCKER image under LOOPBACK)."""
    parser = _beam_parser()
    cli = _split_flags(list(cli_args), parser)
    cli_dests = {d for d, _ in cli if d is not None}
    kept = []
    for dest, tokens in _split_flags(list(file_args), parser):
        if dest in _ENVIRONMENT_DESTS and "environment_type" in cli_dests:
            continue
        if dest is None or dest not in cli_dests:
            kept.extend(tokens)
            continue
        action = next((a for a in parser._actions if a.dest == dest), None)  # noqa: SLF001
        if _is_repeatable(action):
            kept.extend(tokens)
    cli_tokens = [t for _, tokens in cli for t in tokens]
    # A repeatable value given in both places appears once.
    seen, merged = set(), []
    for dest, tokens in _split_flags(kept + cli_tokens, parser):
        key = (dest, tuple(tokens)) if dest is not None else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        merged.extend(tokens)
    return merged


def placeholders(argv: list[str]) -> list[str]:
    """The flags in argv whose value is still a shipped placeholder (your-project, your-bucket)."""
    return [tok for tok in argv if PLACEHOLDER.search(tok)]


# -- resource hints on the model stages ------------------------------------------------------------


def model_stage_hints(models) -> dict:
    """Resource-hint kwargs for the model stages: {"accelerator": "..."} or {} (no GPU hint).

    `models` is the run's ModelsConfig (`--gpu-resource-hint`, or `kiln: gpu_resource_hint` in an
    options file). The value uses Dataflow's accelerator format, e.g.
    "type:nvidia-l4;count:1;install-nvidia-driver" (runners that do not know the hint ignore it).
    """
    hint = (models.gpu_resource_hint or "").strip()
    return {"accelerator": hint} if hint else {}


def hinted(transform, hints: dict):
    """`transform.with_resource_hints(**hints)`, or the transform itself when there are none."""
    return transform.with_resource_hints(**hints) if hints else transform


def transform_resource_hints(pipeline_proto) -> dict[str, dict[str, bytes]]:
    """{transform unique name: its environment's resource hints} for every leaf transform of a
    `Pipeline.to_runner_api()` proto (composites carry no environment; their leaves do)."""
    comps = pipeline_proto.components
    out = {}
    for t in comps.transforms.values():
        if t.environment_id and not t.subtransforms:
            env = comps.environments[t.environment_id]
            out[t.unique_name] = dict(env.resource_hints)
    return out

"""TOML config files and environment variables for any argparse command line.

Every option of a (sub)command can live in a flat TOML file under its long name, with
dashes or underscores (``round-deadline = 300`` or ``round_deadline = 300``), and in an
environment variable ``PREFIX`` + the name in capitals (``GKT_HUB_ROUND_DEADLINE=300``).
Precedence: command-line flags > environment > file > built-in defaults. Values are
checked against the option's own type and choices before argparse runs, so an error names
the key and where it came from. Generic over parsers: nothing here knows the options.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on the devices' Python 3.9/3.10
    import tomli as tomllib

SKIP = {"help", "config", "print_config"}
SECRET_WORDS = ("password", "secret", "token")
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


class ConfigError(ValueError):
    """A bad config file, key or value; the message names the key and its source."""


def add_config_args(p: argparse.ArgumentParser, env_prefix: str) -> None:
    p.add_argument("--config", metavar="FILE",
                   help=f"TOML file of options (same names as the flags); "
                        f"precedence: flags > {env_prefix}* environment > file > defaults")
    p.add_argument("--print-config", action="store_true",
                   help="print the resulting configuration as TOML and exit")


def options(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """dest -> action for every option a config may set."""
    return {a.dest: a for a in p._actions
            if a.option_strings and a.dest not in SKIP and a.dest != argparse.SUPPRESS}


def _is_flag(action: argparse.Action) -> bool:
    return isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))


def coerce(action: argparse.Action, value: object, where: str) -> object:
    """A TOML value checked (and, from the environment, converted) for ``action``."""
    name = action.option_strings[-1].lstrip("-")
    if _is_flag(action):
        if isinstance(value, str) and value.lower() in TRUE | FALSE:
            value = value.lower() in TRUE
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: '{name}' must be true or false, got {value!r}")
        return value
    if isinstance(action, argparse._AppendAction) or action.nargs not in (None, "?", 0):
        # a list option (repeatable or nargs): a TOML array, every element checked
        if not isinstance(value, list):
            value = str(value).split() if isinstance(value, str) else [value]
        one = argparse.Action(action.option_strings, action.dest, type=action.type,
                              choices=action.choices)
        return [coerce(one, v, where) for v in value]
    kind = action.type
    if isinstance(value, bool) or (not isinstance(value, str) and kind in (None, str)):
        raise ConfigError(f"{where}: '{name}' must be a string, got {value!r}")
    if kind is int and isinstance(value, float):
        raise ConfigError(f"{where}: '{name}' must be an integer, got {value!r}")
    if kind is not None:
        try:
            value = kind(value)
        except (TypeError, ValueError) as err:
            what = {int: "an integer", float: "a number"}.get(kind, "valid")
            raise ConfigError(f"{where}: '{name}' must be {what}, got {value!r}") from err
    if action.choices is not None and value not in action.choices:
        raise ConfigError(f"{where}: '{name}' must be one of "
                          f"{', '.join(map(str, action.choices))}; got {value!r}")
    return value


def read_file(p: argparse.ArgumentParser, path: str) -> dict[str, object]:
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
    opts = options(p)
    out: dict[str, object] = {}
    for key, value in raw.items():
        dest = key.replace("-", "_")
        if dest not in opts:
            raise ConfigError(f"{path}: unknown key '{key}' (known: "
                              f"{', '.join(sorted(k.replace('_', '-') for k in opts))})")
        out[dest] = coerce(opts[dest], value, path)
    return out


def read_env(p: argparse.ArgumentParser, prefix: str,
             environ: Mapping[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for dest, action in options(p).items():
        var = prefix + dest.upper()
        if var in environ:
            out[dest] = coerce(action, environ[var], f"environment variable {var}")
    return out


def subparser(parser: argparse.ArgumentParser,
              argv: Sequence[str]) -> argparse.ArgumentParser | None:
    """The subcommand parser ``argv`` selects (its first word that names one)."""
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            for word in argv:
                if word in a.choices:
                    return a.choices[word]
    return None


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str] | None, env_prefix: str,
               environ: Mapping[str, str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` with the selected subcommand's values taken from its
    ``--config`` file and the environment first; ``--print-config`` prints the result
    and exits 0 (as ``--help`` does). Raises ConfigError on bad input."""
    argv = list(sys.argv[1:] if argv is None else argv)
    sub = subparser(parser, argv) or parser
    if "config" not in {a.dest for a in sub._actions}:
        return parser.parse_args(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    known, _ = pre.parse_known_args(argv)
    values = read_file(sub, known.config) if known.config else {}
    values.update(read_env(sub, env_prefix, os.environ if environ is None else environ))
    opts = options(sub)
    for dest in values:
        opts[dest].required = False  # given by the file or the environment
    sub.set_defaults(**values)
    args = parser.parse_args(argv)
    if getattr(args, "print_config", False):  # like --help: print and exit
        print(to_toml(sub, args), end="")
        raise SystemExit(0)
    return args


def parse_or_report(parser: argparse.ArgumentParser, argv: Sequence[str] | None,
                    env_prefix: str) -> argparse.Namespace | None:
    """``parse_args``, or None after printing the ConfigError as ``PROG: error: ...``
    (the caller exits with its program's bad-arguments code)."""
    try:
        return parse_args(parser, argv, env_prefix)
    except ConfigError as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return None


def to_toml(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The options of ``args`` as a flat TOML file that ``read_file`` accepts back."""
    lines = []
    for dest in options(p):
        value = getattr(args, dest, None)
        key = dest.replace("_", "-")
        if value is None:
            lines.append(f"# {key} = (not set)")
        elif any(w in dest for w in SECRET_WORDS):  # printed configs end up in tickets
            lines.append(f"# {key} = (set, not shown)")
        elif isinstance(value, bool):
            lines.append(f"{key} = {json.dumps(value)}")
        elif isinstance(value, (int, float)):  # repr: 0.001, inf, nan are TOML too
            lines.append(f"{key} = {value!r}")
        elif isinstance(value, (list, tuple)):  # of strings and numbers: JSON is TOML here
            lines.append(f"{key} = {json.dumps(list(value))}")
        else:  # a JSON string is a valid TOML basic string
            lines.append(f"{key} = {json.dumps(str(value))}")
    return "\n".join(lines) + "\n"


"""The `attnlab` command: typed configs (YAML files, dotted overrides) through jsonargparse.

Commands come from one table (`attnlab.commands.COMMANDS`); this file turns each command's config dataclass
into options, with the fields' docstrings as help, and bad input into one line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import re
import sys

from .errors import UserError


def _flatten(msg: str) -> str:
    return re.sub(r"\s+", " ", msg).strip()


def _typed(cls, help_: str):
    from jsonargparse import ActionConfigFile, ArgumentParser

    p = ArgumentParser(exit_on_error=False, description=help_)
    p.add_argument("--config", action=ActionConfigFile, help="a YAML config file (see --print_config)")
    p.add_class_arguments(cls, nested_key=None, as_group=False)
    for action in p._actions:
        # Booleans may stand alone (`--quick`) as well as take a value (`--quick false`).
        if getattr(action, "_typehint", None) is bool or action.type is bool:
            action.nargs, action.const = "?", True
    return p


def _config_class(mod, argv):
    """A command's config class; a command whose options depend on a choice (train --task) picks it from argv."""
    return mod.config_class(argv) if hasattr(mod, "config_class") else mod.Config


def build_parser(argv: list[str] = ()):
    from jsonargparse import ArgumentParser, set_parsing_settings

    from .commands import COMMANDS

    set_parsing_settings(docstring_parse_attribute_docstrings=True)
    parser = ArgumentParser(prog="attnlab", description="A lab for Transformers whose attention can be swapped.",
                            exit_on_error=False)
    sub = parser.add_subcommands(dest="command")
    for name, (module, help_) in COMMANDS.items():
        mod = importlib.import_module(module)
        if not hasattr(mod, "entries"):
            sub.add_subcommand(name, _typed(_config_class(mod, argv), help_), help=help_)
            continue
        # jsonargparse wants a level's subcommand attached before the next level is added under it.
        group = ArgumentParser(exit_on_error=False, description=help_)
        sub.add_subcommand(name, group, help=help_)
        inner = group.add_subcommands(dest="name")
        for entry, (cls, entry_help) in mod.entries().items():
            inner.add_subcommand(entry, _typed(cls, entry_help), help=entry_help)
    return parser


def _config(ns, cls):
    from .config import from_dict

    d = ns.as_dict() if hasattr(ns, "as_dict") else dict(ns)
    d.pop("config", None)
    d.pop("__path__", None)
    return from_dict(cls, d)


def dispatch(ns, argv: list[str] = ()):
    from .commands import COMMANDS

    mod = importlib.import_module(COMMANDS[ns.command][0])
    args = ns[ns.command]
    if hasattr(mod, "entries"):
        name = args.name
        return mod.main(name, _config(args[name], mod.entries()[name][0]))
    return mod.main(_config(args, _config_class(mod, argv)))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        dispatch(build_parser(argv).parse_args(argv), argv)
        return 0
    except (UserError, FileNotFoundError, IsADirectoryError, PermissionError, NotADirectoryError) as e:
        print(f"attnlab: error: {_flatten(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("attnlab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from jsonargparse import ArgumentError

        if not isinstance(e, ArgumentError):
            raise
        print(f"attnlab: error: {_flatten(str(e))} (see attnlab --help)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `attnlab` command: typed configs (YAML files, dotted overrides) through jsonargparse.

Every command is a function taking one config dataclass; this file only wires them to subcommands and turns
bad input into one line on stderr and exit status 2.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass

from .errors import UserError


@dataclass
class ListConfig:
    """List attention mechanisms, key/value transforms and experiments."""


def run_list(_: ListConfig) -> None:
    from .attention import kernels, transforms
    from .experiments.runner import experiments

    caps = ["causal", "noncausal", "mask", "kv_cache", "stochastic"]
    print("attention mechanisms (--model.attention.name):")
    print(f"  {'name':<10} " + " ".join(f"{c:<10}" for c in caps) + " description")
    for name, e in sorted(kernels().items()):
        flags = " ".join(f"{'yes' if getattr(e.caps, c) else '-':<10}" for c in caps)
        print(f"  {name:<10} {flags} {e.description}")
    print("key/value transforms (--model.attention.transform):")
    for name, e in sorted(transforms().items()):
        print(f"  {name:<10} {e.description}")
    print("experiments (attnlab run NAME --out DIR [--quick]):")
    for name, e in sorted(experiments().items()):
        print(f"  {name:<12} {e.help}")


def _commands() -> dict[str, tuple[type, object, str]]:
    """name -> (config dataclass, function, help). Imports stay inside so `attnlab --help` is quick."""
    from .workflows import EvalConfig, GenerateConfig, TrainRunConfig, run_eval, run_generate, run_train

    cmds = {
        "train": (TrainRunConfig, run_train, "train a decoder LM (text corpus or synthetic task)"),
        "eval": (EvalConfig, run_eval, "loss, perplexity or task accuracy of a checkpoint"),
        "generate": (GenerateConfig, run_generate, "sample text from a checkpoint"),
        "list": (ListConfig, run_list, "mechanisms, transforms and experiments"),
    }
    cmds.update(_extra_commands())
    return cmds


def _extra_commands() -> dict[str, tuple[type, object, str]]:
    """Commands that live beside their subject (benchmarks, integrations, checkpoint tools)."""
    from .integrations.hf_eval import HFEvalConfig, hf_eval
    from .training.average import AverageConfig, run_average

    return {
        "average-checkpoints": (AverageConfig, run_average, "average the weights of checkpoints into one"),
        "hf-eval": (HFEvalConfig, hf_eval,
                    "perplexity and time of a local transformers checkpoint with attnlab attention in chosen layers"),
    }


def _flatten(msg: str) -> str:
    return re.sub(r"\s+", " ", msg).strip()


def build_parser():
    from jsonargparse import ActionConfigFile, ArgumentParser

    from .experiments.runner import experiments

    def typed(cls, help_):
        p = ArgumentParser(exit_on_error=False, description=help_)
        p.add_argument("--config", action=ActionConfigFile, help="a YAML config file (see --print_config)")
        p.add_class_arguments(cls, nested_key=None, as_group=False)
        return p

    parser = ArgumentParser(prog="attnlab", description="A lab for Transformers whose attention can be swapped.",
                            exit_on_error=False)
    sub = parser.add_subcommands(dest="command")
    for name, (cls, _, help_) in _commands().items():
        sub.add_subcommand(name, typed(cls, help_), help=help_)
    # jsonargparse wants a level's subcommand attached before the next level is added under it.
    run = ArgumentParser(exit_on_error=False, description="run an experiment: attnlab run NAME --out DIR [--quick]")
    sub.add_subcommand("run", run, help="run a paper-claim experiment; writes summary.json, report.md and plots")
    run_sub = run.add_subcommands(dest="experiment")
    for name, exp in sorted(experiments().items()):
        run_sub.add_subcommand(name, typed(exp.config_cls, exp.help), help=exp.help)
    bench = ArgumentParser(exit_on_error=False, description="benchmarks: attnlab bench NAME --out DIR")
    sub.add_subcommand("bench", bench, help="benchmarks (speed, memory, error) written to --out")
    bench_sub = bench.add_subcommands(dest="bench")
    for name, (cls, _, help_) in _bench_commands().items():
        bench_sub.add_subcommand(name, typed(cls, help_), help=help_)
    return parser


def _bench_commands() -> dict[str, tuple[type, object, str]]:
    from .bench.attention import BenchConfig, bench_attention

    return {"attention": (BenchConfig, bench_attention,
                          "forward time, peak memory and error against exact of every attention mechanism")}


def _config_from(ns, cls):
    from .config import from_dict

    d = ns.as_dict() if hasattr(ns, "as_dict") else dict(ns)
    d.pop("config", None)
    d.pop("__path__", None)
    return from_dict(cls, d)


def _bare_flags(argv: list[str]) -> list[str]:
    """Let boolean options stand alone (`--quick`) as well as take a value (`--quick false`)."""
    out = []
    for i, a in enumerate(argv):
        nxt = argv[i + 1] if i + 1 < len(argv) else None
        bare = a.startswith("--") and "=" not in a and (nxt is None or nxt.startswith("--"))
        out.append(f"{a}=true" if bare and a not in ("--help", "--print_config") else a)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = _bare_flags(sys.argv[1:] if argv is None else list(argv))
    try:
        parser = build_parser()
        ns = parser.parse_args(argv)
        if ns.command == "bench":
            name = ns.bench.bench
            cls, fn, _ = _bench_commands()[name]
            fn(_config_from(ns.bench[name], cls))
            return 0
        if ns.command == "run":
            from .experiments.runner import experiments, run_experiment

            exp_name = ns.run.experiment
            cfg = _config_from(ns.run[exp_name], experiments()[exp_name].config_cls)
            run_experiment(exp_name, cfg)
            print(f"wrote {cfg.out}/summary.json and {cfg.out}/report.md")
            return 0
        cls, fn, _ = _commands()[ns.command]
        fn(_config_from(ns[ns.command], cls))
        return 0
    except UserError as e:
        print(f"attnlab: error: {_flatten(str(e))}", file=sys.stderr)
        return 2
    except Exception as e:
        from jsonargparse import ArgumentError

        if isinstance(e, ArgumentError):
            print(f"attnlab: error: {_flatten(str(e))} (see attnlab --help)", file=sys.stderr)
            return 2
        if isinstance(e, (FileNotFoundError, IsADirectoryError, PermissionError)):
            print(f"attnlab: error: {_flatten(str(e))}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("attnlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

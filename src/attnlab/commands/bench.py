"""`attnlab bench NAME`: one of the registered benchmarks (`attnlab list` shows them)."""

from __future__ import annotations


def entries() -> dict[str, tuple[type, str]]:
    from ..run.experiment import entries as registered

    return {name: (e.config_cls, e.help) for name, e in sorted(registered("benchmark").items())}


def main(name: str, cfg) -> dict:
    from ..run.experiment import run_experiment

    summary = run_experiment(name, cfg)
    print(f"wrote {cfg.out}/summary.json and {cfg.out}/report.md")
    return summary

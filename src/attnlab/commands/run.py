"""`attnlab run NAME`: one of the registered experiments (`attnlab list` shows them)."""

from __future__ import annotations

def registered(kind: str) -> dict[str, tuple[type, str]]:
    from ..run.experiment import entries as registry

    return {name: (e.config_cls, e.help) for name, e in sorted(registry(kind).items())}


def entries() -> dict[str, tuple[type, str]]:
    return registered("experiment")


def main(name: str, cfg) -> dict:
    from ..run.experiment import run_experiment

    summary = run_experiment(name, cfg)
    print(f"wrote {cfg.out}/summary.json and {cfg.out}/report.md")
    return summary

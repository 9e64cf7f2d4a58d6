"""`attnlab list`: attention mechanisms with their capabilities, key/value transforms, experiments and
benchmarks."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass
class Config:
    """List attention mechanisms, key/value transforms, experiments and benchmarks."""


def main(_: Config) -> None:
    from ..attention import Capabilities, kernels, transforms
    from ..run.experiment import entries

    caps = [f.name for f in dataclasses.fields(Capabilities)]
    print("attention mechanisms (--model.attention.name, options in --model.attention.options):")
    print(f"  {'name':<10} " + " ".join(f"{c:<10}" for c in caps) + " description")
    for name, e in sorted(kernels().items()):
        flags = " ".join(f"{'yes' if getattr(e.caps, c) else '-':<10}" for c in caps)
        print(f"  {name:<10} {flags} {e.description}")
        print(f"  {'':<10} options: {_options(e.config_cls)}")
    print("key/value transforms (--model.attention.transform, options in --model.attention.transform_options):")
    for name, e in sorted(transforms().items()):
        print(f"  {name:<10} {e.description}")
        print(f"  {'':<10} options: {_options(e.config_cls)}")
    for kind, how in (("experiment", "attnlab run NAME --out DIR [--quick]"), ("benchmark", "attnlab bench NAME --out DIR")):
        print(f"{kind}s ({how}):")
        for name, e in sorted(entries(kind).items()):
            print(f"  {name:<12} {e.help}")


def _options(cls) -> str:
    return ", ".join(f"{f.name}={f.default if f.default is not dataclasses.MISSING else f.default_factory()!r}"
                     for f in dataclasses.fields(cls)) or "none"

"""The one report writer: markdown tables, CSV and JSONL files, line plots. Experiments, benchmarks and
commands write their results through it, so every report looks and reads the same."""

from __future__ import annotations

import csv
import json
from pathlib import Path


def markdown_table(rows: list[dict], columns: list[str] | None = None, fmt: str = "{:.4g}") -> str:
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))

    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, float):
            return fmt.format(v)
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict]) -> Path:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    return Path(path)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r, default=str) + "\n")
    return Path(path)


def figure(path: Path, draw, *, size=(7.5, 4.2)) -> Path:
    """A PNG drawn by `draw(fig, plt)`, for plots that are not line plots (bars, panels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=size)
    draw(fig, plt)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def line_plot(path: Path, series: dict[str, tuple[list, list]], *, xlabel: str, ylabel: str, title: str = "",
              logx: bool = False, logy: bool = False, dashed: dict[str, tuple[list, list]] | None = None) -> Path:
    """One PNG with a line per series: {label: (xs, ys)}; `dashed` series are drawn dashed (fits,
    extrapolations)."""

    def draw(fig, plt):
        ax = fig.add_subplot()
        for label, (xs, ys) in series.items():
            ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=label)
        for label, (xs, ys) in (dashed or {}).items():
            ax.plot(xs, ys, linestyle="--", label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title, xscale="log" if logx else "linear",
               yscale="log" if logy else "linear")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)

    return figure(path, draw, size=(6.4, 4.2))


class Report:
    """report.md of a folder, built piece by piece; `save()` writes it. Files written through the report
    (`csv`, `jsonl`, `plot`) land beside it."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.parts: list[str] = []

    def h(self, text: str, level: int = 2):
        self.parts.append("#" * level + " " + text)

    def p(self, text: str):
        self.parts.append(text)

    def table(self, rows: list[dict], columns: list[str] | None = None, fmt: str = "{:.4g}"):
        self.parts.append(markdown_table(rows, columns, fmt))

    def image(self, path: Path, caption: str = ""):
        self.parts.append(f"![{caption}]({Path(path).name})")

    def csv(self, name: str, rows: list[dict]) -> Path:
        return write_csv(self.out / name, rows)

    def jsonl(self, name: str, rows: list[dict]) -> Path:
        return write_jsonl(self.out / name, rows)

    def save(self) -> Path:
        p = self.out / "report.md"
        p.write_text("\n\n".join(self.parts) + "\n")
        return p

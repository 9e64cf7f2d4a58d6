"""The command table: one module per command. A module defines `Config` (a dataclass whose fields, with their
docstrings, are the command's options) and `main(cfg)`; a command with sub-commands (`run`, `bench`) defines
`entries()` -> {name: (config class, help)} and `main(name, cfg)` instead."""

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("attnlab.commands.train", "train a decoder LM on a text corpus or a synthetic task"),
    "eval": ("attnlab.commands.evaluate", "loss, perplexity or task accuracy of a trained run"),
    "generate": ("attnlab.commands.generate", "sample text from a trained run"),
    "run": ("attnlab.commands.run", "run a paper-claim experiment: report.md, plots, CSV/JSONL, summary.json"),
    "bench": ("attnlab.commands.bench", "run a benchmark (speed, memory, error): report.md, plots, CSV"),
    "hf-eval": ("attnlab.commands.hf_eval",
                "perplexity and time of a local transformers checkpoint with attnlab attention in chosen layers"),
    "finetune": ("attnlab.commands.finetune",
                 "fine-tune a local transformers or GGUF causal LM with attnlab attention patched in (full or LoRA)"),
    "average-checkpoints": ("attnlab.commands.average", "average the weights of a run's last checkpoints into one"),
    "list": ("attnlab.commands.list", "attention mechanisms, key/value transforms, experiments and benchmarks"),
}

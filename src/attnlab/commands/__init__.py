"""The command table: one module per command. A module defines `Config` (a dataclass whose fields, with their
docstrings, are the command's options) and `main(cfg)`; a command with sub-commands (`run`, `bench`) defines
`entries()` -> {name: (config class, help)} and `main(name, cfg)` instead."""

COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("attnlab.commands.train",
              "train a model: a decoder LM (--task lm, the default), a ViT on images (--task image) or a forecaster "
              "(--task forecast)"),
    "eval": ("attnlab.commands.evaluate", "loss, perplexity or task accuracy of a trained run"),
    "forecast": ("attnlab.commands.forecast", "forecast a series with a trained forecaster: CSV and plot"),
    "generate": ("attnlab.commands.generate", "sample text from a trained run"),
    "inspect": ("attnlab.commands.inspect",
                "attention maps per layer and head, per-head statistics, previous-token and induction heads"),
    "run": ("attnlab.commands.run", "run a paper-claim experiment: report.md, plots, CSV/JSONL, summary.json"),
    "bench": ("attnlab.commands.bench", "run a benchmark (speed, memory, error): report.md, plots, CSV"),
    "hf-eval": ("attnlab.commands.hf_eval",
                "perplexity and time of a local transformers checkpoint with attnlab attention in chosen layers"),
    "finetune": ("attnlab.commands.finetune",
                 "fine-tune a local transformers or GGUF causal LM with attnlab attention patched in (full or LoRA)"),
    "average-checkpoints": ("attnlab.commands.average", "average the weights of a run's last checkpoints into one"),
    "distill": ("attnlab.commands.distill", "train a student LM against a teacher (attnlab run or transformers LM): KL at T + CE"),
    "quantize": ("attnlab.commands.quantize", "int8 copy of a language-model run for CPU inference (dynamic or weight-only)"),
    "list": ("attnlab.commands.list", "attention mechanisms, key/value transforms, experiments and benchmarks"),
}

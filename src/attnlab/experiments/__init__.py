"""One module per paper claim; each registers itself with `runner.experiment`."""

"""The recipe on top of the core library: data, training, evaluation, prediction (used by the `ia3` CLI)."""

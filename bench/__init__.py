"""The end-to-end benchmark: `python -m bench.run` (see bench/README.md)."""

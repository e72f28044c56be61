"""Quality benchmark: every method side by side on one base model (`python -m bench.quality`)."""

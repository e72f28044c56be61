"""Speed benchmark: ratios of every heavy stage measured in one run (`python -m bench.speed`)."""

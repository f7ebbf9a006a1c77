"""Training, evaluation and benchmarking."""

"""Running compressed checkpoints: loading, Linears per stored format, generation."""

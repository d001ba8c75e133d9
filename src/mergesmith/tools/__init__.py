"""Tools beyond merging: LoRA extraction."""

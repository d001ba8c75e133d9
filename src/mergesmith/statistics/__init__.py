"""Statistics of a model on calibration data, for the data-aware methods (RegMean,
RegMean++, Fisher): computed layer by layer, stored as safetensors artefacts, cached.

``store`` is the artefact format (shared by the code that computes statistics and the
methods that read them)."""

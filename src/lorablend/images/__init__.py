"""Image tools: ``generate`` (one image from a model and LoRA files), ``grid`` (cells in mix order, X/Y grids),
``drawing`` (labelled sheets, fonts, the atomic PNG writer) and ``plot`` (per-layer heatmaps of LoRA files)."""

"""File-to-file jobs that need no live pipeline: ``jobs`` (convert, merge), ``bake`` (LoRAs into a checkpoint or a
pipeline folder, streamed), ``checkpoint`` (where each module lives in a single-file checkpoint) and ``inspection``
(what a LoRA file holds)."""

"""Measuring what LoRAs do to images: per-step adapter schedules (LoRA Switch, K-LoRA) and ``lorablend eval
merges`` (which merge keeps both concepts, as the drawing model's judge sees them)."""

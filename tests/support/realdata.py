"""Where the third-party material lives (beside the checkout, never inside it); tests skip without it."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[3] / "shared" / "realdata"
LORAS = SHARED / "loras"
CONFIGS = SHARED / "configs"
KEYMAPS = SHARED / "keymaps" / "ai-toolkit"

requires_realdata = pytest.mark.skipif(not LORAS.is_dir(), reason=f"real material not found at {SHARED}")

"""The per-key load report: every key of an input is mapped, unsupported (with why) or unknown."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Status = Literal["mapped", "unsupported", "unknown"]


@dataclass(frozen=True)
class KeyRecord:
    """What became of one source key: ``target`` is the target key when ``status == "mapped"``."""

    key: str
    status: Status
    target: str | None = None
    reason: str = ""


@dataclass
class LoadReport:
    """Accounts for every key of a source.

    >>> r = LoadReport(source="a.safetensors", format="kohya")
    >>> r.add("lora_unet_x.alpha", "unknown", reason="no module named x")
    >>> r.counts()
    {'mapped': 0, 'unsupported': 0, 'unknown': 1}
    """

    source: str = ""
    format: str = ""
    records: list[KeyRecord] = field(default_factory=list)

    def add(self, key: str, status: Status, target: str | None = None, reason: str = "") -> None:
        self.records.append(KeyRecord(key, status, target, reason))

    def _with(self, status: Status) -> list[KeyRecord]:
        return [r for r in self.records if r.status == status]

    @property
    def mapped(self) -> list[KeyRecord]:
        return self._with("mapped")

    @property
    def unsupported(self) -> list[KeyRecord]:
        return self._with("unsupported")

    @property
    def unknown(self) -> list[KeyRecord]:
        return self._with("unknown")

    @property
    def complete(self) -> bool:
        """True when every key was mapped."""
        return all(r.status == "mapped" for r in self.records)

    def counts(self) -> dict[str, int]:
        return {s: len(self._with(s)) for s in ("mapped", "unsupported", "unknown")}

    def summary(self, limit: int = 5) -> str:
        """A few lines for people: the counts, then the first keys that were not mapped."""
        c = self.counts()
        lines = [f"{self.source or '<state dict>'} ({self.format}): {c['mapped']} keys mapped, "
                 f"{c['unsupported']} unsupported, {c['unknown']} unknown"]
        for rec in (self.unsupported + self.unknown)[:limit]:
            lines.append(f"  {rec.status}: {rec.key}" + (f" ({rec.reason})" if rec.reason else ""))
        rest = len(self.unsupported) + len(self.unknown) - limit
        if rest > 0:
            lines.append(f"  … and {rest} more")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "format": self.format,
            "counts": self.counts(),
            "keys": [
                {"key": r.key, "status": r.status, "target": r.target, "reason": r.reason} for r in self.records
            ],
        }

    def __str__(self) -> str:
        return self.summary()

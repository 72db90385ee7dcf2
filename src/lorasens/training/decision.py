"""The record of a speed-up that must not change a number: on or off, and why (start-up probes decide it)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class SpeedupDecision:
    """Whether a speed-up (padding-free packing, the LM head at labelled positions only) is on, and why;
    summary.json records it as {"enabled": ..., "reason": ...}."""

    enabled: bool
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)

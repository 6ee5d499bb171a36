"""The config every small test federation starts from."""

from __future__ import annotations

from typing import Any

from flq.config import Config, default_config, with_overrides

# What every small test federation shares: three workers on 127.0.0.1, any free port, rounds
# short enough for a test but long enough for a loaded machine.
SMALL_FEDERATION = {
    "system.total_workers": 3,
    "system.min_workers": 3,
    "system.round_timeout_s": 5.0,
    "system.master_url": "http://127.0.0.1:0",
}


def small_config(settings: dict[str, Any], overrides: dict[str, Any]) -> Config:
    """The default config with SMALL_FEDERATION, then a suite's `settings`, then a test's
    `overrides` (later wins)."""
    return with_overrides(default_config(), {**SMALL_FEDERATION, **settings, **overrides})

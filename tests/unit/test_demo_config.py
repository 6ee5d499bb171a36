"""`flq demo --config FILE`: the demo's own training settings stay unless the file sets them."""

from __future__ import annotations

from pathlib import Path

from flq.config import default_config, keys_set_in
from flq.demo import DEMO_SETTINGS, DemoOptions, demo_config


def test_a_file_with_only_llm_keeps_the_demo_training_settings(tmp_path: Path) -> None:
    path = tmp_path / "llm.toml"
    path.write_text('[llm]\nmodel = "gemini-2.5-pro"\ntimeout_s = 5.0\n')
    cfg = demo_config(DemoOptions(base_config=path))
    assert cfg.llm.model == "gemini-2.5-pro" and cfg.llm.timeout_s == 5.0
    assert (cfg.model.lr, cfg.model.local_steps, cfg.model.local_epochs) == (0.1, 0, 1)
    assert (cfg.lazy_selection.warmup, cfg.lazy_selection.C) == (3, 10)
    defaults = default_config()  # what the file replaced them with before
    assert (defaults.model.lr, defaults.model.local_steps) == (0.05, 1)


def test_keys_the_file_sets_override_the_demo_settings(tmp_path: Path) -> None:
    path = tmp_path / "mine.json"
    path.write_text(
        '{"model": {"lr": 0.02, "_comment": "slower"}, "lazy_selection": {"C": 4},'
        ' "system": {"master_address": "127.0.0.1:6000"}}'
    )
    assert keys_set_in(path) == {
        "model.lr",
        "lazy_selection.C",
        "system.master_url",  # the alias counts as the key it spells
    }
    cfg = demo_config(DemoOptions(base_config=path))
    assert cfg.model.lr == 0.02 and cfg.lazy_selection.C == 4
    assert cfg.model.local_steps == DEMO_SETTINGS["model.local_steps"]
    assert cfg.lazy_selection.warmup == DEMO_SETTINGS["lazy_selection.warmup"]

"""flq.config: the original layout, defaults, every error class, overrides and round trips."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flq.config import (
    SECTION_TYPES,
    Config,
    ConfigError,
    Setting,
    config_from_dict,
    config_to_dict,
    config_warnings,
    default_config,
    dumps_toml,
    generated_reference_in,
    iter_settings,
    load_config,
    reference_markdown,
    with_overrides,
)

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples" / "configs"
ORIGINAL = EXAMPLES / "original-flq.json"
SECTIONS = list(SECTION_TYPES)


def load_dict(data: dict[str, Any]) -> Config:
    return config_from_dict(data, source="test.toml")


def error_of(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        load_dict(data)
    return str(info.value)


# ---------------------------------------------------------------- loading files


def test_original_flq_file_loads_with_every_value_intact() -> None:
    raw = json.loads(ORIGINAL.read_text(encoding="utf-8"))
    loaded = config_to_dict(load_config(ORIGINAL))
    for section, values in raw.items():
        for key, value in values.items():
            expected = value.lower() if key == "log_level" else value  # "INFO" -> "info"
            assert loaded[section][key] == expected, f"{section}.{key}"
            assert type(loaded[section][key]) is type(expected), f"{section}.{key}"


def test_original_flq_file_keeps_its_master_endpoint() -> None:
    system = load_config(ORIGINAL).system
    assert (system.master_host, system.master_port) == ("127.0.0.1", 5000)


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*")), ids=lambda p: p.name)
def test_every_example_config_loads(path: Path) -> None:
    assert isinstance(load_config(path), Config)


def test_example_configs_exist() -> None:
    names = {p.name for p in EXAMPLES.glob("*")}
    assert {"original-flq.json", "digits-bbit.toml", "fashion-cnn.toml"} <= names


def test_fashion_cnn_example_is_the_original_benchmark() -> None:
    cfg = load_config(EXAMPLES / "fashion-cnn.toml")
    assert (cfg.dataset.name, cfg.dataset.partition, cfg.dataset.dir_alpha) == (
        "fashion-mnist",
        "dirichlet",
        0.1,
    )
    assert (cfg.system.total_workers, cfg.system.max_rounds) == (20, 800)
    assert (cfg.model.name, cfg.dataset.batch_size, cfg.model.local_steps) == ("cnn", 64, 1)
    assert (cfg.flq_algorithm.server_optimizer, cfg.flq_algorithm.server_lr) == ("adam", 5e-4)
    assert (cfg.flq_algorithm.mode, cfg.flq_algorithm.b_up, cfg.flq_algorithm.b_down) == (
        "bin",
        1,
        8,
    )
    assert cfg.model.l2 == 5e-4
    assert cfg.budget_selection.up_budget_bits == 17e6


TOML_TEXT = """
_comment = "top-level comments are ignored"
[system]
total_workers = 6
master_address = "10.0.0.5:7000"
[flq_algorithm]
mode = "bin"
b_down = 8
up_ignored_comment = 1
[budget_selection]
up_budget_bits = 17000000
"""

JSON_TEXT = """{
  "_comment": "top-level comments are ignored",
  "system": {"total_workers": 6, "master_address": "10.0.0.5:7000"},
  "flq_algorithm": {"mode": "bin", "b_down": 8, "up_ignored_comment": 1},
  "budget_selection": {"up_budget_bits": 17e6}
}"""


def test_toml_and_json_give_the_same_config(tmp_path: Path) -> None:
    toml_file = tmp_path / "run.toml"
    json_file = tmp_path / "run.json"
    toml_file.write_text(TOML_TEXT.replace("up_ignored_comment", "_comment"), encoding="utf-8")
    json_file.write_text(JSON_TEXT.replace("up_ignored_comment", "_comment"), encoding="utf-8")
    from_toml, from_json = load_config(toml_file), load_config(json_file)
    assert from_toml == from_json
    assert from_toml.system.total_workers == 6
    assert from_toml.flq_algorithm.mode == "bin"
    assert from_toml.system.master_port == 7000


def test_suffix_is_case_insensitive(tmp_path: Path) -> None:
    path = tmp_path / "RUN.JSON"
    path.write_text('{"system": {"max_rounds": 3}}', encoding="utf-8")
    assert load_config(path).system.max_rounds == 3


def test_missing_file_error_names_the_path(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(ConfigError, match=r"nowhere\.toml: no such config file"):
        load_config(path)


def test_other_suffix_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("system: {}", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"run\.yaml: unsupported config file type '\.yaml'"):
        load_config(path)


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        ("bad.json", '{"system": {"max_rounds": 3,}}', r"bad\.json: not valid JSON: .*line 1"),
        ("bad.toml", "[system\nmax_rounds = 3", r"bad\.toml: not valid TOML"),
        (
            "dup.json",
            '{"system": {"max_rounds": 3, "max_rounds": 4}}',
            "'max_rounds' appears twice",
        ),
        ("list.json", "[1, 2]", r"list\.json: expected a table of sections, got array"),
    ],
)
def test_unparsable_files_are_errors_naming_the_file(
    tmp_path: Path, name: str, text: str, expected: str
) -> None:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=expected):
        load_config(path)


def test_error_from_a_file_is_prefixed_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text("[flq_algorithm]\nb_up = 20\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: flq_algorithm.b_up = 20")


# ---------------------------------------------------------------- defaults


def test_defaults_are_the_same_from_every_entry_point() -> None:
    assert default_config() == load_config(None) == config_from_dict({}) == Config()


def test_defaults_match_the_specification() -> None:
    cfg = default_config()
    assert (cfg.system.total_workers, cfg.system.min_workers, cfg.system.max_rounds) == (4, 2, 30)
    assert (cfg.system.master_host, cfg.system.master_port) == ("127.0.0.1", 50051)
    assert (cfg.system.round_timeout_s, cfg.system.connect_timeout_s) == (60.0, 0.0)
    assert (cfg.dataset.name, cfg.dataset.partition, cfg.dataset.dir_alpha) == (
        "digits",
        "iid",
        0.5,
    )
    assert (cfg.model.name, cfg.model.lr, cfg.model.local_steps) == ("mlp", 0.05, 1)
    algo = cfg.flq_algorithm
    assert (algo.mode, algo.b_up, algo.b_down, algo.server_optimizer) == ("bbit", 4, 32, "avg")
    assert (algo.error_feedback, algo.weighting) == (True, "samples")
    assert cfg.lazy_selection.thr_scale == 0.0
    assert cfg.jetson_optimization.gpu_memory_limit_mb == 0
    assert (cfg.logging.log_format, cfg.logging.checkpoint_dir) == ("auto", "checkpoints")


def test_missing_keys_keep_their_defaults_next_to_given_ones() -> None:
    cfg = load_dict({"model": {"lr": 0.2}})
    assert cfg.model.lr == 0.2
    assert cfg.model.hidden_units == 64


def test_config_is_frozen() -> None:
    cfg = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.system.max_rounds = 3  # type: ignore[misc]


def test_comment_keys_are_ignored_at_top_level_and_in_sections() -> None:
    cfg = load_dict(
        {
            "_comment": "top",
            "_comment_2": ["anything", 1],
            "model": {"_comment": "lr is low on purpose", "lr": 0.001},
        }
    )
    assert cfg == dataclasses.replace(
        default_config(), model=dataclasses.replace(default_config().model, lr=0.001)
    )


# ---------------------------------------------------------------- numbers and types


def test_int_is_accepted_where_a_float_is_expected() -> None:
    for written in (17000000, 17e6):
        bits = load_dict({"budget_selection": {"up_budget_bits": written}})
        assert bits.budget_selection.up_budget_bits == 17e6
        assert type(bits.budget_selection.up_budget_bits) is float


def test_whole_float_is_accepted_where_an_int_is_expected() -> None:
    rounds = load_dict({"system": {"max_rounds": 20.0}}).system.max_rounds
    assert rounds == 20
    assert type(rounds) is int


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        (
            "system",
            "max_rounds",
            "20",
            'system.max_rounds = "20" has type string; expected an integer',
        ),
        (
            "system",
            "max_rounds",
            True,
            "system.max_rounds = true has type boolean; expected an integer",
        ),
        (
            "system",
            "max_rounds",
            2.5,
            "system.max_rounds = 2.5 has type float; expected an integer",
        ),
        ("model", "lr", False, "model.lr = false has type boolean; expected a number"),
        ("model", "lr", "0.1", 'model.lr = "0.1" has type string; expected a number'),
        ("jetson_optimization", "memory_growth", 1, "has type integer; expected true or false"),
        ("dataset", "data_dir", 3, "dataset.data_dir = 3 has type integer; expected a string"),
        ("dataset", "name", ["mnist"], "has type array; expected a string"),
    ],
)
def test_wrong_type_names_key_value_and_expected_type(
    section: str, key: str, value: Any, expected: str
) -> None:
    assert expected in error_of({section: {key: value}})


@pytest.mark.parametrize(
    ("section", "key", "value", "allowed"),
    [
        ("flq_algorithm", "b_up", 0, "allowed: 1..16"),
        ("flq_algorithm", "b_up", 17, "allowed: 1..16"),
        ("flq_algorithm", "b_down", 20, "allowed: 1..16 or 32"),
        ("flq_algorithm", "sel_ref", 0.0, "allowed: > 0"),
        ("flq_algorithm", "clip_global", -1.0, "allowed: >= 0"),
        ("dataset", "dir_alpha", 0, "allowed: > 0"),
        ("dataset", "test_fraction", 1.0, "allowed: 0 < x < 1"),
        ("lazy_selection", "D", 0, "allowed: >= 1"),
        ("budget_selection", "up_budget_bits", -5, "allowed: >= 0"),
        ("jetson_optimization", "prefetch_size", -2, "allowed: >= 0 or -1"),
        ("jetson_optimization", "num_parallel_calls", 0, "allowed: >= 1 or -1"),
        ("system", "target_accuracy", 1.5, "allowed: 0..1"),
        ("system", "total_workers", 0, "allowed: >= 1"),
    ],
)
def test_out_of_range_names_key_value_and_range(
    section: str, key: str, value: Any, allowed: str
) -> None:
    message = error_of({section: {key: value}})
    assert f"test.toml: {section}.{key} = {value!r} is out of range; {allowed}" == message


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("flq_algorithm", "b_down", 32),
        ("flq_algorithm", "b_down", 1),
        ("flq_algorithm", "b_up", 16),
        ("jetson_optimization", "prefetch_size", -1),
        ("jetson_optimization", "num_parallel_calls", -1),
        ("lazy_selection", "warmup", 0),
    ],
)
def test_edges_and_special_values_are_accepted(section: str, key: str, value: Any) -> None:
    cfg = load_dict({section: {key: value}})
    assert getattr(getattr(cfg, section), key) == value


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_floats_are_rejected(value: float) -> None:
    assert "model.lr = " in error_of({"model": {"lr": value}})


# ---------------------------------------------------------------- names and choices


def test_bad_choice_lists_the_valid_choices_and_suggests_one() -> None:
    message = error_of({"flq_algorithm": {"mode": "bbits"}})
    assert 'flq_algorithm.mode = "bbits" is not a valid choice' in message
    assert "did you mean 'bbit'?" in message
    assert message.endswith("choose one of: fedavg, laq8, bbit, bin, stc, sti")


def test_choices_are_case_insensitive_and_stored_lower_case() -> None:
    cfg = load_dict({"dataset": {"name": "MNIST"}, "logging": {"log_level": "WARNING"}})
    assert (cfg.dataset.name, cfg.logging.log_level) == ("mnist", "warning")


def test_unknown_section_lists_the_valid_sections() -> None:
    message = error_of({"sytem": {}})
    assert message.startswith("test.toml: unknown section [sytem]")
    assert all(name in message for name in SECTIONS)


def test_section_that_is_not_a_table_is_an_error() -> None:
    assert "section [model] must be a table of keys, got integer" in error_of({"model": 3})


def test_unknown_key_names_it_its_section_the_valid_keys_and_the_closest() -> None:
    message = error_of({"flq_algorithm": {"b_upp": 4}})
    assert "unknown key 'b_upp' in section [flq_algorithm]" in message
    assert "did you mean 'b_up'?" in message
    valid = [f.name for f in dataclasses.fields(SECTION_TYPES["flq_algorithm"])]
    assert f"valid keys: {', '.join(valid)}" in message


def test_unknown_key_without_a_close_match_suggests_nothing() -> None:
    message = error_of({"model": {"zzzzzz": 1}})
    assert "unknown key 'zzzzzz' in section [model]" in message
    assert "did you mean" not in message


def test_min_workers_above_total_workers_names_both() -> None:
    message = error_of({"system": {"total_workers": 3, "min_workers": 5}})
    assert "system.min_workers = 5" in message
    assert "system.total_workers = 3" in message


# ---------------------------------------------------------------- the master endpoint


@pytest.mark.parametrize(
    ("system", "host", "port", "target"),
    [
        ({"master_url": "http://jetson-master:6000"}, "jetson-master", 6000, "jetson-master:6000"),
        ({"master_url": "grpc://10.1.2.3:50051/"}, "10.1.2.3", 50051, "10.1.2.3:50051"),
        ({"master_address": "192.168.1.100:5000"}, "192.168.1.100", 5000, "192.168.1.100:5000"),
        ({"master_address": "[::1]:7000"}, "::1", 7000, "[::1]:7000"),
        ({"master_address": "0.0.0.0:0"}, "0.0.0.0", 0, "0.0.0.0:0"),
    ],
)
def test_master_endpoint_is_parsed_from_url_or_address(
    system: dict[str, Any], host: str, port: int, target: str
) -> None:
    parsed = load_dict({"system": system}).system
    assert (parsed.master_host, parsed.master_port, parsed.master_target) == (host, port, target)


@pytest.mark.parametrize(
    ("system", "expected"),
    [
        (
            {"master_url": "http://127.0.0.1"},
            'system.master_url = "http://127.0.0.1" is invalid: missing port',
        ),
        (
            {"master_url": "http://host:99999"},
            'system.master_url = "http://host:99999" is invalid: the port',
        ),
        ({"master_url": "http://host:abc"}, "the port must be a number in 0..65535"),
        ({"master_url": "127.0.0.1:5000"}, "expected a URL like http://host:port"),
        ({"master_url": "ftp://host:21"}, "the scheme must be one of http, grpc"),
        ({"master_url": "http://host:1/api"}, "without a path"),
        ({"master_url": "http://:5000"}, "missing host"),
        (
            {"master_address": "127.0.0.1"},
            'system.master_address = "127.0.0.1" is invalid: missing port',
        ),
        ({"master_address": "host:-1"}, 'system.master_address = "host:-1" is invalid: the port'),
        ({"master_address": "http://host:1"}, "without a scheme or path"),
        ({"master_address": 5000}, "system.master_address = 5000 has type integer"),
        (
            {"master_address": "a:1", "master_url": "http://a:1"},
            "set master_address or master_url, not both",
        ),
    ],
)
def test_bad_master_endpoint_is_an_error_naming_the_key(
    system: dict[str, Any], expected: str
) -> None:
    assert expected in error_of({"system": system})


def test_master_address_is_listed_among_the_valid_keys() -> None:
    assert "master_address" in error_of({"system": {"master_adress": "a:1"}})


# ---------------------------------------------------------------- overrides


def test_with_overrides_changes_only_the_named_keys() -> None:
    base = load_config(EXAMPLES / "digits-bbit.toml")
    changed = with_overrides(base, {"flq_algorithm.mode": "bin", "system.max_rounds": 5})
    assert (changed.flq_algorithm.mode, changed.system.max_rounds) == ("bin", 5)
    expected = config_to_dict(base)
    expected["flq_algorithm"]["mode"] = "bin"
    expected["system"]["max_rounds"] = 5
    assert config_to_dict(changed) == expected
    assert base.flq_algorithm.mode == "bbit"  # the original is untouched


def test_with_overrides_validates_like_a_file() -> None:
    with pytest.raises(ConfigError, match=r"flq_algorithm\.b_up = 0 is out of range"):
        with_overrides(default_config(), {"flq_algorithm.b_up": 0})
    with pytest.raises(ConfigError, match=r"system\.min_workers = 9 is more than"):
        with_overrides(default_config(), {"system.min_workers": 9})


def test_block_grid_needs_two_bits_and_names_the_fix() -> None:
    one_bit = {"flq_algorithm.b_up": 1, "flq_algorithm.bbit_block": 256}
    with pytest.raises(ConfigError, match=r"b_up = 1 with bbit_block = 256.*set bbit_block = 0"):
        with_overrides(default_config(), one_bit)
    cfg = with_overrides(default_config(), {**one_bit, "flq_algorithm.b_up": 2})
    assert cfg.flq_algorithm.bbit_block == 256
    with pytest.raises(ConfigError, match=r"flq_algorithm\.bbit_block = -1 is out of range"):
        with_overrides(default_config(), {"flq_algorithm.bbit_block": -1})


@pytest.mark.parametrize(("section", "key"), [("flq_algorithm", "moed"), ("flq_algorith", "mode")])
def test_unknown_override_gives_the_same_error_as_a_file(section: str, key: str) -> None:
    with pytest.raises(ConfigError) as from_override:
        with_overrides(default_config(), {f"{section}.{key}": "bin"})
    with pytest.raises(ConfigError) as from_file:
        config_from_dict({section: {key: "bin"}}, source="<overrides>")
    assert str(from_override.value) == str(from_file.value)


@pytest.mark.parametrize("dotted", ["max_rounds", ".max_rounds", "system."])
def test_override_key_must_be_section_dot_key(dotted: str) -> None:
    with pytest.raises(ConfigError, match=r"must be section\.key"):
        with_overrides(default_config(), {dotted: 5})


def test_master_address_override_replaces_the_url() -> None:
    cfg = with_overrides(default_config(), {"system.master_address": "127.0.0.1:0"})
    assert (cfg.system.master_host, cfg.system.master_port) == ("127.0.0.1", 0)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*")), ids=lambda p: p.name)
def test_dict_and_toml_round_trips_are_identity(path: Path) -> None:
    cfg = load_config(path)
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_from_dict(tomllib.loads(dumps_toml(cfg))) == cfg
    assert config_from_dict(json.loads(json.dumps(config_to_dict(cfg)))) == cfg


def test_config_to_dict_has_every_section_and_key() -> None:
    data = config_to_dict(default_config())
    assert list(data) == SECTIONS
    for section, values in data.items():
        assert list(values) == [f.name for f in dataclasses.fields(SECTION_TYPES[section])]


# Strings whose rule has a `check`: random text would almost never pass it.
_CHECKED_STRINGS: dict[str, st.SearchStrategy[Any]] = {
    "api_key_env": st.from_regex(r"[A-Z_][A-Z0-9_]{0,11}", fullmatch=True),
    "base_url": st.sampled_from(["", "http://127.0.0.1:8080", "https://proxy.example/v1beta"]),
    "target_layers": st.sampled_from(["all_dense", "probs", "hidden,probs"]),
    "student_layers": st.sampled_from(["probs", "fc,probs"]),
    "loader": st.sampled_from(["", "my_data:load", "data/load.py:load"]),
    "builder": st.sampled_from(["", "my_model:build", "models/net.py:build"]),
    "weights": st.sampled_from(["", "base.keras", "init.weights.h5", "w.npz"]),
    "base": st.sampled_from(["", "base.keras", "pretrained/base.weights.h5", "run/model.npz"]),
}


def _valid_value(item: Setting) -> st.SearchStrategy[Any]:
    """Any value the table allows for one key (used to fuzz the round trips)."""
    rule = item.rule
    if item.choices:
        return st.sampled_from(item.choices)
    if item.kind is bool:
        return st.booleans()
    if item.key == "master_url":
        return st.integers(0, 65535).map(lambda port: f"http://127.0.0.1:{port}")
    if item.key in _CHECKED_STRINGS:
        return _CHECKED_STRINGS[item.key]
    if item.kind is str:
        return st.text(min_size=1, max_size=12)
    if item.kind is dict:  # llm.features: name -> description
        names = st.text(min_size=1, max_size=12).filter(str.isprintable)
        return st.dictionaries(names, st.text(min_size=1, max_size=20).filter(str.strip))
    low = rule.minimum if rule.minimum is not None else rule.above
    high = rule.maximum if rule.maximum is not None else rule.below
    if item.kind is int:
        return st.integers(int(low or 0), int(high if high is not None else 10**9))
    floats = st.floats(
        min_value=low,
        max_value=high if high is not None else 1e18,
        exclude_min=rule.above is not None,
        exclude_max=rule.below is not None,
        allow_nan=False,
    )
    return floats


def _consistent(data: dict[str, Any]) -> dict[str, Any]:
    """Settle the cross-field rules the per-key strategies cannot see."""
    algo = data["flq_algorithm"]
    block = algo["bbit_block"] if algo["b_up"] >= 2 else 0
    if data["dataset"]["name"] == "synthetic":  # its own data and linear model
        data = {
            **data,
            "dataset": {**data["dataset"], "loader": ""},
            "model": {**data["model"], "builder": "", "weights": ""},
        }
    return {
        **data,
        "system": {**data["system"], "min_workers": 1},
        "flq_algorithm": {**algo, "bbit_block": block},
        "fusion": _consistent_fusion(data),
    }


def _consistent_fusion(data: dict[str, Any]) -> dict[str, Any]:
    fusion = dict(data["fusion"])
    if data["dataset"]["name"] == "synthetic" or data["lora"]["rank"] > 0:
        fusion["method"] = "none"
    heads = fusion["attention_heads"]
    fusion["attention_dim"] = heads * max(1, fusion["attention_dim"] // heads)
    fusion["server_share"] = fusion["server_share"] or 0.1
    return fusion


VALID_CONFIG_DICTS = st.fixed_dictionaries(
    {
        section: st.fixed_dictionaries(
            {item.key: _valid_value(item) for item in iter_settings() if item.section == section}
        )
        for section in SECTIONS
    }
).map(_consistent)


@settings(max_examples=60, deadline=None)
@given(VALID_CONFIG_DICTS)
def test_any_valid_config_survives_dict_and_toml_round_trips(data: dict[str, Any]) -> None:
    cfg = config_from_dict(data)
    assert config_to_dict(cfg) == data
    assert config_from_dict(config_to_dict(cfg)) == cfg
    assert config_from_dict(tomllib.loads(dumps_toml(cfg))) == cfg


def test_dumps_toml_writes_every_section_as_a_table() -> None:
    text = dumps_toml(default_config())
    assert [line for line in text.splitlines() if line.startswith("[")] == [
        f"[{name}]" for name in SECTIONS
    ]


# ---------------------------------------------------------------- the reference doc


def test_docs_reference_is_generated_from_the_table() -> None:
    doc = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert generated_reference_in(doc) == reference_markdown(), (
        "docs/config.md is stale: run .venv/bin/python -c "
        "\"from flq.config import sync_reference_doc; sync_reference_doc('docs/config.md')\""
    )


def test_reference_names_every_key_and_marks_the_original_ones() -> None:
    text = reference_markdown()
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    items = list(iter_settings())
    assert len(rows) == len(items)
    for row, item in zip(rows, items, strict=True):
        assert row.startswith(f"| `{item.key}` |")
        assert ("| ✓ |" in row) == item.rule.original, f"{item.section}.{item.key}"
    assert "`master_address`" in text


@pytest.mark.parametrize(
    "path", sorted((ROOT / "bench" / "configs").glob("*.toml")), ids=lambda p: p.stem
)
def test_every_benchmark_config_is_valid_and_writes_where_it_is_named(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.logging.result_dir == f"docs/results/{path.stem}"


# ---------------------------------------------------------------- lora.base


@pytest.mark.parametrize("base", ["", "base.keras", "dir/base.weights.h5", "BASE.NPZ"])
def test_lora_base_takes_a_weights_file_name(base: str) -> None:
    assert load_dict({"lora": {"rank": 4, "base": base}}).lora.base == base


def test_lora_base_of_another_kind_is_refused_naming_it() -> None:
    message = error_of({"lora": {"rank": 4, "base": "base.h5"}})
    assert "lora.base" in message and "base.h5" in message and ".weights.h5" in message


def test_lora_without_a_base_is_warned_about_and_nothing_else_is() -> None:
    assert config_warnings(default_config()) == []
    (warning,) = config_warnings(load_dict({"lora": {"rank": 8}}))
    assert "lora.rank = 8 without lora.base" in warning and "learn little" in warning
    assert config_warnings(load_dict({"lora": {"rank": 8, "base": "b.keras"}})) == []


@pytest.mark.parametrize("optimizer", ["adam", "yogi", "adagrad"])
def test_stc_under_an_adaptive_server_step_is_warned_about(optimizer: str) -> None:
    algo = {"mode": "stc", "server_optimizer": optimizer, "server_lr": 5e-4}
    (warning,) = config_warnings(load_dict({"flq_algorithm": algo}))
    assert "mode = 'stc'" in warning and repr(optimizer) in warning and "'avg'" in warning
    for plain in ("avg", "sgd", "momentum"):
        algo = {"mode": "stc", "server_optimizer": plain}
        assert config_warnings(load_dict({"flq_algorithm": algo})) == []
    assert config_warnings(load_dict({"flq_algorithm": {"server_optimizer": optimizer}})) == []

"""raeg_pl.config: defaults chains, overrides, merging, recipes, and the grid's name checks."""

from __future__ import annotations

import pytest

from raeg_pl.config import (
    GRID_KEYS,
    PIPELINE_KEYS,
    apply_overrides,
    deep_merge,
    load_config,
    load_grid_config,
    load_pipeline_config,
    normalise_recipe,
    parse_adv_train,
    parse_override,
    recipe_differences,
    row_method_params,
    row_protector_spec,
    row_spec,
)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_chain_merges_bases_first(tmp_path):
    _write(tmp_path / "_base" / "a.yaml", "data: {batch_size: 8, dataset: x}\nseed: 1\n")
    _write(tmp_path / "_base" / "b.yaml", "defaults: a.yaml\ndata: {batch_size: 16}\n")
    exp = _write(tmp_path / "exp" / "e.yaml", "defaults: [../_base/b.yaml]\nseed: 2\n")
    assert load_config(exp) == {"data": {"batch_size": 16, "dataset": "x"}, "seed": 2}


def test_defaults_must_name_files(tmp_path):
    bad = _write(tmp_path / "e.yaml", "defaults: {a: 1}\n")
    with pytest.raises(ValueError, match=r"e\.yaml: 'defaults' must be"):
        load_config(bad)


def test_a_file_that_is_not_a_mapping_is_named(tmp_path):
    bad = _write(tmp_path / "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ValueError, match=r"list\.yaml: a config file must hold a mapping"):
        load_config(bad)


def test_overrides_reach_nested_keys_and_list_items():
    cfg = {"surrogates": [{"max_epochs": 3}], "protector": {"model": {"lr": 1.0}}}
    apply_overrides(
        cfg,
        ["surrogates.0.max_epochs=1", "protector.model.lr=5e-05", "rows={a: {kind: pgd}}"],
    )
    assert cfg["surrogates"][0]["max_epochs"] == 1
    # YAML 1.1 reads 5e-05 as text; the override parser reads the number.
    assert cfg["protector"]["model"]["lr"] == 5e-05
    assert cfg["rows"] == {"a": {"kind": "pgd"}}
    assert parse_override("gray") == "gray" and parse_override("[1, 2]") == [1, 2]
    with pytest.raises(ValueError, match="key.path=value"):
        apply_overrides({}, ["protector.model.lr"])


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    out = deep_merge(base, {"a": {"c": [3]}, "e": {"f": 1}})
    assert out == {"a": {"b": 1, "c": [3]}, "d": 1, "e": {"f": 1}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}  # the base is not changed


def test_unknown_top_level_keys_are_refused_naming_the_file(tmp_path):
    cfg = _write(tmp_path / "p.yaml", "seed: 0\npirates: {}\n")
    with pytest.raises(ValueError, match=r"p\.yaml: unknown config keys \['pirates'\]"):
        load_pipeline_config(cfg)
    assert load_grid_config(cfg)["pirates"] == {}
    # Grids take every pipeline section but ``export``, which a grid sets per RAEG row.
    assert set(PIPELINE_KEYS) - set(GRID_KEYS) == {"export"}
    assert set(PIPELINE_KEYS) - {"export"} < set(GRID_KEYS)


def test_recipes_drop_file_locations_and_name_their_differences():
    old = normalise_recipe({"data": {"data_dir": "/a", "batch_size": 8}, "seed": (1, 2)})
    new = normalise_recipe({"data": {"data_dir": "/b", "batch_size": 16}, "seed": [1, 2]})
    assert old == {"data": {"batch_size": 8}, "seed": [1, 2]}
    assert recipe_differences(old, new) == ["data.batch_size"]
    assert recipe_differences(old, old) == []
    assert recipe_differences(None, new) == ["(whole recipe)"]
    assert recipe_differences({"a": 1}, {"b": 1}) == ["a", "b"]


def test_adv_train_specs():
    assert parse_adv_train("jpeg:q=75") is None
    assert parse_adv_train("adv_train") == {"adv_train_eps": 8.0}
    assert parse_adv_train("adv_train:eps=4,steps=2") == {
        "adv_train_eps": 4.0,
        "adv_train_steps": 2,
    }
    with pytest.raises(ValueError, match="adv_train takes eps= and steps="):
        parse_adv_train("adv_train:epz=4")


def test_grid_rows_merge_method_defaults_and_protector_overrides():
    cfg = {
        "protector": {"max_epochs": 2, "model": {"kappa": 5.0, "lr": 1.0}},
        "method_defaults": {"batch_size": 512},
    }
    spec = row_spec(cfg, {"kind": "raeg", "surrogates": [0], "protector": {"model": {"kappa": 3}}})
    assert spec["batch_size"] == 512
    assert row_method_params(spec) == {"kind": "raeg", "batch_size": 512}
    assert row_protector_spec(cfg, spec) == {"max_epochs": 2, "model": {"kappa": 3, "lr": 1.0}}

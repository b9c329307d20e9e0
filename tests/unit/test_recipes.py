"""Recipes: registry, validation, per-module overrides, options resolution."""
import pytest

from qcompiler import recipes
from qcompiler.api.options import split_options
from qcompiler.recipes import Recipe, get_recipe, list_recipes, resolve

REQUIRED = ["w8a8", "w8a8-static", "w8a8-smoothquant", "w8a8-smoothquant-dynamic", "w8a16"]


@pytest.mark.parametrize("name", REQUIRED)
def test_required_recipes_registered(name):
    r = get_recipe(name)
    assert r.name == name and r.weight_bits == 8


def test_recipe_semantics():
    assert get_recipe("w8a8").activation == "dynamic" and not get_recipe("w8a8").needs_calibration
    assert get_recipe("w8a8-static").activation == "static" and get_recipe("w8a8-static").needs_calibration
    sq = get_recipe("w8a8-smoothquant")
    assert sq.smoothquant and sq.activation == "static" and sq.alpha == 0.5 and sq.max_static_loss_db == 6.0
    assert get_recipe("w8a8-smoothquant-dynamic").activation == "dynamic"
    assert get_recipe("w8a16").activation is None


def test_unknown_recipe_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown recipe 'w9a9'.*w8a8-smoothquant"):
        get_recipe("w9a9")


def test_unknown_field_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown recipe field\(s\) \['alhpa'\].*'alpha'"):
        resolve({"recipe": "w8a8-smoothquant", "alhpa": 0.8})


def test_unknown_option_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown qcompile option\(s\) \['calibraton'\].*target"):
        split_options({"calibraton": []})


@pytest.mark.parametrize("changes,match", [
    ({"alpha": 1.5}, "alpha must be in"), ({"alpha": "best"}, "alpha must be in"),
    ({"observer": "magic"}, "unknown observer 'magic'.*minmax"), ({"activation": "per-head"}, "activation="),
    ({"percentile": 0}, "percentile"), ({"weight_bits": 3}, "weight_bits"),
    ({"clip": 0}, "clip must be in"), ({"clip": 1.2}, "clip must be in"),
    ({"clip": 0.8, "activation": "dynamic"}, "clip applies to static"),
    ({"smooth_skip": [3]}, "smooth_skip takes module-name patterns"),
])
def test_validation_on_construction(changes, match):
    with pytest.raises(ValueError, match=match):
        get_recipe("w8a8-smoothquant").replace(**changes)


def test_smoothquant_on_weight_only_is_rejected():
    with pytest.raises(ValueError, match="SmoothQuant needs activation quantization"):
        get_recipe("w8a16").replace(smoothquant=True)


def test_options_override_any_field():
    r, target = split_options({"recipe": "w8a8-smoothquant", "alpha": 0.8, "observer": "percentile",
                               "skip": ["lm_head"], "target": "reference"})
    assert (r.name, r.alpha, r.observer, r.skip, target) == ("w8a8-smoothquant", 0.8, "percentile", ("lm_head",), "reference")
    assert split_options(None) == (get_recipe("w8a8"), "auto")


def test_per_module_overrides_by_pattern():
    r = get_recipe("w8a8").replace(skip=["lm_head"], overrides={"*.mlp.*": "w8a16", "*.v_proj": "fp"})
    assert r.for_module("lm_head") is None
    assert r.for_module("model.layers.3.mlp.down_proj").name == "w8a16"
    assert r.for_module("model.layers.3.self_attn.v_proj") is None
    assert r.for_module("model.layers.3.self_attn.q_proj") is r


def test_override_to_unknown_recipe_is_an_error_when_used():
    r = get_recipe("w8a8").replace(overrides={"*": "nope"})
    with pytest.raises(ValueError, match="unknown recipe 'nope'"):
        r.for_module("x")


def test_register_a_new_recipe_in_one_place(monkeypatch):
    monkeypatch.setattr(recipes, "_RECIPES", dict(recipes._RECIPES))  # the registry as it was, afterwards
    name = "w8a8-static-percentile-test"
    recipes.register_recipe(Recipe(name, activation="static", observer="percentile", percentile=99.9))
    assert get_recipe(name).observer == "percentile"
    with pytest.raises(ValueError, match="already registered"):
        recipes.register_recipe(Recipe(name))


@pytest.mark.parametrize("name,bits,fmt,act", [
    ("fp8", 8, "fp8", "dynamic"), ("fp8-static", 8, "fp8", "static"),
    ("w4a16", 4, "int", None), ("w4a16-awq", 4, "int", None), ("w4a16-gptq", 4, "int", None),
    ("w4a16-awq-gptq", 4, "int", None),
])
def test_int4_and_fp8_recipes(name, bits, fmt, act):
    r = get_recipe(name)
    assert (r.weight_bits, r.number_format, r.activation) == (bits, fmt, act)
    assert r.needs_calibration == (r.algorithm != "rtn" or act == "static")


def test_int4_options_from_the_backend():
    r, _ = split_options({"recipe": "w4a16-gptq", "group_size": 64, "symmetric": False, "act_order": True})
    assert (r.group_size, r.symmetric, r.act_order, r.algorithm) == (64, False, True, "gptq")


@pytest.mark.parametrize("base,changes,match", [
    ("w4a16", {"group_size": 48}, "power of two >= 16"), ("w4a16", {"group_size": 8}, "power of two >= 16"),
    ("w4a16", {"group_size": None}, "power of two"), ("w4a16", {"activation": "dynamic"}, "weight-only"),
    ("w8a8", {"group_size": 64}, "apply to 4-bit"), ("w8a8", {"algorithm": "gptq"}, "apply to 4-bit"),
    ("w4a16", {"algorithm": "smart"}, "algorithm='smart'"), ("w4a16", {"number_format": "fp8"}, "FP8 needs"),
    ("fp8", {"number_format": "fp4"}, "number_format="), ("w4a16-gptq", {"gptq_damp": 0}, "gptq_damp"),
    ("auto", {"budget": 0}, "budget must be > 0"),
])
def test_int4_fp8_validation(base, changes, match):
    with pytest.raises(ValueError, match=match):
        get_recipe(base).replace(**changes)


def test_auto_rejects_formats_that_cannot_mix_per_layer():
    from qcompiler.algorithms import auto

    with pytest.raises(ValueError, match="cannot be mixed per layer"):
        auto._formats(get_recipe("auto").replace(auto_formats=("w4a16-awq", "fp")))
    with pytest.raises(ValueError, match="unknown recipe 'w5'"):
        auto._formats(get_recipe("auto").replace(auto_formats=("w5",)))

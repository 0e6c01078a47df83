"""The one Registry type: decorator and call registration, duplicates refused, helpful unknown-name errors."""

from __future__ import annotations

import pytest

from robustvit.registry import Registry


def test_register_by_call_and_decorator_keeps_order():
    registry = Registry("mixer")

    @registry.register("b")
    def b():
        return "b"

    registry.register("a", "value-a")
    assert registry.list() == ["b", "a"]
    assert registry["b"] is b and registry["a"] == "value-a"
    assert "a" in registry and "c" not in registry and len(registry) == 2
    assert list(registry) == ["b", "a"] and registry.items() == [("b", b), ("a", "value-a")]
    assert registry.get("c") is None and registry.get("c", 1) == 1
    registry.register("none", None)  # None is an entry (e.g. "keep the source's activation"), not "decorate"
    assert "none" in registry and registry["none"] is None


def test_duplicate_names_are_refused():
    registry = Registry("loss")
    registry.register("ce", 1)
    with pytest.raises(ValueError, match="loss 'ce' is already registered"):
        registry.register("ce", 2)
    assert registry["ce"] == 1


@pytest.mark.parametrize("name", ["", None, 3])
def test_bad_names_are_refused(name):
    with pytest.raises(ValueError, match="non-empty string"):
        Registry("attack").register(name, object())


def test_unknown_name_lists_known_names():
    registry = Registry("corruption")
    registry.register("blur", 1)
    registry.register("jpeg", 2)
    with pytest.raises(KeyError, match="unknown corruption 'fog'; known: blur, jpeg"):
        registry["fog"]
    with pytest.raises(KeyError, match="known: none"):
        Registry("family")["x"]


def test_list_filters_with_shell_patterns():
    registry = Registry("model source")
    for name in ("timm_vit", "hf_vit", "hf_deit"):
        registry.register(name, name)
    assert registry.list("hf_*") == ["hf_vit", "hf_deit"]
    assert registry.list("*vit") == ["timm_vit", "hf_vit"]
    assert registry.list("none*") == []
    assert repr(registry) == "Registry('model source', ['timm_vit', 'hf_vit', 'hf_deit'])"


def test_type_keyed_registry_matches_classes_by_identity_and_shows_qualified_names():
    rules = Registry("bound rule", keys=type)

    class Scale:
        pass

    first = Scale

    class Scale:  # noqa: F811  (same qualified name, another class: it must not share the rule)
        pass

    rules.register(first, "rule")
    assert rules[first] == "rule" and Scale not in rules and rules.get(Scale) is None
    label = f"{__name__}.test_type_keyed_registry_matches_classes_by_identity_and_shows_qualified_names.<locals>.Scale"
    assert rules.list() == [label] and rules.list("*.Scale") == [label]
    with pytest.raises(ValueError, match=r"bound rule '.*<locals>\.Scale' is already registered"):
        rules.register(first, "another rule")
    with pytest.raises(KeyError, match=r"unknown bound rule '.*<locals>\.Scale'; known: .*<locals>\.Scale"):
        rules[Scale]
    with pytest.raises(ValueError, match="registered for a class"):
        rules.register("Scale", "rule")
    with pytest.raises(ValueError, match="non-empty string"):
        Registry("loss").register(Scale, "rule")
    with pytest.raises(ValueError, match="keyed by str or type"):
        Registry("loss", keys=int)

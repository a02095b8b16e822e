"""Registry: decorator registration, duplicate/missing-Config errors, did-you-mean, lazy family import."""

from __future__ import annotations

import dataclasses
import sys
import textwrap

import pytest

import udmtrain.registry as reg
from udmtrain.registry import Registry, RegistryError, UnknownComponentError


def make_registry(family: str = "widget", base: type | None = None) -> Registry:
    registry = Registry(family, base=base)
    registry._imported = True  # no family modules to import for a test family
    return registry


class Base:
    pass


def make_component(base: type = Base, with_config: bool = True) -> type:
    body = {}
    if with_config:
        body["Config"] = dataclasses.make_dataclass("Config", [("size", int, dataclasses.field(default=3))],
                                                    kw_only=True, frozen=True)
    return type("Widget", (base,), {**body, "__init__": lambda self, cfg, **deps: setattr(self, "cfg", cfg)})


def test_register_get_build():
    registry = make_registry()
    cls = registry.register("small_widget")(make_component())
    assert registry.get("small_widget") is cls and cls.registry_name == "small_widget"
    assert "small_widget" in registry and registry.names() == ["small_widget"]
    built = registry.build("small_widget")
    assert built.cfg == cls.Config() and registry.build("small_widget", cls.Config(size=5)).cfg.size == 5
    assert registry.requirements("small_widget") == {}


def test_duplicate_registration_raises():
    registry = make_registry()
    registry.register("w")(make_component())
    with pytest.raises(RegistryError, match="widget 'w' is registered twice"):
        registry.register("w")(make_component())


def test_missing_config_and_wrong_base_raise():
    registry = make_registry(base=Base)
    with pytest.raises(RegistryError, match="needs a nested dataclass 'Config'"):
        registry.register("w")(make_component(with_config=False))
    with pytest.raises(RegistryError, match="must subclass Base"):
        registry.register("v")(make_component(base=object))


def test_unknown_name_lists_registered_with_did_you_mean():
    registry = make_registry("schedule")
    for name in ("loglinear", "cosine", "geometric"):
        registry.register(name)(make_component())
    with pytest.raises(UnknownComponentError) as info:
        registry.get("log_linear")
    err = info.value
    assert err.suggestions[0] == "loglinear" and err.registered == ["cosine", "geometric", "loglinear"]
    assert str(err) == ("'log_linear' is not a registered schedule; did you mean 'loglinear'? "
                        "(registered: cosine, geometric, loglinear)")
    with pytest.raises(UnknownComponentError) as info:
        registry.get("zzz")
    assert info.value.suggestions == [] and info.value.message() == "'zzz' is not a registered schedule"


def test_lazy_import_of_family_modules(tmp_path, monkeypatch):
    registry = Registry("gadget")
    monkeypatch.setitem(reg.FAMILY_MODULES, "gadget", ("udm_fake_gadgets",))
    monkeypatch.setattr(reg, "REGISTRIES", {**reg.REGISTRIES, "gadget": registry})
    (tmp_path / "udm_fake_gadgets.py").write_text(textwrap.dedent("""
        import dataclasses
        from udmtrain.registry import registry

        @registry("gadget").register("lever")
        class Lever:
            @dataclasses.dataclass(kw_only=True, frozen=True)
            class Config:
                pass

            def __init__(self, cfg):
                self.cfg = cfg
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "udm_fake_gadgets", raising=False)
    assert "udm_fake_gadgets" not in sys.modules
    assert registry.names() == ["lever"]  # the lookup imported the module, which registered itself
    assert "udm_fake_gadgets" in sys.modules


def test_a_new_file_in_a_family_package_registers_itself(tmp_path, monkeypatch):
    registry = Registry("widget")
    monkeypatch.setitem(reg.FAMILY_MODULES, "widget", ("udm_fake_widgets.*",))
    monkeypatch.setattr(reg, "REGISTRIES", {**reg.REGISTRIES, "widget": registry})
    package = tmp_path / "udm_fake_widgets"
    package.mkdir()
    (package / "__init__.py").write_text("")  # lists nothing: the registry finds the files
    for name in ("knob", "dial"):
        (package / f"{name}.py").write_text(textwrap.dedent(f"""
            import dataclasses
            from udmtrain.registry import registry

            @registry("widget").register("{name}")
            class W:
                @dataclasses.dataclass(kw_only=True, frozen=True)
                class Config:
                    pass
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    assert registry.names() == ["dial", "knob"]
    assert reg.expand_modules("udm_fake_widgets.*") == ["udm_fake_widgets", "udm_fake_widgets.dial",
                                                         "udm_fake_widgets.knob"]


def test_unknown_family():
    with pytest.raises(KeyError, match="unknown component family 'gizmo'"):
        reg.registry("gizmo")

import pytest

from robustkd.errors import RegistryError
from robustkd.registry import Registry


def test_register_get_list_and_wildcards():
    reg: Registry[int] = Registry("thing")
    reg.add("resnet18", 1)
    reg.add("resnet34", 2)
    reg.add("vit_tiny", 3)
    assert reg.get("resnet34") == 2
    assert reg.names() == ["resnet18", "resnet34", "vit_tiny"]
    assert reg.names("resnet*") == ["resnet18", "resnet34"]
    assert reg.names("*", exclude="vit*") == ["resnet18", "resnet34"]
    assert "vit_tiny" in reg and len(reg) == 3


def test_duplicate_raises():
    reg: Registry[int] = Registry("thing")
    reg.add("a", 1)
    with pytest.raises(RegistryError, match="already registered"):
        reg.add("a", 2)
    assert reg.get("a") == 1


def test_unknown_suggests_close_matches():
    reg: Registry[int] = Registry("model")
    reg.add("resnet18", 1)
    with pytest.raises(RegistryError, match="unknown model 'resnt18'; did you mean 'resnet18'"):
        reg.get("resnt18")


def test_decorator_uses_function_name():
    reg: Registry = Registry("fn")

    @reg.register()
    def my_model():
        return 1

    assert reg.get("my_model") is my_model

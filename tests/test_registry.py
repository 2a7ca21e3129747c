import pytest

from passl.errors import ConfigError
from passl.registry import Registry


@pytest.fixture
def reg():
    r = Registry("widgets")

    @r.register()
    class Sprocket:
        def __init__(self, teeth, width=1.0):
            self.teeth, self.width = teeth, width

    @r.register("gear_alias")
    def gear(size=3):
        return ("gear", size)

    return r


def test_build_passes_kwargs_and_extra(reg):
    obj = reg.build({"name": "Sprocket", "teeth": 12}, width=2.5)
    assert (obj.teeth, obj.width) == (12, 2.5)
    assert reg.build({"name": "gear_alias", "size": 5}) == ("gear", 5)
    assert reg.names() == ["Sprocket", "gear_alias"]


def test_duplicate_name_is_an_error(reg):
    with pytest.raises(ConfigError, match="'gear_alias' is already registered"):
        reg.register("gear_alias")(lambda: None)


def test_unknown_name_lists_registered_and_suggests(reg):
    with pytest.raises(ConfigError) as e:
        reg.get("Sprocet")
    msg = str(e.value)
    assert "registry 'widgets'" in msg and "Did you mean: Sprocket" in msg
    assert "Registered: Sprocket, gear_alias" in msg


def test_unexpected_kwarg_suggests_valid_ones(reg):
    with pytest.raises(ConfigError) as e:
        reg.build({"name": "Sprocket", "teeth": 3, "widht": 2})
    msg = str(e.value)
    assert "widht" in msg and "Did you mean: width" in msg and "Valid: teeth, width" in msg


def test_missing_required_kwarg_is_named(reg):
    with pytest.raises(ConfigError, match="needs argument\\(s\\) teeth"):
        reg.build({"name": "Sprocket"})


def test_build_needs_a_name(reg):
    with pytest.raises(ConfigError, match="'name' key"):
        reg.build({"teeth": 3})

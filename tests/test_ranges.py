"""Every numeric config key has a declared range (passl.ranges), every default lies inside it, and a value
outside it stops load_config with the key, the value, the range and the file that set it; keys that
would be accepted and then ignored are refused."""
import inspect
import math
import typing

import pytest
import yaml

import passl  # noqa: F401  (fills the registries)
from passl.config import DEFAULTS, Optional, load_config
from passl.errors import ConfigError
from passl.ranges import Range, declared_range, ranged
from passl.registry import REGISTRIES

# where a registry's entry sits in a config, and the keys it needs to build
SECTIONS = {"models": "model", "losses": "loss", "optimizers": "optimizer", "lr_schedules": "lr_schedule",
            "datasets": "data.train.dataset", "label_stores": "data.train.label_store",
            "transforms": "data.train.transforms.0"}


def _numeric(value):
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(_numeric(v) for v in value)


def _schema_numbers(spec, prefix=""):
    """(dotted key, Range or None) of every numeric key of DEFAULTS."""
    for key, sub in spec.items():
        path = prefix + key
        if isinstance(sub, dict):
            yield from _schema_numbers(sub, path + ".")
        elif isinstance(sub, Optional) and isinstance(sub.inner, (Range, type)) and sub.inner not in (str, bool):
            yield path, sub.inner if isinstance(sub.inner, Range) else None
        elif isinstance(sub, Range) or _numeric(sub):
            yield path, sub if isinstance(sub, Range) else None


def _registered_numbers():
    """(registry, entry name, parameter, Range or None) of every numeric keyword of every entry defined
    in passl (entries registered by other tests are skipped)."""
    for registry_name, registry in REGISTRIES.items():
        for name in registry.names():
            if not getattr(registry.get(name), "__module__", "").startswith("passl"):
                continue
            for param in registry.signature(name).values():
                annotation = param.annotation
                base = typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation
                default = param.default if param.default is not inspect.Parameter.empty else None
                if base in (int, float) or _numeric(default) or declared_range(annotation) is not None:
                    yield registry_name, name, param.name, declared_range(annotation)


SCHEMA_KEYS = list(_schema_numbers(DEFAULTS))
REGISTERED_KEYS = list(_registered_numbers())


def test_every_numeric_key_declares_its_range():
    assert len(SCHEMA_KEYS) >= 9 and len(REGISTERED_KEYS) >= 100      # the walk finds the keys at all
    assert [key for key, found in SCHEMA_KEYS if found is None] == []
    assert [f"{r}:{n}.{p}" for r, n, p, found in REGISTERED_KEYS if found is None] == []


def _defaults_of(registry, name):
    return {p.name: p.default for p in REGISTRIES[registry].signature(name).values()
            if p.default is not inspect.Parameter.empty}


@pytest.mark.parametrize("registry,name,key,valid", REGISTERED_KEYS, ids=[f"{n}.{k}" for _, n, k, _ in REGISTERED_KEYS])
def test_registered_defaults_lie_in_their_ranges(registry, name, key, valid):
    default = _defaults_of(registry, name).get(key)
    assert default is None or valid.contains(default), (name, key, default, valid.describe())


def _outside(valid):
    """A value outside ``valid``, of the right type."""
    if valid.items:
        return [] if valid.length is None else [_outside_number(valid)] * valid.length
    return _outside_number(valid)


def _outside_number(valid):
    if valid.low is not None:
        below = valid.low if valid.low_open else valid.low - 1
        return int(below) if valid.kind is int else float(below)
    if valid.high is not None:
        above = valid.high if valid.high_open else valid.high + 1
        return int(above) if valid.kind is int else float(above)
    return math.nan


def _config_file(tmp_path, dotted, value, registry=None, name=None):
    """A config file setting ``dotted`` (with the entry ``name`` of ``registry`` around it) to ``value``."""
    cfg = {"model": {"name": "lvvit_t"}}
    if registry is not None:
        section = {"name": name, **{p.name: "x" for p in REGISTRIES[registry].signature(name).values()
                                    if p.default is inspect.Parameter.empty}}
        parts = SECTIONS[registry].split(".")
        node = cfg
        for part, following in zip(parts, parts[1:] + [None]):
            if following == "0":
                node[part] = [section]
                break
            if following is None:
                node[part] = section
            else:
                node = node.setdefault(part, {})
    node = cfg
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[parts[-1]] = value
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def _assert_refused(path, dotted, value, valid):
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message == f"{dotted}: expected {valid.describe()}, got {value!r} from {path}"


@pytest.mark.parametrize("key,valid", SCHEMA_KEYS, ids=[k for k, _ in SCHEMA_KEYS])
def test_top_level_numbers_out_of_range_name_key_value_range_and_file(tmp_path, key, valid):
    value = _outside(valid)
    _assert_refused(_config_file(tmp_path, key, value), key, value, valid)


@pytest.mark.parametrize("registry,name,key,valid", REGISTERED_KEYS, ids=[f"{n}.{k}" for _, n, k, _ in REGISTERED_KEYS])
def test_registered_numbers_out_of_range_name_key_value_range_and_file(tmp_path, registry, name, key, valid):
    value = _outside(valid)
    dotted = f"{SECTIONS[registry]}.{key}"
    _assert_refused(_config_file(tmp_path, dotted, value, registry, name), dotted, value, valid)


def test_ranges_describe_themselves():
    assert Range(1, kind=int).describe() == "an integer >= 1"
    assert Range(0, 1, high_open=True).describe() == "a number in [0, 1)"
    assert Range(0, low_open=True, note="0: none").describe() == "a number > 0 (0: none)"
    scale = declared_range(ranged(list, 0, 1, low_open=True, length=2, ascending=True))
    assert scale.describe() == "a list of 2 numbers, each in (0, 1], ascending"
    assert scale.contains([0.08, 1.0]) and scale.contains((0.5, 0.5))
    assert not scale.contains([1.0, 0.08]) and not scale.contains([0.0, 1.0]) and not scale.contains([0.5])
    integers = Range(0, 255, kind=int)
    assert integers.contains(0) and not integers.contains(1.0) and not integers.contains(True)
    assert not Range(0).contains(math.inf) and not Range().contains(math.nan)


def test_registry_build_checks_the_same_ranges():
    from passl.registry import TRANSFORMS
    with pytest.raises(ConfigError, match=r"transforms 'RandomHorizontalFlip': prob must be a number in \[0, 1\], got 1.5"):
        TRANSFORMS.build({"name": "RandomHorizontalFlip", "prob": 1.5})


@pytest.mark.parametrize("key,instead", [("grad_clip", "train.grad_clip"), ("multi_precision", None),
                                         ("parameters", None), ("apply_decay_param_fun", None)])
def test_optimizer_keys_the_trainer_sets_are_refused(tmp_path, key, instead):
    path = _config_file(tmp_path, f"optimizer.{key}", 1.0, "optimizers", "AdamW")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert message.startswith(f"unknown key 'optimizer.{key}' in {path}.")
    assert "Valid keys here: beta1, beta2, epsilon, lr, name, reference_batch, weight_decay" in message
    if instead:
        assert f"exists as {instead}; set that instead" in message


def test_a_label_store_for_evaluation_is_refused(tmp_path):
    path = _config_file(tmp_path, "data.val.label_store", {"name": "npy", "root": "labels"})
    with pytest.raises(ConfigError, match=r"^data.val.label_store \(set in .*bad.yaml\): evaluation uses the "
                                          r"image labels only"):
        load_config(path)
    assert load_config(_config_file(tmp_path, "data.val.label_store", None))["data"]["val"]["label_store"] is None


def test_rand_augment_string_numbers_are_ranged():
    from passl.data.randaugment import parse_rand_config
    for text, key in (("rand-n-1", "cannot read"), ("rand-m9-p1.5", "prob must be a number in [0, 1]"),
                      ("rand-mmax0", "magnitude_max must be a number > 0")):
        with pytest.raises(ConfigError) as caught:
            parse_rand_config(text)
        assert key in str(caught.value) and text in str(caught.value)
    assert parse_rand_config("rand-m9-mstd101")["magnitude_std"] == 101.0

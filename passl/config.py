"""YAML configs: ``_base_`` inheritance, ``-o key=value`` overrides, validation and dump.

A config is a plain nested dict. Its shape is fixed by ``DEFAULTS`` below; sections that name a
registered object (``model``, ``loss``, ``optimizer``, ...) are checked against the signature of
what they name, so a model's keyword arguments are its config keys.

Merging rules (``_base_`` files and defaults alike): dicts merge key by key, lists and scalars are
replaced, and a dict whose ``name`` differs from the one below it replaces it whole (a new
``optimizer: {name: SGD}`` does not inherit AdamW's betas).
"""
import copy
import inspect
import os
import re
import typing

import yaml

from passl.errors import ConfigError
from passl.ranges import Range, declared_range
from passl.registry import REGISTRIES, suggest
from passl.utils.fileio import write_text

__all__ = ["load_config", "apply_overrides", "validate", "dump_config",
           "DEFAULTS", "Choice", "Optional", "Built", "ListOf", "Refused", "Range"]


# ---------------------------------------------------------------------------------------------
# schema markers

class Choice:
    """One of a fixed set of values; the first is the default."""

    def __init__(self, *values):
        self.values = values
        self.default = values[0]


class Optional:
    """``None`` or a value of the inner spec; the default is ``None`` unless given."""

    def __init__(self, inner, default=None):
        self.inner = inner
        self.default = default


class Built:
    """A ``{name: ..., **kwargs}`` dict built by the registry ``registry``; ``extra``: {key: spec} of
    keys the engine reads besides the built callable's arguments (the builder drops them)."""

    def __init__(self, registry, default=None, extra=None):
        self.registry = registry
        self.default = default
        self.extra = dict(extra or {})


class ListOf:
    """A list whose items follow ``inner``."""

    def __init__(self, inner, default=()):
        self.inner = inner
        self.default = list(default)


class Refused:
    """A key that would be accepted and then ignored: setting it is an error saying ``why``."""

    def __init__(self, why):
        self.why = why
        self.default = None


def _data_split(batch_size, split):
    return {
        "dataset": Optional(Built("datasets")),
        # evaluation scores the class output against image labels: a label store there would be
        # checked at start-up and then never read
        "label_store": Optional(Built("label_stores")) if split == "train" else Optional(Refused(
            "evaluation uses the image labels only and never reads label maps; remove it "
            "(dense labels belong in data.train.label_store)")),
        "transforms": ListOf(Built("transforms")),
        "batch_size": Range(1, kind=int, default=batch_size),   # per process
        "num_workers": Range(0, kind=int, default=4, note="loader processes per training process; "
                                                          "0 loads in the training process"),
        "skip_bad_images": False,      # True: undecodable images are skipped, counted and listed
    }


DEFAULTS = {
    "seed": Range(0, 2 ** 32 - 1, kind=int, default=0),
    "device": Choice("auto", "cpu", "gpu"),
    "output_dir": "output/run",
    "epochs": Range(1, kind=int, default=300),
    # sync_bn: BatchNorm as SyncBatchNorm over the processes of a multi-GPU run (passl.build_model drops it)
    "model": Built("models", extra={"sync_bn": False}),
    "loss": Built("losses", {"name": "TokenLabelCrossEntropy"}),
    "optimizer": Built("optimizers", {"name": "AdamW"}),
    "lr_schedule": Built("lr_schedules", {"name": "WarmupCosine"}),
    "data": {"train": _data_split(128, "train"), "val": _data_split(128, "val")},
    "ema": {"enable": True, "decay": Range(0, 1, default=0.99992)},
    "amp": {"enable": Choice("auto", True, False), "level": Choice("O1", "O2"),
            "dtype": Choice("float16", "bfloat16"),
            "max_nonfinite_steps": Range(1, kind=int, default=10, note=(
                "float16 loss scaling skips a step whose loss is NaN or infinite; this many in a row stop "
                "the run. Without a loss scaler (float32, bfloat16) the first one stops it"))},
    "train": {
        "accum_steps": Range(1, kind=int, default=1),
        "grad_clip": Optional(Range(0, low_open=True)),   # max global grad norm, or null for none
        "log_interval": Range(1, kind=int, default=50),   # optimizer steps
        "eval_interval": Range(1, kind=int, default=1),   # epochs
        # which weights are scored to keep best.pdckpt / best_model.*: 'ema' the EMA when there is one
        # (the reference), 'model' the trained weights, 'better' whichever of the two scores higher
        "select_best": Choice("ema", "model", "better"),
        "keep_last": Range(0, kind=int, default=3,
                           note="epoch checkpoints kept besides latest.pdckpt and best.pdckpt; 0 keeps just those"),
        "load": Optional(str),         # initial weights when --load is not given (fine-tuning)
        "reinit_head": False,          # loading weights for other classes: re-initialise head, aux_head
    },
}


# ---------------------------------------------------------------------------------------------
# YAML

class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` as a float (YAML 1.1 wants ``1.0e-3``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                  |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                  |\.[0-9_]+(?:[eE][-+][0-9]+)?
                  |[-+]?\.(?:inf|Inf|INF)
                  |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_value(text):
    """Parse an override value as YAML (``1e-3`` -> float, ``[1,2]`` -> list, ``abc=def`` -> str)."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError:
        return text


def _read_yaml(path):
    if os.path.isdir(path):
        raise ConfigError(f"config file {path} is a folder; name a .yaml file in it "
                          "(e.g. configs/lvvit/lvvit_tiny.yaml)")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        try:
            data = yaml.load(f, Loader=_Loader)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start}); "
                              "is it a config file?") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config must be a mapping at the top level, got {type(data).__name__}")
    return data


def _merge(base, child, origins, source, prefix=""):
    """Merge ``child`` into a copy of ``base``; record in ``origins`` where each key came from."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        path = f"{prefix}{key}"
        below = out.get(key)
        if isinstance(value, dict) and isinstance(below, dict) and value.get("name", below.get("name")) == below.get("name"):
            out[key] = _merge(below, value, origins, source, path + ".")
        else:
            out[key] = copy.deepcopy(value)
            for stale in [k for k in origins if k.startswith(path + ".")]:
                del origins[stale]
            _record(value, origins, source, path)
    return out


def _record(value, origins, source, path):
    origins[path] = source
    if isinstance(value, dict):
        for k, v in value.items():
            _record(v, origins, source, f"{path}.{k}")


def _load_with_bases(path, origins, seen=()):
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f"{path}: _base_ files include each other in a cycle: {' -> '.join(seen + (path,))}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise ConfigError(f"{path}: _base_ must be a file name or a list of file names")
    merged = {}
    for base in bases:
        base_path = os.path.join(os.path.dirname(path), base)
        if not os.path.isfile(base_path):
            raise ConfigError(f"{path}: _base_ file '{base}' not found (looked at {base_path}); "
                              "_base_ paths are relative to the file that names them")
        merged = _merge(merged, _load_with_bases(base_path, origins, seen + (path,)), origins, base_path)
    return _merge(merged, data, origins, path)


# ---------------------------------------------------------------------------------------------
# defaults

def _default_of(spec):
    if isinstance(spec, dict):
        return {k: _default_of(v) for k, v in spec.items()}
    if isinstance(spec, (Choice, Optional, Built, ListOf, Range, Refused)):
        return copy.deepcopy(spec.default)
    return copy.deepcopy(spec)


def _fill_defaults(cfg, spec):
    """Return ``cfg`` with every key of the dict ``spec`` that it lacks set to its default."""
    out = {}
    for key, sub in spec.items():
        if key not in cfg:
            out[key] = _default_of(sub)
        elif isinstance(sub, dict) and isinstance(cfg[key], dict):
            out[key] = _fill_defaults(cfg[key], sub)
        elif isinstance(sub, Built) and isinstance(sub.default, dict) and isinstance(cfg[key], dict) \
                and cfg[key].get("name", sub.default["name"]) == sub.default["name"]:
            out[key] = {**sub.default, **cfg[key]}
        else:
            out[key] = cfg[key]
    for key in cfg:
        if key not in spec:
            out[key] = cfg[key]   # validate() reports it
    return out


# ---------------------------------------------------------------------------------------------
# overrides

def _split_path(dotted):
    return [int(p) if re.fullmatch(r"-?\d+", p) else p for p in dotted.split(".")]


def apply_overrides(cfg, overrides, origins=None):
    """Apply ``["a.b.c=value", ...]`` to a copy of ``cfg``; values are parsed as YAML."""
    cfg = copy.deepcopy(cfg)
    origins = {} if origins is None else origins
    for item in overrides or ():
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.path=value (e.g. -o epochs=100)")
        dotted, text = item.split("=", 1)
        parts = _split_path(dotted.strip())
        if not dotted.strip() or any(p == "" for p in parts):
            raise ConfigError(f"override '{item}': empty key")
        node, walked = cfg, []
        for part in parts[:-1]:
            walked.append(str(part))
            node = _step(node, part, item, walked, create=True)
        last = parts[-1]
        value = parse_value(text)
        if isinstance(node, list):
            _check_index(node, last, item, walked + [str(last)])
            node[last] = value
        elif isinstance(node, dict):
            node[last] = value
        else:
            raise ConfigError(f"override '{item}': '{'.'.join(walked)}' is a {type(node).__name__}, "
                              "not a section or a list")
        _record(value, origins, f"-o {item}", dotted.strip())
    return cfg


def _step(node, part, item, walked, create):
    if isinstance(node, list):
        _check_index(node, part, item, walked)
        return node[part]
    if isinstance(node, dict):
        if part not in node and create:
            node[part] = {}
        return node[part]
    raise ConfigError(f"override '{item}': '{'.'.join(walked[:-1])}' is a {type(node).__name__}, "
                      "not a section or a list")


def _check_index(node, part, item, walked):
    if not isinstance(part, int) or not -len(node) <= part < len(node):
        raise ConfigError(f"override '{item}': '{'.'.join(walked)}' is not an index of the list "
                          f"'{'.'.join(walked[:-1])}' (it has {len(node)} items, 0-{len(node) - 1})")


# ---------------------------------------------------------------------------------------------
# validation

def _origin(origins, path):
    while path:
        if path in origins:
            return origins[path]
        path = path.rpartition(".")[0]
    return "the defaults"


def _type_name(spec):
    if isinstance(spec, type):
        return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                list: "a list", dict: "a mapping"}.get(spec, spec.__name__)
    return _type_name(type(spec))


def _check_scalar(value, expected, path, origins):
    """``expected`` is an example value or a type. Returns the value, ints widened to float."""
    kind = expected if isinstance(expected, type) else type(expected)
    if expected is None or kind is type(None) or value is None and kind is object:
        return value
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        list: lambda v: isinstance(v, (list, tuple)),
        tuple: lambda v: isinstance(v, (list, tuple)),
        dict: lambda v: isinstance(v, dict),
    }.get(kind, lambda v: True)(value)
    if not ok:
        raise ConfigError(f"{path}: expected {_type_name(kind)}, got {value!r} "
                          f"({type(value).__name__}) from {_origin(origins, path)}")
    return float(value) if kind is float else value


def _schema_paths(spec, prefix=""):
    """Every dotted key of the schema ``spec`` (sections included)."""
    for key, sub in spec.items():
        yield prefix + key
        if isinstance(sub, dict):
            yield from _schema_paths(sub, f"{prefix}{key}.")


def _unknown(key, valid, path, origins):
    where = _origin(origins, path)
    elsewhere = [p for p in _schema_paths(DEFAULTS) if p.rpartition(".")[2] == key and p != path]
    moved = f" The key '{key}' exists as {', '.join(elsewhere)}; set that instead." if elsewhere else ""
    return ConfigError(f"unknown key '{path}' in {where}.{suggest(key, valid)}{moved} "
                       f"Valid keys here: {', '.join(sorted(map(str, valid)))}")


def _param_spec(param):
    """The spec to check a registered callable's keyword argument against: its declared Range
    (passl.ranges), else its annotated type, else the type of its default; None when unknown."""
    ann = param.annotation
    spec = declared_range(ann)
    if typing.get_origin(ann) is typing.Annotated:
        ann = typing.get_args(ann)[0]
    if spec is None and isinstance(ann, type) and ann is not inspect.Parameter.empty:
        spec = ann
    if spec is None and param.default is not inspect.Parameter.empty and param.default is not None:
        spec = type(param.default)
    if spec is None:
        return None
    if param.default is None:
        return Optional(spec)
    return spec


def _check_range(value, spec, path, origins):
    """``value`` checked for type and range against the Range ``spec``; ints widened to float."""
    if spec.items:
        value = _check_scalar(value, list, path, origins)
        value = [_check_scalar(v, spec.kind, f"{path}.{i}", origins) for i, v in enumerate(value)]
    else:
        value = _check_scalar(value, spec.kind, path, origins)
    if not spec.contains(value):
        raise ConfigError(f"{path}: expected {spec.describe()}, got {value!r} from {_origin(origins, path)}")
    return value


def _validate(value, spec, path, origins):
    if isinstance(spec, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path or 'config'}: expected a mapping of keys, got {value!r} "
                              f"from {_origin(origins, path)}")
        return {k: (_validate(v, spec[k], f"{path}{'.' if path else ''}{k}", origins) if k in spec
                    else _raise(_unknown(k, list(spec), f"{path}{'.' if path else ''}{k}", origins)))
                for k, v in value.items()}
    if isinstance(spec, Optional):
        return None if value is None else _validate(value, spec.inner, path, origins)
    if isinstance(spec, Range):
        return _check_range(value, spec, path, origins)
    if isinstance(spec, Refused):
        raise ConfigError(f"{path} (set in {_origin(origins, path)}): {spec.why}")
    if isinstance(spec, Choice):
        if not any(value == c and type(value) is type(c) for c in spec.values):
            raise ConfigError(f"{path}: expected one of {', '.join(map(str, spec.values))}, got {value!r} "
                              f"from {_origin(origins, path)}")
        return value
    if isinstance(spec, ListOf):
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected a list, got {value!r} from {_origin(origins, path)}")
        return [_validate(v, spec.inner, f"{path}.{i}", origins) for i, v in enumerate(value)]
    if isinstance(spec, Built):
        return _validate_built(value, spec, path, origins)
    return _check_scalar(value, spec, path, origins)


def _raise(err):
    raise err


def _validate_built(value, spec, path, origins):
    registry = REGISTRIES[spec.registry]
    if not isinstance(value, dict) or "name" not in value:
        raise ConfigError(f"{path}: expected a mapping with a 'name' from registry '{registry.name}' "
                          f"(one of: {', '.join(registry.names())}), got {value!r} from {_origin(origins, path)}")
    try:
        params = registry.signature(value["name"])
    except ConfigError as e:
        raise ConfigError(f"{path}.name (from {_origin(origins, path + '.name')}): {e}") from None
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    valid = [k for k, p in params.items()
             if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
    out = {"name": value["name"]}
    for key, item in value.items():
        if key == "name":
            continue
        sub = f"{path}.{key}"
        if key in spec.extra:
            out[key] = _validate(item, spec.extra[key], sub, origins)
            continue
        if key not in params:
            if takes_any:
                out[key] = item
                continue
            raise _unknown(key, valid + ["name"] + list(spec.extra), sub, origins)
        check = _param_spec(params[key])
        out[key] = item if check is None else _validate(item, check, sub, origins)
    return out


def validate(cfg, origins=None):
    """Check ``cfg`` against ``DEFAULTS`` and the registries; return it with ints widened to floats
    where floats belong. Raises ConfigError naming the key, where it was set and what would fit."""
    return _validate(cfg, DEFAULTS, "", origins or {})


# ---------------------------------------------------------------------------------------------
# entry points

def load_config(path, overrides=()):
    """Read ``path`` (following ``_base_``), fill defaults, apply ``overrides``, validate."""
    origins = {}
    cfg = _load_with_bases(path, origins)
    cfg = _fill_defaults(cfg, DEFAULTS)
    cfg = apply_overrides(cfg, overrides, origins)
    cfg = _fill_defaults(cfg, DEFAULTS)  # an override may have replaced a section with a new name
    return validate(cfg, origins)


def dump_config(cfg, path):
    """Write ``cfg`` as YAML atomically; ``load_config(path)`` gives ``cfg`` back."""
    return write_text(path, to_yaml(cfg))


def to_yaml(cfg):
    return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)

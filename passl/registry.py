"""One Registry class: register callables by name, build them from ``{name: ..., **kwargs}`` dicts.

The project's registries fill themselves on their first lookup by importing the packages that
register into them (``fill_registries``), so that ``import passl`` imports neither those packages
nor paddle and an entry point can set up the process first (passl/utils/runtime.py).
"""
import difflib
import functools
import importlib
import inspect

from passl.errors import ConfigError
from passl.ranges import declared_range

__all__ = ["Registry", "MODELS", "LOSSES", "DATASETS", "LABEL_STORES", "TRANSFORMS",
           "OPTIMIZERS", "LR_SCHEDULES", "REGISTRIES", "fill_registries"]


def suggest(name, candidates, n=3):
    """Return ' Did you mean: a, b?' for the candidates closest to ``name``, or ''."""
    close = difflib.get_close_matches(str(name), [str(c) for c in candidates], n=n, cutoff=0.5)
    return f" Did you mean: {', '.join(close)}?" if close else ""


class Registry:
    """A name -> callable table. ``@REG.register()`` or ``@REG.register("alias")``.

    fill: called before every lookup (not before ``register``), to import whatever registers here."""

    def __init__(self, name, fill=None):
        self.name = name
        self._entries = {}
        self._fill = fill

    def _all(self):
        if self._fill is not None:
            self._fill()
        return self._entries

    def __contains__(self, name):
        return name in self._all()

    def __len__(self):
        return len(self._all())

    def names(self):
        return sorted(self._all())

    def register(self, name=None):
        def decorator(obj):
            key = name or obj.__name__
            if key in self._entries:
                raise ConfigError(
                    f"registry '{self.name}': '{key}' is already registered "
                    f"(by {_where(self._entries[key])}); pick another name")
            self._entries[key] = obj
            return obj
        if callable(name):  # used as @REG.register without parentheses
            obj, name = name, None
            return decorator(obj)
        return decorator

    def register_variant(self, name, builder, defaults, doc):
        """Register ``name``: ``builder`` with a published variant's ``defaults`` bound as keyword defaults (a
        functools.partial, so that ``inspect.signature``, and the config checker, show every keyword with the
        variant's value)."""
        factory = functools.partial(builder, **defaults)
        factory.__name__ = factory.__qualname__ = name
        factory.__module__ = builder.__module__
        factory.__doc__ = doc
        return self.register(name)(factory)

    def get(self, name):
        if name not in self._all():
            listed = ", ".join(self.names()) or "(nothing registered)"
            raise ConfigError(
                f"registry '{self.name}' has no entry '{name}'.{suggest(name, self._entries)} "
                f"Registered: {listed}")
        return self._entries[name]

    def signature(self, name):
        """The parameters a config dict for ``name`` may set: {param: inspect.Parameter}."""
        obj = self.get(name)
        target = obj.__init__ if inspect.isclass(obj) else obj
        params = dict(inspect.signature(target).parameters)
        params.pop("self", None)
        return params

    def build(self, cfg, **extra):
        """Build ``cfg['name']`` with the other keys (and ``extra``) as keyword arguments."""
        if not isinstance(cfg, dict) or "name" not in cfg:
            raise ConfigError(f"registry '{self.name}': expected a dict with a 'name' key, got {cfg!r}")
        kwargs = {k: v for k, v in cfg.items() if k != "name"}
        kwargs.update(extra)
        name = cfg["name"]
        obj = self.get(name)
        params = self.signature(name)
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        unknown = [k for k in kwargs if k not in params] if not takes_any else []
        if unknown:
            valid = [p for p, v in params.items()
                     if v.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)]
            raise ConfigError(
                f"{self.name} '{name}' got unexpected argument(s) {', '.join(unknown)}."
                f"{suggest(unknown[0], valid)} Valid: {', '.join(valid)}")
        missing = [p for p, v in params.items() if v.default is inspect.Parameter.empty
                   and v.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
                   and p not in kwargs]
        if missing:
            raise ConfigError(f"{self.name} '{name}' needs argument(s) {', '.join(missing)}; "
                              "add them to its config section")
        for key, value in kwargs.items():   # the declared ranges (passl.ranges), as the config check does
            declared = declared_range(params[key].annotation) if key in params else None
            if declared is not None and value is not None and not declared.contains(value):
                raise ConfigError(f"{self.name} '{name}': {key} must be {declared.describe()}, got {value!r}")
        return obj(**kwargs)


def _where(obj):
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', obj)}"


# the packages whose import registers every model, loss, dataset, label store, transform, optimizer
# and lr schedule (the cnn_classifier annotator model is in passl.annotate)
PROVIDERS = ("passl.models", "passl.losses", "passl.data", "passl.engine", "passl.annotate")
_filled = False


def fill_registries():
    """Import PROVIDERS once (and check the Paddle version first); later calls return at once."""
    global _filled
    if _filled:
        return
    _filled = True   # first: the imports below register, and may look up, re-entrantly
    from passl.utils.paddle_check import check_paddle
    check_paddle()
    for module in PROVIDERS:
        importlib.import_module(module)


MODELS = Registry("models", fill_registries)
LOSSES = Registry("losses", fill_registries)
DATASETS = Registry("datasets", fill_registries)
LABEL_STORES = Registry("label_stores", fill_registries)
TRANSFORMS = Registry("transforms", fill_registries)
OPTIMIZERS = Registry("optimizers", fill_registries)
LR_SCHEDULES = Registry("lr_schedules", fill_registries)

REGISTRIES = {r.name: r for r in (MODELS, LOSSES, DATASETS, LABEL_STORES, TRANSFORMS,
                                   OPTIMIZERS, LR_SCHEDULES)}

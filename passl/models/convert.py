"""Published PyTorch weights (LV-ViT, VOLO, ViT/DeiT) -> Paddle, and strict weight loading from any
weights file.

The Paddle model keeps the reference names, so conversion is: strip ``module.`` prefixes, drop
``num_batches_tracked``, rename BN ``running_mean/var`` to ``_mean/_variance`` and transpose Linear
weights ((out, in) in PyTorch, (in, out) in Paddle). Loading is strict: every key and shape must
match, except what the caller explicitly allows (pos_embed of another grid is resized; a new head
size with ``allow_new_head``), and each exception is logged.

:func:`load_pretrained` is the one way weights get into a model (the trainer's ``--load`` and
``--evaluate-only``, export, the annotators of generate_labels): it reads .pdparams, .pdckpt (the
best weights), .pth / .pth.tar, .safetensors and PASSL v1.1 ``.pd`` checkpoints through passl.io,
which never runs code from a file.
"""
import collections
import json
import os

import numpy as np
import paddle

from passl.errors import CheckpointError
from passl.models import vit, volo
from passl.models.lvvit import VARIANTS
from passl.models.pos_embed import grid_of, pos_embed_grid, resize_pos_embed

__all__ = ["convert_torch_state_dict", "detect_variant", "extract_state_dict", "read_weights",
           "load_pretrained", "convert_checkpoint", "weights_metadata", "TORCH_SUFFIXES"]

TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".tar")
_PREFIXES = ("module.", "_layers.")     # DataParallel (torch) and paddle.DataParallel wrappers
_WRAPPER_PREFIXES = ("backbone.",)      # stripped when every key has it: PASSL's LVViTWrapper
PADDLE_LAYOUT = "paddle"   # .safetensors metadata of files written here
_HEAD_KEYS = ("head.weight", "head.bias", "aux_head.weight", "aux_head.bias")


def _to_numpy(value):
    return value if isinstance(value, np.ndarray) else np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def _is_tensor(value):
    return isinstance(value, np.ndarray) or isinstance(value, paddle.Tensor)


def strip_prefixes(state_dict):
    """Remove ``module.`` / ``_layers.`` wrapper prefixes from every key, and ``backbone.`` when every
    key has it (PASSL v1.1 saves LVViTWrapper, whose LV-ViT is its ``backbone``)."""
    out = collections.OrderedDict()
    for key, value in state_dict.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    for prefix in _WRAPPER_PREFIXES:
        if out and all(key.startswith(prefix) for key in out):
            out = collections.OrderedDict((key[len(prefix):], value) for key, value in out.items())
    return out


def _find_weights(obj, ema, source):
    """(state dict, which) inside a loaded file; which is 'model', 'ema' or 'weights' (a bare state dict).

    A checkpoint of this project's trainer gives its best weights (the EMA when it won) unless
    ``ema`` asks for the EMA; a PyTorch / PASSL checkpoint its ``state_dict`` (``state_dict_ema``
    with ``ema``)."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    best = obj.get("best")
    if not ema and isinstance(obj.get("model"), dict) and isinstance(best, dict) and best.get("which") == "ema" \
            and isinstance(obj.get("ema"), dict) and obj["ema"]:
        return strip_prefixes(obj["ema"]), "ema"
    candidates = ("state_dict_ema", "model_ema", "ema") if ema else ("state_dict", "model")
    for key in candidates:
        if isinstance(obj.get(key), dict) and obj[key]:
            return _find_weights(obj[key], False, f"{source}[{key}]")[0], "ema" if ema else "model"
    tensors = {k: v for k, v in obj.items() if _is_tensor(v)}
    if tensors and not ema:
        return strip_prefixes(tensors), "weights"
    raise CheckpointError(f"{source}: no {' / '.join(candidates)} entry found (top-level keys: "
                          f"{', '.join(map(str, list(obj)[:20]))})"
                          f"{'; the file has no EMA weights, drop --ema / ema' if ema else ''}")


def extract_state_dict(obj, ema=False, source="checkpoint"):
    """The weights inside a loaded file: a raw state dict, or a dict holding ``state_dict`` /
    ``model`` (or, with ``ema``, ``state_dict_ema`` / ``model_ema`` / ``ema``); a checkpoint of this
    project's trainer gives its best weights. Prefixes stripped."""
    return _find_weights(obj, ema, source)[0]


def convert_torch_state_dict(state_dict):
    """PyTorch-layout LV-ViT state dict -> Paddle layout, as an OrderedDict of numpy arrays.

    Linear weights (every 2-D ``*.weight``) are transposed (out, in) -> (in, out); BN
    ``running_mean`` / ``running_var`` become ``_mean`` / ``_variance``; ``num_batches_tracked``
    is dropped; ``module.`` prefixes are stripped. Other tensors keep their shapes.
    """
    out = collections.OrderedDict()
    for key, value in strip_prefixes(state_dict).items():
        if key.endswith("num_batches_tracked"):
            continue
        array = _to_numpy(value)
        if key.endswith(".running_mean"):
            key = key[:-len("running_mean")] + "_mean"
        elif key.endswith(".running_var"):
            key = key[:-len("running_var")] + "_variance"
        elif key.endswith(".weight") and array.ndim == 2:
            array = np.ascontiguousarray(array.T)
        out[key] = array
    return out


def _is_torch_layout(state_dict):
    return any(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in state_dict)


# families with a key layout of their own: each matcher returns (variant or None, img_size) for a state
# dict of its family and None otherwise; LV-ViT, the original layout, is what remains
FAMILY_MATCHERS = (volo.match_state_dict, vit.match_state_dict)


def detect_variant(state_dict):
    """(name, img_size) of an LV-ViT, VOLO or ViT/DeiT state dict (PyTorch or Paddle layout) from its shapes.

    name is a registered variant (lvvit_t/s/m/l, volo_d1..d5, deit_tiny/small/base), or None when no
    published variant has these shapes; img_size = token grid side * 16 (e.g. 224 for 14x14, 448 for 28x28).
    """
    sd = strip_prefixes(state_dict)
    for match in FAMILY_MATCHERS:
        found = match(sd)
        if found is not None:
            return found
    if "pos_embed" not in sd:
        raise CheckpointError("not an LV-ViT state dict: no 'pos_embed' key "
                              f"(first keys: {', '.join(list(sd)[:8])})")
    pos_shape = _to_numpy(sd["pos_embed"]).shape
    dim = pos_shape[-1]
    depth = len({k.split(".")[1] for k in sd if k.startswith("blocks.") and k.endswith(".norm1.weight")})
    if "patch_embed.conv1.weight" in sd:
        width = _to_numpy(sd["patch_embed.conv1.weight"]).shape[0]
        stem = {64: "pe4_2", 128: "pe4_2_128"}.get(width, f"conv{width}")
        patch = 2 * _to_numpy(sd["patch_embed.proj.weight"]).shape[-1]
    else:
        stem, patch = "patch16", _to_numpy(sd["patch_embed.proj.weight"]).shape[-1]
    side = grid_of(pos_shape[1] - 1)[0]
    name = next((n for n, v in VARIANTS.items()
                 if (v.arch["embed_dim"], v.arch["depth"], v.arch["stem"]) == (dim, depth, stem)), None)
    return name, side * patch


def _torch_layout_file(path, fmt):
    """Whether the weights in ``path`` are in PyTorch layout (Linear weights (out, in)) whatever their
    names say: every PyTorch file, and a .safetensors file whose metadata says ``format: pt`` (how timm
    and the Hugging Face hub mark PyTorch tensors) unless this project wrote it (``layout: paddle``).
    Other files are judged by their BN statistics' names (_is_torch_layout)."""
    if fmt.name == "safetensors":
        from passl.io import safetensors_metadata
        meta = safetensors_metadata(path)
        return meta.get("layout") != PADDLE_LAYOUT and meta.get("format") == "pt"
    return fmt.name == "pytorch"


def _read_weights(source, ema=False):
    """(Paddle-layout {key: numpy array}, which, classes) of a path or a dict; see :func:`read_weights`.
    ``classes``: the class names the weights were trained on, when the file records them (a trainer
    checkpoint, best_model.safetensors), else None."""
    torch_file, classes = False, None
    if isinstance(source, (str, os.PathLike)):
        from passl.io import format_of, read_state
        path = os.fspath(source)
        fmt = format_of(path)
        torch_file = _torch_layout_file(path, fmt)   # BN statistics or not
        obj = read_state(path)
        state_dict, which = _find_weights(obj, ema, path)
        classes = _recorded_classes(obj, path, fmt)
    else:
        state_dict, which = _find_weights(source, ema, "state dict")
    if torch_file or _is_torch_layout(state_dict):
        return convert_torch_state_dict(state_dict), which, classes
    return collections.OrderedDict((k, _to_numpy(v)) for k, v in state_dict.items()), which, classes


def _recorded_classes(obj, path, fmt):
    """The training classes a trainer checkpoint (``classes``) or a .safetensors file (metadata) records."""
    if fmt.name == "safetensors":
        from passl.io import safetensors_metadata
        try:
            classes = json.loads(safetensors_metadata(path).get("classes", "null"))
        except ValueError:
            classes = None
    else:
        classes = obj.get("classes") if isinstance(obj, dict) else None
    return classes if isinstance(classes, list) and all(isinstance(c, str) for c in classes) else None


def read_weights(source, ema=False):
    """Paddle-layout state dict {key: numpy array} from a path (.pdparams, .pdckpt, .safetensors,
    PASSL .pd; .pth / .pth.tar / .pt converted on the fly) or from a dict (a PyTorch-layout dict is
    recognised by its BN running stats). Reading never runs code from the file (passl.io)."""
    return _read_weights(source, ema)[0]


def weights_metadata(state_dict, model_cfg=None, **extra):
    """Strings describing weights, for a .safetensors header: layout ('paddle': Linear weights (in, out)),
    variant (a published name such as lvvit_s, else the config's model name), img_size, num_classes, and
    the config's ``model:`` section."""
    meta = {"layout": PADDLE_LAYOUT}
    try:
        variant, size = detect_variant(state_dict)
        meta.update(variant=variant or (model_cfg or {}).get("name", "custom"), img_size=str(size))
    except (CheckpointError, KeyError, IndexError):
        if model_cfg:
            meta["variant"] = str(model_cfg.get("name", "custom"))
            if model_cfg.get("img_size") is not None:
                meta["img_size"] = json.dumps(model_cfg["img_size"])
    if "head.bias" in state_dict:
        meta["num_classes"] = str(int(_to_numpy(state_dict["head.bias"]).shape[0]))
    if model_cfg:
        meta["model"] = json.dumps(model_cfg)
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in extra.items()})
    return meta


def _listing(title, items, limit=25):
    items = list(items)
    shown = "\n    ".join(items[:limit]) + (f"\n    ... and {len(items) - limit} more" if len(items) > limit else "")
    return f"  {title} ({len(items)}):\n    {shown}"


def _prefix_hint(file_keys, model_keys):
    """When every key differs only by a prefix, a sentence saying which; else None."""
    file_keys, model_keys = set(file_keys), set(model_keys)
    for longer, shorter, side in ((file_keys, model_keys, "file"), (model_keys, file_keys, "model")):
        if not shorter or len(longer) != len(shorter):
            continue
        sample = min(longer)
        for key in shorter:
            prefix = sample[:-len(key)]
            if sample.endswith(key) and prefix and {prefix + k for k in shorter} == longer:
                if side == "file":
                    return (f"every key in the file is a model key with '{prefix}' in front: the weights were saved "
                            f"from a wrapper around this model; remove that prefix from the keys")
                return (f"every model key is a key of the file with '{prefix}' in front: the file holds the weights "
                        f"of the model's inner part; load it into that part, or add the prefix to the keys")
    return None


def load_pretrained(model, source, allow_new_head=False, log=print, ema=False):
    """Load weights into ``model`` strictly and return a report dict.

    source: a path (.pdparams; .pdckpt: its best weights; .safetensors; PASSL .pd; .pth / .pth.tar
    converted on the fly) or a state dict of numpy arrays / paddle tensors (Paddle layout, or PyTorch
    layout recognised by BN running stats). ``ema`` takes the file's EMA weights.
    A pos_embed of another token grid is resized bicubically (cls position kept) and logged;
    with ``allow_new_head`` a head / aux_head of another class count is re-initialised and logged.
    Any other missing, unexpected or shape-mismatched key raises CheckpointError listing them.
    Report: {source, which: 'model' | 'ema' | 'weights', loaded, pos_embed_resized: None or
    (old_grid, new_grid), reinitialized: [keys], classes: the class names the file records (None if none)}.
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "state dict"
    weights, which, classes = _read_weights(source, ema)
    targets = model.state_dict()
    report = {"source": name, "which": which, "loaded": 0, "pos_embed_resized": None, "reinitialized": [],
              "classes": classes}

    if hasattr(model, "complete_weights"):   # a model that fills keys its family's foreign checkpoints lack
        weights = model.complete_weights(weights, log=lambda message: log(f"{name}: {message}"))

    if "pos_embed" in weights and "pos_embed" in targets:
        have, want = weights["pos_embed"].shape, tuple(targets["pos_embed"].shape)
        if have != want and len(have) == len(want) and have[-1] == want[-1]:
            new_grid = tuple(getattr(model, "grid_size", pos_embed_grid(want)))
            old_grid = pos_embed_grid(have)
            weights["pos_embed"] = resize_pos_embed(weights["pos_embed"], new_grid, old_grid)
            report["pos_embed_resized"] = (old_grid, new_grid)
            log(f"{name}: pos_embed resized from a {old_grid[0]}x{old_grid[1]} to a "
                f"{new_grid[0]}x{new_grid[1]} token grid (bicubic{', cls position kept' if len(have) == 3 else ''})")

    head_differs = [k for k in _HEAD_KEYS if k in weights and k in targets
                    and tuple(weights[k].shape) != tuple(targets[k].shape)]
    if head_differs and allow_new_head:
        file_classes = weights["head.bias"].shape[0] if "head.bias" in weights else "?"
        for key in _HEAD_KEYS:
            weights.pop(key, None)
        model.reset_heads()
        report["reinitialized"] = [k for k in _HEAD_KEYS if k in targets]
        log(f"{name}: head and aux_head re-initialised for {targets['head.bias'].shape[0]} classes "
            f"(the weights were trained for {file_classes})")

    missing = [k for k in targets if k not in weights and k not in report["reinitialized"]]
    unexpected = [k for k in weights if k not in targets]
    mismatched = [f"{k}: file {list(weights[k].shape)} vs model {list(targets[k].shape)}"
                  for k in weights if k in targets and tuple(weights[k].shape) != tuple(targets[k].shape)]
    if missing or unexpected or mismatched:
        parts = [f"{name} does not fit the model ({type(model).__name__}):"]
        if missing:
            parts.append(_listing("missing from the file", missing))
        if unexpected:
            parts.append(_listing("unexpected in the file", unexpected))
        if mismatched:
            parts.append(_listing("shape mismatch", mismatched))
        hint = _prefix_hint(weights, targets) if not mismatched else None
        if hint is None:
            hint = ("check that the config's model variant matches the weights "
                    "(tools/convert_weights.py prints the detected variant)")
        if any(k.split(":")[0] in _HEAD_KEYS for k in mismatched):
            hint += "; for a new number of classes load with allow_new_head=True"
        parts.append(f"  fix: {hint}")
        raise CheckpointError("\n".join(parts))

    for key, array in weights.items():
        target, value = targets[key], np.asarray(array)
        if value.dtype.name != str(target.dtype).replace("paddle.", ""):
            value = paddle.to_tensor(value).astype(target.dtype)
        target.set_value(value)
        report["loaded"] += 1
    return report


def convert_checkpoint(src, dst, ema=False, img_size=None, force=False, log=print):
    """Convert an LV-ViT / VOLO / ViT weights file (PyTorch .pth / .pth.tar, PASSL .pd, .pdparams, .pdckpt,
    .safetensors) to a Paddle ``.pdparams`` or a ``.safetensors`` file (by ``dst``'s suffix; the latter
    records variant, img_size and num_classes in its metadata), atomically.

    Returns {variant, img_size, num_classes, keys, dst}. With ``img_size`` pos_embed is resized
    to that size's token grid. An existing ``dst`` is kept unless ``force``.
    """
    from passl.io import write_weights
    if os.path.exists(dst) and not force:
        raise CheckpointError(f"{dst} exists; pass --force to overwrite it")
    weights, which, _ = _read_weights(src, ema)
    variant, size = detect_variant(weights)
    patch = size // pos_embed_grid(weights["pos_embed"].shape)[0]
    if img_size is not None and img_size != size:
        if img_size % patch:
            raise CheckpointError(f"--img-size {img_size} must be divisible by the patch size {patch}")
        weights["pos_embed"] = resize_pos_embed(weights["pos_embed"], img_size // patch)
        log(f"pos_embed resized from {size} px ({size // patch}x{size // patch}) to {img_size} px "
            f"({img_size // patch}x{img_size // patch})")
        size = img_size
    num_classes = int(weights["head.bias"].shape[0]) if "head.bias" in weights else None
    write_weights(weights, dst, weights_metadata(weights, source=os.path.basename(os.fspath(src)), which=which))
    return {"variant": variant, "img_size": size, "num_classes": num_classes, "keys": len(weights), "dst": dst}

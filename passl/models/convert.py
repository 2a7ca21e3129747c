"""Published PyTorch LV-ViT weights -> Paddle, and strict weight loading.

The Paddle model keeps the reference names, so conversion is: strip ``module.`` prefixes, drop
``num_batches_tracked``, rename BN ``running_mean/var`` to ``_mean/_variance`` and transpose Linear
weights ((out, in) in PyTorch, (in, out) in Paddle). Loading is strict: every key and shape must
match, except what the caller explicitly allows (pos_embed of another grid is resized; a new head
size with ``allow_new_head``), and each exception is logged.
"""
import collections
import os

import numpy as np
import paddle

from passl.errors import CheckpointError
from passl.models import vit, volo
from passl.models.lvvit import VARIANTS
from passl.models.pos_embed import grid_of, pos_embed_grid, resize_pos_embed
from passl.utils.fileio import atomic_path

__all__ = ["convert_torch_state_dict", "detect_variant", "extract_state_dict", "read_weights",
           "load_pretrained", "convert_checkpoint", "TORCH_SUFFIXES"]

TORCH_SUFFIXES = (".pth", ".pth.tar", ".pt", ".tar")
_PREFIXES = ("module.", "_layers.")     # DataParallel (torch) and paddle.DataParallel wrappers
_HEAD_KEYS = ("head.weight", "head.bias", "aux_head.weight", "aux_head.bias")


def _to_numpy(value):
    return value if isinstance(value, np.ndarray) else np.asarray(value.numpy() if hasattr(value, "numpy") else value)


def _is_tensor(value):
    return isinstance(value, np.ndarray) or isinstance(value, paddle.Tensor)


def strip_prefixes(state_dict):
    """Remove ``module.`` / ``_layers.`` wrapper prefixes from every key."""
    out = collections.OrderedDict()
    for key, value in state_dict.items():
        for prefix in _PREFIXES:
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def extract_state_dict(obj, ema=False, source="checkpoint"):
    """The weights inside a loaded file: a raw state dict, or a dict holding ``state_dict`` /
    ``model`` (or, with ``ema``, ``state_dict_ema`` / ``model_ema`` / ``ema``). Prefixes stripped."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    candidates = ("state_dict_ema", "model_ema", "ema") if ema else ("state_dict", "model")
    for key in candidates:
        if isinstance(obj.get(key), dict):
            return extract_state_dict(obj[key], source=f"{source}[{key}]")
    tensors = {k: v for k, v in obj.items() if _is_tensor(v)}
    if tensors and not ema:
        return strip_prefixes(tensors)
    raise CheckpointError(f"{source}: no {' / '.join(candidates)} entry found (top-level keys: "
                          f"{', '.join(map(str, list(obj)[:20]))})"
                          f"{'; the file has no EMA weights, drop --ema / ema' if ema else ''}")


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
                 if (v["embed_dim"], v["depth"], v["stem"]) == (dim, depth, stem)), None)
    return name, side * patch


def read_weights(source, ema=False):
    """Paddle-layout state dict {key: numpy array} from a path (.pdparams; .pth/.pth.tar/.pt converted
    on the fly) or from a dict (a PyTorch-layout dict is recognised by its BN running stats)."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise CheckpointError(f"weights file not found: {path}")
        if path.endswith(TORCH_SUFFIXES):
            from passl.utils.pth_io import load_pth
            return convert_torch_state_dict(extract_state_dict(load_pth(path), ema, path))
        if not path.endswith(".pdparams"):
            raise CheckpointError(f"{path}: unknown weights format; use a .pdparams file or a PyTorch "
                                  f"{'/'.join(TORCH_SUFFIXES)} file")
        state_dict = extract_state_dict(paddle.load(path, return_numpy=True), ema, path)
    else:
        state_dict = extract_state_dict(source, ema, "state dict")
    if _is_torch_layout(state_dict):
        return convert_torch_state_dict(state_dict)
    return collections.OrderedDict((k, _to_numpy(v)) for k, v in state_dict.items())


def _listing(title, items, limit=25):
    items = list(items)
    shown = "\n    ".join(items[:limit]) + (f"\n    ... and {len(items) - limit} more" if len(items) > limit else "")
    return f"  {title} ({len(items)}):\n    {shown}"


def load_pretrained(model, source, allow_new_head=False, log=print, ema=False):
    """Load weights into ``model`` strictly and return a report dict.

    source: a path (.pdparams, or .pth / .pth.tar converted on the fly) or a state dict of numpy
    arrays / paddle tensors (Paddle layout, or PyTorch layout recognised by BN running stats).
    A pos_embed of another token grid is resized bicubically (cls position kept) and logged;
    with ``allow_new_head`` a head / aux_head of another class count is re-initialised and logged.
    Any other missing, unexpected or shape-mismatched key raises CheckpointError listing them.
    Report: {source, loaded, pos_embed_resized: None or (old_grid, new_grid), reinitialized: [keys]}.
    """
    name = os.fspath(source) if isinstance(source, (str, os.PathLike)) else "state dict"
    weights = read_weights(source, ema)
    targets = model.state_dict()
    report = {"source": name, "loaded": 0, "pos_embed_resized": None, "reinitialized": []}

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
        hint = ("check that the config's model variant matches the weights "
                "(tools/convert_weights.py prints the detected variant)")
        if any(k.split(":")[0] in _HEAD_KEYS for k in mismatched):
            hint += "; for a new number of classes load with allow_new_head=True"
        parts.append(f"  fix: {hint}")
        raise CheckpointError("\n".join(parts))

    for key, array in weights.items():
        target = targets[key]
        target.set_value(paddle.to_tensor(np.asarray(array)).astype(target.dtype))
        report["loaded"] += 1
    return report


def convert_checkpoint(src, dst, ema=False, img_size=None, force=False, log=print):
    """Convert a PyTorch LV-ViT / VOLO / ViT checkpoint file to a Paddle ``.pdparams`` file, atomically.

    Returns {variant, img_size, num_classes, keys, dst}. With ``img_size`` pos_embed is resized
    to that size's token grid. An existing ``dst`` is kept unless ``force``.
    """
    from passl.utils.pth_io import load_pth
    if os.path.exists(dst) and not force:
        raise CheckpointError(f"{dst} exists; pass --force to overwrite it")
    weights = convert_torch_state_dict(extract_state_dict(load_pth(src), ema, src))
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
    with atomic_path(dst) as tmp:
        paddle.save({k: paddle.to_tensor(v) for k, v in weights.items()}, tmp)
    return {"variant": variant, "img_size": size, "num_classes": num_classes, "keys": len(weights), "dst": dst}

"""Parameter and multiply-add counts of a model, computed analytically from its layers (a model
with its own ``count_macs``, such as VOLO, counts its own).

Counted multiply-adds: every convolution and Linear, and the two attention matmuls (q k^T and
attn v). Norms, activations, softmax and additions are not counted, as in the reference's table
(our counts land within ~1.5% of SPEC 1's GFLOPs column).
"""
import paddle.nn as nn

__all__ = ["count_params", "count_macs", "summarize", "format_summary"]


def count_params(model):
    """{"trainable": n, "other": m}: trainable parameters (the published counts) and the rest
    (e.g. BatchNorm running statistics, which Paddle keeps as non-trainable parameters)."""
    trainable = sum(int(p.size) for p in model.parameters() if p.trainable)
    other = sum(int(p.size) for p in model.parameters() if not p.trainable)
    return {"trainable": trainable, "other": other}


def _conv_out(size, kernel, stride, padding, dilation):
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _padding(conv):
    pad = conv._updated_padding if hasattr(conv, "_updated_padding") else conv._padding
    pad = [pad, pad] if isinstance(pad, int) else list(pad)
    if len(pad) != 2:
        raise NotImplementedError(f"count_macs handles symmetric conv padding only, got {pad}")
    return pad


def _stem_macs(stem, height, width):
    """Multiply-adds of the stem's convolutions (in definition order) and the grid it produces."""
    macs = 0
    for layer in stem.sublayers():
        if isinstance(layer, nn.Conv2D):
            out_ch, in_per_group, kh, kw = layer.weight.shape
            pad_h, pad_w = _padding(layer)
            height = _conv_out(height, kh, layer._stride[0], pad_h, layer._dilation[0])
            width = _conv_out(width, kw, layer._stride[1], pad_w, layer._dilation[1])
            macs += height * width * out_ch * in_per_group * kh * kw
    return macs, (height, width)


def _linear_macs(layer, tokens):
    in_features, out_features = layer.weight.shape  # Paddle Linear weight is (in, out)
    return tokens * in_features * out_features


def count_macs(model, img_size=None):
    """Multiply-adds for one image through ``model`` (an LVViT, or a ``{name: ...}`` model config).

    img_size: int or (H, W); defaults to the model's own. Returns {"total", "stem", "blocks",
    "attention" (the q k^T and attn v part of blocks), "heads", "grid": (h, w), "tokens": N}.
    """
    if isinstance(model, dict):
        import passl
        model = passl.build_model(model)
    if hasattr(model, "count_macs"):   # a model whose stages are not LV-ViT's uniform blocks (VOLO) counts itself
        return model.count_macs(img_size)
    height, width = model.img_size if img_size is None else (
        (img_size, img_size) if isinstance(img_size, int) else tuple(img_size))
    stem, grid = _stem_macs(model.patch_embed, height, width)
    patches = grid[0] * grid[1]
    tokens = patches + 1  # with the cls token
    blocks = attention = 0
    for block in model.blocks:
        for layer in block.sublayers():
            if isinstance(layer, nn.Linear):
                blocks += _linear_macs(layer, tokens)
        attention += 2 * tokens * tokens * block.norm1.weight.shape[0]
    heads = _linear_macs(model.head, 1) + _linear_macs(model.aux_head, patches)
    blocks += attention
    return {"total": stem + blocks + heads, "stem": stem, "blocks": blocks, "attention": attention,
            "heads": heads, "grid": grid, "tokens": patches}


def summarize(model, img_size=None):
    """Parameters, multiply-adds and token grid of ``model`` (layer or model config) as a dict."""
    if isinstance(model, dict):
        import passl
        model = passl.build_model(model)
    return {"params": count_params(model), "macs": count_macs(model, img_size),
            "img_size": model.img_size if img_size is None else img_size,
            "embed_dim": model.embed_dim, "depth": model.depth if hasattr(model, "depth") else len(model.blocks),
            "num_classes": model.num_classes}


def format_summary(summary, title="model"):
    """Human-readable lines for a ``summarize`` dict."""
    params, macs = summary["params"], summary["macs"]
    grid = macs["grid"]
    giga = 1e9
    return "\n".join([
        f"{title}: embed_dim {summary['embed_dim']}, depth {summary['depth']}, "
        f"{summary['num_classes']} classes, input {summary['img_size']}",
        f"  token grid      {grid[0]}x{grid[1]} = {macs['tokens']} patch tokens (+1 cls)",
        f"  parameters      {params['trainable']:,} trainable"
        + (f" (+{params['other']:,} BN running statistics)" if params["other"] else ""),
        f"  multiply-adds   {macs['total'] / giga:.2f} G per image (stem {macs['stem'] / giga:.2f}, "
        f"blocks {macs['blocks'] / giga:.2f} of which attention matmuls {macs['attention'] / giga:.2f}, "
        f"heads {macs['heads'] / giga:.3f})",
    ])

"""Batch the items of TokenLabelDataset into numpy arrays (runs inside DataLoader workers).

Batch keys: ``image`` uint8 [B, 3, H, W] (normalised on the training device by
``TokenLabelDataset.finish_batch``), ``label`` int64 [B], ``bad_image_index`` int64 [B] (-1, or the
index of an undecodable image this sample stood in for; only in a batch where a sample did, so the
training process learns of stand-ins without reading every batch back from the device); with
RandomErasing, ``erase_boxes`` int32 [B, max_count, 4]; for training, the compact targets of targets.py
padded to a common U (a multiple of 8, so few distinct shapes occur): ``target_classes`` int64 [B, U]
(-1 = padding), ``token_probs`` float32 [B, N, U] (0 at padding), ``token_bg`` float32 [B, N],
``token_weight`` float32 [B, N] (0: the token has no dense target), ``cls_probs`` float32 [B, U],
``cls_bg`` float32 [B].
"""
import numpy as np

from passl.data.targets import TARGET_KEYS

__all__ = ["collate_fn", "PAD_MULTIPLE"]

PAD_MULTIPLE = 8


def collate_fn(samples):
    """list of item dicts -> dict of stacked numpy arrays (see the module docstring for shapes)."""
    batch = {}
    keys = [k for k in samples[0] if k not in TARGET_KEYS]
    for key in keys:
        batch[key] = np.stack([np.asarray(s[key]) for s in samples])
    if "bad_image_index" in batch and not (batch["bad_image_index"] >= 0).any():
        del batch["bad_image_index"]
    if "target_classes" in samples[0]:
        widest = max(s["target_classes"].shape[0] for s in samples)
        width = max(PAD_MULTIPLE, -(-widest // PAD_MULTIPLE) * PAD_MULTIPLE)
        size, tokens = len(samples), samples[0]["token_probs"].shape[0]
        classes = np.full((size, width), -1, np.int64)
        token_probs = np.zeros((size, tokens, width), np.float32)
        cls_probs = np.zeros((size, width), np.float32)
        for row, s in enumerate(samples):
            count = s["target_classes"].shape[0]
            classes[row, :count] = s["target_classes"]
            token_probs[row, :, :count] = s["token_probs"]
            cls_probs[row, :count] = s["cls_probs"]
        batch.update(target_classes=classes, token_probs=token_probs, cls_probs=cls_probs,
                     token_bg=np.stack([s["token_bg"] for s in samples]),
                     token_weight=np.stack([s["token_weight"] for s in samples]),
                     cls_bg=np.stack([np.asarray(s["cls_bg"], np.float32) for s in samples]))
    return batch

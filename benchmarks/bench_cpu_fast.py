"""The CPU fast paths (passl/utils/cpu_fast.py) against the plain code they replace, and the dense
loss's written-out gradient against autograd, on the CPU. Prints one JSON object (and a table on stderr).

Every row runs its two versions alternately in one process (``--rounds`` rounds of ``--repeats``
timed calls each, the order swapped every round), so that load from other work on the machine hits
both alike; it reports the median process CPU time and wall time per call.

    linear_<in>x<out>  nn.Linear forward + backward on [B, T, in] at the model's shapes (qkv, proj,
                       fc1, fc2, heads): plain vs the addmm fast path
    normalize          Normalize.normalize_batch on uint8 [B, 3, H, W]: (x - mean) / std vs batch_norm
    reverse_batch      MixToken's batch reversal, forward + backward on the stem output [B, D, h, w] and
                       on aux [B, N, C]: x[::-1] (the code) vs an index_select gather (a removed fast
                       path, kept here as the measurement that retired it) and paddle.flip
    dense_loss         the dense token loss forward + backward on aux [B, N, C]: autograd through
                       logsumexp / sum / take_along_axis ("plain") vs the written-out gradient of
                       passl/losses/token_label.py ("fast"), with the peak host memory above the start
    train_step         bench_train.py's step (forward, loss, backward, AdamW) with the fast paths off / on

    python benchmarks/bench_cpu_fast.py                       # lvvit_t, batch 16
    python benchmarks/bench_cpu_fast.py --batch-size 8 --rounds 3 --skip train_step
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (puts the repository first on sys.path)
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

import numpy as np  # noqa: E402

ROWS = ("linear", "normalize", "reverse_batch", "dense_loss", "train_step")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _common.add_model_args(p)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--rounds", type=int, default=4, help="plain/fast alternations per row")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per version and round (train_step: 2)")
    p.add_argument("--target-width", type=int, default=24, help="U, classes listed per sample in the dense loss")
    p.add_argument("--skip", action="append", default=[], choices=ROWS, help="leave a row out")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    return p


def _timed(fn, repeats):
    """[(wall s, cpu s)] of ``repeats`` calls after one untimed call."""
    fn()
    out = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        out.append((time.perf_counter() - wall, time.process_time() - cpu))
    return out


def interleaved(versions, rounds, repeats, progress=None):
    """versions {"plain": (setup, fn), "fast": (setup, fn)}: median ms of each, alternating every round."""
    samples = {name: [] for name in versions}
    order = list(versions)
    for index in range(rounds):
        for name in (order if index % 2 == 0 else order[::-1]):
            setup, fn = versions[name]
            setup()
            samples[name] += _timed(fn, repeats)
            if progress is not None:
                progress.update(1)
    row = {name: {"cpu_ms": 1000 * statistics.median(c for _, c in s), "wall_ms": 1000 * statistics.median(w for w, _ in s),
                  "calls": len(s)} for name, s in samples.items()}
    row["cpu_gain"] = row["plain"]["cpu_ms"] / row["fast"]["cpu_ms"]
    row["wall_gain"] = row["plain"]["wall_ms"] / row["fast"]["wall_ms"]
    return row


def switch(on):
    from passl.utils import cpu_fast
    return (cpu_fast.enable_cpu_fast_paths if on else cpu_fast.disable_cpu_fast_paths)


def linear_rows(model, batch_size, args, bar):
    import paddle
    shapes = []   # (in, out, tokens) of every distinct Linear shape, in model order
    tokens = model.num_tokens + 1
    for name, layer in model.named_sublayers():
        if isinstance(layer, paddle.nn.Linear):
            rows = model.num_tokens if name == "aux_head" else 1 if name == "head" else tokens
            shape = (*layer.weight.shape, rows)
            if shape not in shapes:
                shapes.append(shape)
    rows = {}
    for n_in, n_out, rows_per_image in shapes:
        layer = paddle.nn.Linear(n_in, n_out)
        x = paddle.randn([batch_size, rows_per_image, n_in])
        x.stop_gradient = False
        grad = paddle.randn([batch_size, rows_per_image, n_out])

        def call():
            layer(x).backward(grad)
            layer.clear_gradients(set_to_zero=False)
            x.clear_gradient(False)
        rows[f"linear_{n_in}x{n_out}_t{rows_per_image}"] = interleaved(
            {"plain": (switch(False), call), "fast": (switch(True), call)}, args.rounds, args.repeats, bar)
    return rows


def normalize_row(batch_size, img_size, args, bar):
    import paddle

    from passl.data.transforms import Normalize
    images = paddle.to_tensor(np.random.default_rng(0).integers(0, 256, (batch_size, 3, img_size, img_size),
                                                                 dtype=np.uint8))
    normalize = Normalize()
    call = lambda: normalize.normalize_batch(images)  # noqa: E731
    return interleaved({"plain": (switch(False), call), "fast": (switch(True), call)}, args.rounds, args.repeats, bar)


def reverse_rows(batch_size, model, args, bar):
    import paddle
    rows = {}
    shapes = {"stem": [batch_size, model.embed_dim, *model.grid_size], "aux": [batch_size, model.num_tokens,
                                                                               model.num_classes]}
    for name, shape in shapes.items():
        x = paddle.randn(shape)
        x.stop_gradient = False
        grad = paddle.randn(shape)
        reverse = {"plain": lambda: x[::-1],
                   "fast": lambda: paddle.index_select(x, paddle.arange(x.shape[0] - 1, -1, -1, dtype="int64"), 0),
                   "flip": lambda: paddle.flip(x, axis=[0])}

        def call(how):
            reverse[how]().backward(grad)
            x.clear_gradient(False)
        rows[f"reverse_batch_{name}"] = interleaved({how: (lambda: None, lambda how=how: call(how)) for how in reverse},
                                                    args.rounds, args.repeats, bar)
    return rows


def autograd_dense_loss(aux, index, weight, bg, smoothing):
    """The dense term of passl/losses/token_label.py left to autograd (same value)."""
    import paddle
    num_classes = aux.shape[-1]
    a = (1.0 - smoothing) * bg + smoothing / num_classes
    coef = a * num_classes + (1.0 - smoothing) * weight.sum(-1)
    picked = (weight * paddle.take_along_axis(aux, index, axis=2)).sum(-1)
    return (coef * paddle.logsumexp(aux, axis=-1) - a * aux.sum(-1) - (1.0 - smoothing) * picked).mean()


def dense_loss_row(batch_size, num_tokens, num_classes, args, bar):
    import paddle
    from paddle.base import core

    from passl.losses.token_label import _DenseSoftCrossEntropy
    rng = np.random.default_rng(0)
    width = min(args.target_width, num_classes)
    aux = paddle.to_tensor(rng.normal(0, 3, (batch_size, num_tokens, num_classes)).astype("float32"),
                           stop_gradient=False)
    classes = np.stack([rng.choice(num_classes, width, replace=False) for _ in range(batch_size)])
    index = paddle.to_tensor(np.repeat(classes[:, None], num_tokens, axis=1).astype("int64"))
    probs = rng.dirichlet(np.ones(width), (batch_size, num_tokens)).astype("float32") * 0.99
    weight = paddle.to_tensor(probs - 1e-5)
    bg = paddle.full([batch_size, num_tokens], 1e-5, "float32")
    share = paddle.full([batch_size, num_tokens], 1.0 / (batch_size * num_tokens), "float32")   # every token kept
    losses = {"plain": lambda: autograd_dense_loss(aux, index, weight, bg, 0.1),
              "fast": lambda: _DenseSoftCrossEntropy.apply(aux, index, weight, bg, share, 0.1)}

    def call(name):
        losses[name]().backward()
        aux.clear_gradient(False)
    row = interleaved({name: (lambda: None, lambda name=name: call(name)) for name in losses},
                      args.rounds, args.repeats, bar)
    grads = {}
    for name in losses:
        start = core.host_memory_stat_current_value("Allocated", 0)
        core.host_memory_stat_reset_peak_value("Allocated", 0)
        loss = losses[name]()
        loss.backward()
        row[name]["peak_mb_above_start"] = (core.host_memory_stat_peak_value("Allocated", 0) - start) / 2 ** 20
        row[name]["loss"] = float(loss)
        grads[name] = aux.grad.numpy()
        aux.clear_gradient(False)
    row["max_abs_grad_diff"] = float(np.abs(grads["plain"] - grads["fast"]).max())
    row["aux_block_mb"] = batch_size * num_tokens * num_classes * 4 / 2 ** 20
    return row


def train_step_row(model_cfg, args, bar):
    import paddle

    import bench_train
    import passl
    from passl.engine.optim import build_optimizer
    paddle.seed(0)
    model = passl.build_model(model_cfg)
    model.train()
    loss_fn = passl.build_loss({"name": "TokenLabelCrossEntropy"})
    optimizer, _ = build_optimizer({"name": "AdamW", "lr": 1.6e-3, "reference_batch": 1024, "weight_decay": 0.05},
                                   model, args.batch_size, log=None)
    host = bench_train.synthetic_batch(args.batch_size, model.img_size[0], model.num_classes, model.grid_size, 15, 5, 0)
    batch = {k: paddle.to_tensor(v) for k, v in host.items()}

    def step():
        loss_fn(model(batch["image"]), batch)["loss"].backward()
        optimizer.step()
        optimizer.clear_grad()
    return interleaved({"plain": (switch(False), step), "fast": (switch(True), step)}, args.rounds,
                       max(1, args.repeats // 2), bar)


def main(argv=None):
    args = build_parser().parse_args(argv)
    import passl
    from passl.utils import cpu_fast
    model_cfg = _common.resolve_model_cfg(args)
    device = _common.select_device("cpu")
    model = passl.build_model(model_cfg)
    from tqdm import tqdm
    bar = tqdm(desc="plain/fast rounds", file=sys.stderr, leave=False, disable=not sys.stderr.isatty())
    rows = {}
    if "linear" not in args.skip:
        rows.update(linear_rows(model, args.batch_size, args, bar))
    if "normalize" not in args.skip:
        rows["normalize"] = normalize_row(args.batch_size, model.img_size[0], args, bar)
    if "reverse_batch" not in args.skip:
        rows.update(reverse_rows(args.batch_size, model, args, bar))
    if "dense_loss" not in args.skip:
        rows["dense_loss"] = dense_loss_row(args.batch_size, model.num_tokens, model.num_classes, args, bar)
    if "train_step" not in args.skip:
        rows["train_step"] = train_step_row(model_cfg, args, bar)
    bar.close()
    cpu_fast.enable_cpu_fast_paths()   # leave the process as a CPU run has it
    for name, row in rows.items():
        versions = "   ".join(f"{how} {v['cpu_ms']:8.1f} ms cpu ({v['wall_ms']:8.1f} wall)"
                               for how, v in row.items() if isinstance(v, dict))
        print(f"{name:26s} {versions}   plain/fast x{row['cpu_gain']:.2f} cpu", file=sys.stderr)
    _common.emit({"benchmark": "cpu_fast", "model": model_cfg["name"], "batch_size": args.batch_size,
                  "rounds": args.rounds, "repeats": args.repeats, "rows": rows, "env": _common.environment(device)},
                 args.json_out)
    return 0


if __name__ == "__main__":
    from passl.utils import cli
    cli.run(main)

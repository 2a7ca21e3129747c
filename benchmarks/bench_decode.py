"""JPEG decoding per image on one CPU core: the decoder the pipeline uses against the alternatives.

A loader worker must decode every training image at full size (RandomResizedCrop's window on an
ImageNet-sized image is almost never twice its 224 px output, so DCT scaling is rarely allowed).
This script shows how much of a worker's per-sample budget (``--target`` samples/s) decoding alone
takes, on the same generated JPEGs as bench_data.py (~500x375, quality 90, 4:2:0):

    passl          passl.data.pixels.decode_jpeg: OpenCV's libjpeg-turbo, what the pipeline runs
    pil            PIL's decode (the same libjpeg-turbo) and conversion to an array
    opencv_1/8     OpenCV at 1/8 scale: entropy (Huffman) decoding of the whole file and little else,
                   the part of a decode no CPU decoder can skip
    simplejpeg*    libjpeg-turbo via simplejpeg, when installed (not a dependency): exact, and with
                   its fast IDCT and fast upsampling (pixels differ from PIL's), and at 1/2 scale
    paddle_gpu     paddle.vision.ops.decode_jpeg (nvJPEG), only where Paddle has a GPU; its CPU kernel
                   raises "only supports GPU"

Reported per decoder: median CPU ms per image over the passes (process CPU time: this core's work),
the share of the budget, and the largest pixel difference from PIL's decode (full-size decoders).
Prints one JSON object.

    python benchmarks/bench_decode.py
    python benchmarks/bench_decode.py --num-images 96 --passes 9 --target 400
"""
import argparse
import io
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (puts the repository first on sys.path)
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

import numpy as np  # noqa: E402


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--num-images", type=int, default=48, help="generated images (bench_data.py's)")
    p.add_argument("--passes", type=int, default=7, help="timed passes over the images (median reported)")
    p.add_argument("--target", type=float, default=400.0, help="samples/s per worker the budget is taken from")
    p.add_argument("--data-dir", default=None, help="keep the generated data here (default: a temp dir, removed)")
    p.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    p.add_argument("--seed", type=int, default=0)
    return p


def decoders():
    """name -> (decode(bytes) -> uint8 [H, W, 3], full size?) for every decoder this machine has."""
    from PIL import Image
    from passl.data import pixels
    found = {
        "passl": (pixels.decode_jpeg, True),
        "pil": (lambda data: np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), True),
        "opencv_1/8": (lambda data: pixels.decode_jpeg(data, 8), False),
    }
    try:
        import simplejpeg
    except ImportError:
        pass
    else:
        found["simplejpeg"] = (simplejpeg.decode_jpeg, True)
        found["simplejpeg_fast"] = (lambda data: simplejpeg.decode_jpeg(data, fastdct=True, fastupsample=True), True)
        found["simplejpeg_1/2"] = (lambda data: simplejpeg.decode_jpeg(data, min_factor=2), False)
    import paddle
    if paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0:
        from paddle.vision.ops import decode_jpeg

        def gpu(data):
            image = decode_jpeg(paddle.to_tensor(np.frombuffer(data, np.uint8)), mode="rgb")
            return image.numpy().transpose(1, 2, 0)
        found["paddle_gpu"] = (gpu, True)
    return found


def time_decoder(decode, datas, passes):
    """Median over ``passes`` of process CPU ms per image (one untimed pass first)."""
    for data in datas:
        decode(data)
    per_pass = []
    for _ in range(passes):
        start = time.process_time()
        for data in datas:
            decode(data)
        per_pass.append(1000 * (time.process_time() - start) / len(datas))
    return statistics.median(per_pass), per_pass


def main(argv=None):
    args = build_parser().parse_args(argv)
    import bench_data
    from tqdm import tqdm

    root = args.data_dir or tempfile.mkdtemp(prefix="passl_bench_decode_")
    try:
        bench_data.generate(root, args.num_images, 1000, 15, 5, args.seed)
        files = sorted(os.path.join(dirpath, name) for dirpath, _, names in os.walk(os.path.join(root, "images"))
                       for name in names)
        datas = []
        for path in files:
            with open(path, "rb") as f:
                datas.append(f.read())
    finally:
        if args.data_dir is None:
            shutil.rmtree(root, ignore_errors=True)
    found = decoders()
    reference = [found["pil"][0](data) for data in datas]
    budget_ms = 1000.0 / args.target
    rows = {}
    for name, (decode, full_size) in tqdm(found.items(), desc="decoders", file=sys.stderr,
                                          disable=not sys.stderr.isatty()):
        median, per_pass = time_decoder(decode, datas, args.passes)
        row = {"cpu_ms_per_image": median, "pass_cpu_ms": per_pass, "budget_share": median / budget_ms}
        if full_size:
            row["max_abs_diff_vs_pil"] = int(max(np.abs(decode(data).astype(np.int16) - ref).max()
                                                 for data, ref in zip(datas, reference)))
        rows[name] = row
    result = {"benchmark": "decode", "num_images": len(datas), "passes": args.passes,
              "mean_jpeg_kb": sum(map(len, datas)) / len(datas) / 1024,
              "mean_megapixels": float(np.mean([ref.shape[0] * ref.shape[1] for ref in reference])) / 1e6,
              "target_samples_per_s": args.target, "budget_ms_per_sample": budget_ms,
              "decoders": rows, "env": _common.environment("cpu")}
    best = min((r["cpu_ms_per_image"], n) for n, r in rows.items() if "max_abs_diff_vs_pil" in r)
    print(f"decode: {rows['passl']['cpu_ms_per_image']:.2f} ms per image "
          f"({100 * rows['passl']['budget_share']:.0f}% of the {budget_ms:.2f} ms a worker has per sample at "
          f"{args.target:g}/s); fastest full-size decoder here: {best[1]} {best[0]:.2f} ms", file=sys.stderr)
    _common.emit(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

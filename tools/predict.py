"""Print the top-5 classes of images with a model exported by tools/export_model.py.

    python tools/predict.py --model output/export/lvvit_small photo.jpg scan.png ...
"""
import os
import sys
import time

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

from passl.utils import cli  # noqa: E402


def build_parser():
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="folder written by tools/export_model.py")
    p.add_argument("--topk", type=cli.number(1), default=5)
    p.add_argument("--batch-size", type=cli.number(1), default=16)
    p.add_argument("--device", default="auto",
                   help="auto (the GPU if Paddle has CUDA and one is visible), cpu, gpu, gpu:1")
    p.add_argument("--precision", choices=("fp32", "fp16"), default="fp32",
                   help="fp16: the graph runs in float16 on the GPU (inputs and outputs stay float32); "
                        "the CPU runs fp32 only")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, ...; any size)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from passl.errors import DataError
    from passl.export import predict

    start = time.perf_counter()
    results, errors = predict(args.model, args.images, args.topk, args.batch_size, args.device, args.precision)
    for path, top in results:
        print(path)
        for rank, (index, name, prob) in enumerate(top, 1):
            print(f"  {rank}. {name:<24s} {prob:7.2%}  (class {index})")
    print(f"predicted {len(results)} image(s) in {time.perf_counter() - start:.1f} s ({args.precision})",
          file=sys.stderr)
    if errors:
        raise DataError(f"{len(errors)} of {len(args.images)} image(s) could not be read:\n  " + "\n  ".join(errors))
    return 0


if __name__ == "__main__":
    cli.run(main)

"""Export a trained LV-ViT as a static inference model with its eval preprocessing and class names.

    python tools/export_model.py -c configs/lvvit/lvvit_small.yaml --load output/lvvit_small/best_model.pdparams \
        --out output/export/lvvit_small
    python tools/predict.py --model output/export/lvvit_small image1.jpg image2.png
"""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from passl.utils.runtime import configure_process  # noqa: E402

configure_process()

from passl.utils import cli  # noqa: E402


def build_parser():
    p = cli.add_config_args(cli.parser(__doc__.splitlines()[0]))
    p.add_argument("--load", required=True, metavar="WEIGHTS", help="weights (.pdparams, .pdckpt, .safetensors, .pth, PASSL .pd)")
    p.add_argument("--out", required=True, help="folder for inference.* and preprocess.json")
    p.add_argument("--class-names", help="file with one '<dir> [readable name]' per line (default: the val "
                                         "dataset's classes, or class_<i>)")
    p.add_argument("--device", choices=("auto", "cpu", "gpu"), default="auto",
                   help="the device the model will run on; the graph is traced there, with that device's "
                        "attention kernels (auto: the GPU if Paddle has CUDA and one is visible). A GPU "
                        "export does not run on the CPU")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    from passl.config import load_config
    from passl.export import export_model
    from passl.utils.distributed import select_device
    from passl.utils.fileio import ensure_writable_dir

    cfg = load_config(args.config, args.override)
    ensure_writable_dir(args.out, "--out")
    device = select_device(args.device, log=None)
    model, prefix, info = export_model(cfg, args.load, args.out, args.class_names, device)
    rows, cols = info["input_size"]
    print(f"exported {cfg['model']['name']} ({model.num_classes} classes, input [N, 3, {rows}, {cols}], traced on "
          f"the {device.upper()}) to {prefix}.* with {os.path.join(args.out, 'preprocess.json')}")
    return 0


if __name__ == "__main__":
    cli.run(main)

"""Device choice and the little there is to know about ranks."""
import os

from passl.errors import ConfigError
from passl.utils.cpu_threads import configure_cpu_runtime


def cuda_available():
    import paddle
    return paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0


def select_device(name="auto", log=print):
    """Set Paddle's device from the config's ``device`` ('auto', 'cpu', 'gpu'); return 'gpu' or 'cpu'."""
    import paddle
    if name not in ("auto", "cpu", "gpu"):
        raise ConfigError(f"device: expected auto, cpu or gpu, got {name!r}")
    if name == "gpu" and not cuda_available():
        raise ConfigError("device: gpu was asked for, but this Paddle build has no CUDA or no GPU is "
                          "visible; install paddlepaddle-gpu or set -o device=cpu")
    use_gpu = name == "gpu" or (name == "auto" and cuda_available())
    if use_gpu:
        paddle.set_device(f"gpu:{local_rank()}")
        return "gpu"
    paddle.set_device("cpu")
    configure_cpu_runtime()
    if name == "auto" and log:
        log(f"no GPU found, running on the CPU ({os.environ.get('OMP_NUM_THREADS', '?')} threads)")
    return "cpu"


def world_size():
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def rank():
    return int(os.environ.get("PADDLE_TRAINER_ID", "0"))


def local_rank():
    return int(os.environ.get("PADDLE_LOCAL_RANK", os.environ.get("FLAGS_selected_gpus", "0").split(",")[0] or 0))


def is_main_process():
    return rank() == 0

"""Device choice, ranks and the few collectives the engine uses (each a no-op with one process)."""
import os

from passl.errors import ConfigError
from passl.utils.cpu_threads import configure_cpu_runtime, configure_gpu_threads


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
        paddle.set_device(f"gpu:{device_id()}")
        configure_gpu_threads()
        return "gpu"
    paddle.set_device("cpu")
    configure_cpu_runtime()
    if name == "auto" and log:
        log(f"no GPU found, running on the CPU ({os.environ.get('OMP_NUM_THREADS', '?')} threads)")
    return "cpu"


def world_size():
    """Processes in this run (paddle.distributed.launch sets PADDLE_TRAINERS_NUM); 1 without the launcher."""
    return int(os.environ.get("PADDLE_TRAINERS_NUM", "1"))


def rank():
    """This process's index in the run, 0 without the launcher."""
    return int(os.environ.get("PADDLE_TRAINER_ID", "0"))


def local_rank():
    """This process's index among the processes of its machine (0 without the launcher)."""
    return int(os.environ.get("PADDLE_LOCAL_RANK", "0"))


def device_id():
    """The GPU of this process as Paddle's parallel environment has it: ``paddle.distributed.launch
    --gpus 4,5,6,7`` gives each rank its device in FLAGS_selected_gpus
    (paddle/distributed/launch/controllers/collective.py:250-256), which ParallelEnv reads
    (paddle/distributed/parallel.py:759-761); the local rank would pick GPUs 0-3 instead."""
    import paddle.distributed as dist
    return dist.ParallelEnv().device_id


def init_distributed():
    """Join the process group of a multi-process run (once; nothing to do with one process)."""
    import paddle.distributed as dist
    if world_size() > 1 and not dist.is_initialized():
        dist.init_parallel_env()


def unwrap(model):
    """The model inside a ``paddle.DataParallel`` wrapper, or ``model`` itself."""
    import paddle
    return model._layers if isinstance(model, paddle.DataParallel) else model


def all_reduce(tensor, op="sum"):
    """``tensor`` reduced in place over all processes with ``op`` ('sum', 'min' or 'max'); returned."""
    if world_size() > 1:
        import paddle.distributed as dist
        ops = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}
        dist.all_reduce(tensor, op=ops[op])
    return tensor


def gather_objects(obj):
    """``[obj of rank 0, obj of rank 1, ...]`` (picklable Python objects); ``[obj]`` with one process."""
    if world_size() == 1:
        return [obj]
    import paddle.distributed as dist
    gathered = []
    dist.all_gather_object(gathered, obj)
    return gathered

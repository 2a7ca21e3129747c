"""Device choice, ranks and the few collectives the engine uses (each a no-op with one process)."""
import math
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


# ---------------------------------------------------------------------------------------------
# BatchNorm across processes

def batch_norm_layers(model):
    """{structured name: layer} of every BatchNorm layer of ``model`` (BatchNorm1D/2D/3D, SyncBatchNorm
    and the older ``paddle.nn.BatchNorm``), whose ``_mean`` and ``_variance`` are running statistics."""
    import paddle
    from paddle.nn.layer.norm import _BatchNormBase
    return {name: layer for name, layer in model.named_sublayers(include_self=True)
            if isinstance(layer, (_BatchNormBase, paddle.nn.BatchNorm))}


def _local_batch_norms(model):
    """The BatchNorm layers of ``model`` whose statistics are per process (SyncBatchNorm computes them
    over all processes, so they are equal everywhere already)."""
    import paddle
    return {name: layer for name, layer in batch_norm_layers(model).items()
            if not isinstance(layer, paddle.nn.SyncBatchNorm)}


def bn_statistics(model):
    """{'<layer>._mean' / '<layer>._variance': tensor} of ``model``'s per-process BatchNorm layers."""
    stats = {}
    for name, layer in _local_batch_norms(unwrap(model)).items():
        stats[f"{name}._mean"], stats[f"{name}._variance"] = layer._mean, layer._variance
    return stats


def average_bn_statistics(*models):
    """Replace the BatchNorm running means and variances of each model in ``models`` (None skipped) by
    their mean over all processes, in place; one all-reduce per dtype. Returns how many tensors.

    BatchNorm normalises with the statistics of each process's own batches, and DataParallel syncs
    buffers only when it wraps the model, so every process's running statistics drift apart. They
    are averaged (as timm's ``distribute_bn`` with reduce) rather than taken from rank 0: the average
    is the estimate over all processes' samples, where rank 0's would throw away what the other ranks
    saw. The all-reduce hands every rank the same sum, so every rank ends with identical values.
    """
    import paddle
    stats = [t for model in models if model is not None for t in bn_statistics(model).values()]
    if world_size() == 1 or not stats:
        return len(stats)
    with paddle.no_grad():
        for dtype in sorted({str(t.dtype) for t in stats}):
            group = [t for t in stats if str(t.dtype) == dtype]
            flat = all_reduce(paddle.concat([t.reshape([-1]) for t in group]), "sum") / world_size()
            start = 0
            for tensor in group:
                size = math.prod(tensor.shape)      # tensor.numel() would be a device tensor
                tensor.set_value(flat[start:start + size].reshape(tensor.shape).astype(tensor.dtype))
                start += size
    return len(stats)


def convert_sync_batchnorm(model, device, log=print):
    """``model`` with its BatchNorm layers as ``paddle.nn.SyncBatchNorm`` (statistics over the batches
    of all processes; the same parameters and buffers, so checkpoints are interchangeable) when several
    GPU processes run; unchanged with one process. Paddle has no CPU kernel for SyncBatchNorm (Paddle
    3.3.1: "kernel sync_batch_norm is not registered"), so several CPU processes raise ConfigError."""
    import paddle
    count = len(_local_batch_norms(model))
    if world_size() == 1 or not count:
        if log:
            log(f"model.sync_bn: {'one process' if count else 'the model has no BatchNorm'}, nothing to synchronise")
        return model
    if device != "gpu":
        raise ConfigError("model.sync_bn: Paddle's SyncBatchNorm runs on GPUs only (it has no CPU kernel); set "
                          "-o model.sync_bn=false on the CPU (BatchNorm statistics are still averaged over the "
                          "processes before every evaluation and checkpoint)")
    model = paddle.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if log:
        log(f"model.sync_bn: {count} BatchNorm layers use SyncBatchNorm over {world_size()} processes")
    return model

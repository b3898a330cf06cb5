"""One rank of the model: it loads its shard, sizes its KV cache, builds its runner; and, under tensor parallelism,
the process that does so and then runs every plan it is sent: `python -m tritium.engine.worker --engine HOST:PORT`,
started by the engine (engine/worker_group.py) or by torchrun on each of several hosts.

A rank on a GPU takes the GPU of its number on its host and talks to the others over NCCL; on CPUs, over gloo. The
environment variable TRITIUM_TP_SHARE_GPU=1 (for tests only) puts every rank on GPU 0, talking over gloo: the sharded
GPU path, checked on a machine with a single GPU.
"""

import argparse
import logging
import os
import pickle
import sys
import threading
import time
import traceback
from multiprocessing.connection import Client, Connection
from pathlib import Path

import torch

from tritium import distributed
from tritium.engine.auto_tune import auto_tune, auto_tune_enabled
from tritium.engine.config import EngineConfig
from tritium.engine.model_runner import ModelRunner
from tritium.models.config import ModelConfig
from tritium.models.llama import LlamaForCausalLM
from tritium.models.loader import load_model, random_model
from tritium.ops.attention.configs import table_choice

log = logging.getLogger(__name__)

ModelSource = str | Path | ModelConfig  # a model folder, or a shape to fill with seeded random weights


def share_gpu() -> bool:
    return os.environ.get("TRITIUM_TP_SHARE_GPU") == "1"


def rank_device(config: EngineConfig, local_rank: int) -> torch.device:
    """The device of the rank that is its host's `local_rank`: that GPU (GPU 0 for every rank with
    TRITIUM_TP_SHARE_GPU=1), or the CPU."""
    if config.torch_device().type != "cuda":
        return torch.device("cpu")
    return torch.device("cuda", 0 if share_gpu() else local_rank)


def load_shard(source: ModelSource, config: EngineConfig, device: torch.device) -> LlamaForCausalLM:
    """This rank's shard of the model (the whole model with one rank), in the dtype the config asks for."""
    dtype = config.torch_dtype(device)
    if isinstance(source, ModelConfig):
        return random_model(source, dtype, device)
    return load_model(source, dtype, device)


def fitting_pages(model: LlamaForCausalLM, config: EngineConfig, max_model_len: int) -> int:
    """KV pages of this rank's heads that fit: its free GPU memory times gpu_memory_utilization; on the CPU, room
    for four full-length sequences."""
    device = model.lm_head.weight.device
    if device.type != "cuda":
        return 4 * -(-max_model_len // config.block_size)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(free * config.gpu_memory_utilization) // kv_page_bytes(model, config))


def kv_page_bytes(model: LlamaForCausalLM, config: EngineConfig) -> int:
    """Bytes of one KV page of this rank's heads, K and V across the layers: an fp8 page takes half a bfloat16 one."""
    attn = model.model.layers[0].self_attn
    kv_dtype = config.torch_kv_dtype(model.lm_head.weight.dtype)
    return 2 * model.config.num_layers * config.block_size * attn.num_kv_heads * attn.head_dim * kv_dtype.itemsize


def check_pages(num_pages: int, config: EngineConfig, max_model_len: int) -> None:
    if num_pages * config.block_size < max_model_len:
        raise ValueError(f"{num_pages} KV pages of {config.block_size} tokens cannot hold one sequence of "
                         f"max_model_len={max_model_len}")


def tune_attention(model: LlamaForCausalLM, config: EngineConfig, max_model_len: int) -> None:
    """On a GPU with the Triton backend: auto-tune the attention classes this engine's steps can run that the
    device's table lacks (when on), and say in the log which tuned table the kernel runs with. Before the page pool
    takes the free memory."""
    device = model.lm_head.weight.device
    if device.type != "cuda" or (config.attention_backend or "triton") != "triton":
        return
    attn = model.model.layers[0].self_attn
    shape = (config.max_num_batched_tokens, config.max_num_seqs, attn.num_heads, attn.num_kv_heads, attn.head_dim,
             config.block_size, max_model_len, attn.sliding_window)
    if auto_tune_enabled(config.auto_tune):
        auto_tune(device, model.lm_head.weight.dtype, *shape, kv_fp8=config.kv_cache_dtype != "auto")
    else:
        log.info("attention configs: %s (auto-tune off)", table_choice(device).describe())


def local_runner(source: ModelSource, config: EngineConfig, max_model_len: int, eos_ids: set[int]) -> ModelRunner:
    """The one rank, in this process: the whole model and its runner."""
    model = load_shard(source, config, config.torch_device())
    tune_attention(model, config, max_model_len)
    num_pages = config.num_kv_pages or fitting_pages(model, config, max_model_len)
    check_pages(num_pages, config, max_model_len)
    return ModelRunner(model, num_pages, config, max_model_len, eos_ids)


def run(rank: int, local_rank: int, init_method: str, source: ModelSource, config: EngineConfig,
        max_model_len: int, eos_ids: set[int], conn: Connection) -> None:
    """A rank's life: join the group, load the shard, say how many pages fit, build the runner with the pages the
    engine decided, then run each plan it receives on `conn`; rank 0 answers each with its results. Any error goes to
    the engine before the process exits. The first rank of each host tunes the attention kernel for the others."""
    _exit_with_parent()
    size = config.tensor_parallel_size
    try:
        device = rank_device(config, local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # ranks on one host's CPUs share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // size))
        backend = "nccl" if device.type == "cuda" and not share_gpu() else "gloo"
        distributed.init(rank, size, init_method, backend)
        model = load_shard(source, config, device)
        if local_rank == 0:  # the ranks' problem classes are the same: one tunes, the others read its cache after
            tune_attention(model, config, max_model_len)
        distributed.barrier()
        conn.send(("pages", fitting_pages(model, config, max_model_len)))
        _, num_pages = pickle.loads(conn.recv_bytes())
        runner = ModelRunner(model, num_pages, config, max_model_len, eos_ids)
        conn.send(("ready", runner.sizes()))
        while True:
            kind, payload = pickle.loads(conn.recv_bytes())
            if kind == "stop":
                break
            if kind == "release":  # no answer
                runner.release(payload)
                continue
            if kind == "step":
                results = runner.step(payload)
            else:  # "time_all_reduce"
                results = all_reduce_ms(payload, model.config.hidden_size, model.lm_head.weight.dtype, device)
            if rank == 0:
                conn.send(("done", results))
    except BaseException:  # noqa: BLE001  the engine stops every rank and raises this text
        try:
            conn.send(("error", traceback.format_exc()))
        finally:
            os._exit(1)  # no clean-up that could wait on the other ranks
    distributed.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the interpreter's own teardown (torch's, Triton's) took seconds more, for nothing


def rank_key() -> bytes:
    """The secret a rank started elsewhere and the engine share (TRITIUM_RANK_KEY): the control connection carries
    pickles, so it takes only peers that know it."""
    key = os.environ.get("TRITIUM_RANK_KEY", "")
    if not key:
        raise ValueError("set TRITIUM_RANK_KEY to the same secret for the engine and every rank it waits for")
    return key.encode()


def host_port(address: str) -> tuple[str, int]:
    """("host", port) of "HOST:PORT"; a ValueError names a malformed one."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"give an address as HOST:PORT, got {address!r}")
    return host, int(port)


def main(argv: list[str] | None = None) -> None:
    """`python -m tritium.engine.worker --engine HOST:PORT`: one rank, its number, its number on its host and the
    number of ranks from the environment (RANK, LOCAL_RANK, WORLD_SIZE: torchrun sets them, and so does the engine
    for the ranks it starts). It connects to the engine, which sends it the model and settings, then plans."""
    parser = argparse.ArgumentParser(prog="python -m tritium.engine.worker", description=main.__doc__)
    parser.add_argument("--engine", required=True, metavar="HOST:PORT", help="the engine's --ranks-address")
    parser.add_argument("--init-method", default="env://",
                        help="how the ranks meet (torch.distributed's init_method; default: torchrun's rendezvous)")
    args = parser.parse_args(argv)
    rank, local_rank, size = (int(os.environ[name]) for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    deadline = time.monotonic() + 600  # the hosts start in any order: wait for the engine to listen
    while True:
        try:
            conn = Client(host_port(args.engine), authkey=rank_key())
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    conn.send(("hello", rank, size))
    source, config, max_model_len, eos_ids = conn.recv()
    run(rank, local_rank, args.init_method, source, config, max_model_len, eos_ids, conn)


def all_reduce_ms(batch_sizes: list[int], hidden_size: int, dtype: torch.dtype, device: torch.device,
                  reps: int = 20) -> dict[int, float]:
    """Milliseconds of one all-reduce of a decode step's hidden states [batch, hidden_size], for each batch size:
    timed alone, eagerly, every rank at once (the benchmark's all-reduce share of a decode step)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    out = {}
    for batch in batch_sizes:
        x = torch.zeros(batch, hidden_size, dtype=dtype, device=device)
        for _ in range(3):
            distributed.all_reduce(x)
        sync()
        start = time.perf_counter()
        for _ in range(reps):
            distributed.all_reduce(x)
        sync()
        out[batch] = (time.perf_counter() - start) * 1e3 / reps
    return out


def _exit_with_parent() -> None:
    """End this process when the engine's process is gone, whatever killed it (its queue would never speak again)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="tritium-parent-watch", daemon=True).start()


if __name__ == "__main__":
    main()

"""Tensor parallelism's ground floor: the process group and the collectives the model and the engine need (all-reduce,
gather to rank 0, broadcast from rank 0, barrier). It knows nothing above it; in a single process every call is the
identity."""

from tritium.distributed.group import (
    MULTICAST_OFF,
    all_reduce,
    barrier,
    broadcast,
    close,
    disable_multicast,
    gather,
    graph_capturable,
    init,
    rank,
    world_size,
)

__all__ = ["MULTICAST_OFF", "all_reduce", "barrier", "broadcast", "close", "disable_multicast", "gather",
           "graph_capturable", "init", "rank", "world_size"]

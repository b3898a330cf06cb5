"""Errors the engine raises that callers (the LLM class, the server) tell apart."""


class EngineDeadError(RuntimeError):
    """An error that belongs to no single request (a CUDA error, out of memory, a dead tensor-parallel rank): the
    engine cannot serve anything more, and every request in flight has failed with it."""

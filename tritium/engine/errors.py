"""Errors the engine raises that callers (the LLM class, the server) tell apart."""

import torch


class EngineDeadError(RuntimeError):
    """An error that belongs to no single request (a CUDA error, out of memory, a dead tensor-parallel rank): the
    engine cannot serve anything more, and every request in flight has failed with it."""


class InvalidParameter(ValueError):
    """A request field outside what the engine takes; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


class RequestFailed(RuntimeError):
    """One request failed inside the engine (its set-up, sampling, detokenisation or stop checks raised); it ended
    with this error and every other request went on untouched."""


# Messages of the errors torch raises as plain RuntimeErrors when the device or a collective has failed.
_DEVICE_FAULTS = ("CUDA error", "CUDA out of memory", "CUBLAS_STATUS", "cuDNN error", "NCCL", "device-side assert")


def is_engine_fault(exc: BaseException) -> bool:
    """Whether an error belongs to the engine rather than to a request: the device's (CUDA errors, out of memory),
    the host's memory, a dead rank's (EngineDeadError). After one, nothing the engine holds can be trusted."""
    accelerator_error = getattr(torch, "AcceleratorError", ())  # torch >= 2.8: CUDA errors get their own class
    if isinstance(exc, (EngineDeadError, torch.OutOfMemoryError, MemoryError, accelerator_error)):
        return True
    return isinstance(exc, RuntimeError) and any(s in str(exc) for s in _DEVICE_FAULTS)

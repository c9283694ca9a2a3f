"""A dispatch mode that records every operation reading a tensor's values on the host (a device sync on a GPU)."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

# aten ops whose result (a Python scalar, or an output shape) depends on tensor values: on a GPU each one waits for
# the queue to drain. item(), int(), float(), bool() and `if tensor:` all reach _local_scalar_dense.
SYNC_OPS = {"_local_scalar_dense", "equal", "nonzero", "bincount", "masked_select", "_unique2", "unique_dim",
            "unique_consecutive", "repeat_interleave", "histc"}  # fmt: skip


class HostReads(TorchDispatchMode):
    """Collect the names of host-reading ops run inside ``with HostReads() as reads:`` (forward and backward).

    Also caught: indexing or index-assigning with a boolean mask (its result's shape is the mask's count), and
    ``Tensor.tolist`` / ``Tensor.numpy`` (seen by a function mode: they do not dispatch).
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []
        self._functions = _TensorToHost(self.ops)

    def __enter__(self) -> HostReads:
        self._functions.__enter__()
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._functions.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        indices = args[1] if name in {"index", "index_put", "index_put_"} and len(args) > 1 else ()
        if name in SYNC_OPS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


class _TensorToHost(TorchFunctionMode):
    def __init__(self, ops: list[str]) -> None:
        super().__init__()
        self.ops = ops

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.tolist, torch.Tensor.numpy):
            self.ops.append(func.__name__)
        return func(*args, **(kwargs or {}))

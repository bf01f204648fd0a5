"""Count what a piece of torch code dispatches: host synchronisations and aten ops (TorchDispatchMode, any device).

A host synchronisation is an op after which the host must wait for the device: a value read back
(`_local_scalar_dense`: `.item()`, `bool(t)`, `int(t)`, `.tolist()`), or an op whose output shape depends on tensor
values (`nonzero`, `unique`, `masked_select`, boolean-mask indexing, `repeat_interleave` without `output_size`, ...),
or a tensor built from host data (`lift_fresh`: `torch.tensor(...)`, a host-to-device copy on an accelerator). The
ops are classified as they behave on CUDA, so a count taken on the CPU says what a GPU run would wait for.
`_assert_async` is not one: on CUDA it launches a one-thread assertion kernel and returns (on the CPU it checks at
once, where no launch queue exists to drain).

    with HostSyncCounter() as syncs:
        model(**batch)
    syncs.count, syncs.events  # [(op name, "file:line in function"), ...]
"""

import traceback
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Ops that synchronise whatever their arguments.
SYNCING_OPS = frozenset(
    {
        aten._local_scalar_dense.default,
        aten.item.default,
        aten.is_nonzero.default,
        aten.equal.default,
        aten.nonzero.default,
        aten.nonzero.out,
        aten.argwhere.default,
        aten.masked_select.default,
        aten._unique.default,
        aten._unique2.default,
        aten.unique_dim.default,
        aten.unique_consecutive.default,
        aten.unique_dim_consecutive.default,
        aten.bincount.default,
        aten.lift_fresh.default,
        aten.lift_fresh_copy.default,
    }
)

_TORCH_ROOT = str(Path(torch.__file__).parent)


def _is_boolean_index(indices):
    return any(index is not None and index.dtype in (torch.bool, torch.uint8) for index in indices)


def is_host_sync(func, args, kwargs):
    """Whether `func(*args, **kwargs)` makes the host wait for the device (see the module docstring)."""
    if func in SYNCING_OPS:
        return True
    packet = func.overloadpacket
    if packet in (aten.index, aten._unsafe_index) and len(args) > 1:
        return _is_boolean_index(args[1])
    if packet in (aten.index_put, aten.index_put_, aten._index_put_impl_) and len(args) > 1:
        return _is_boolean_index(args[1])
    if func is aten.repeat_interleave.Tensor or func is aten.repeat_interleave.self_Tensor:
        return kwargs.get("output_size") is None
    return False


def _caller():
    """The innermost frame outside torch itself: where the user code asked for the op."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        if not frame.filename.startswith(_TORCH_ROOT) and frame.filename != __file__:
            return f"{Path(frame.filename).name}:{frame.lineno} in {frame.name}"
    return "?"


class HostSyncCounter(TorchDispatchMode):
    """Records every host-synchronising op dispatched inside the `with` block, with the line that asked for it."""

    def __init__(self):
        super().__init__()
        self.events = []

    @property
    def count(self):
        return len(self.events)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_host_sync(func, args, kwargs):
            self.events.append((str(func.overloadpacket.__name__), _caller()))
        return func(*args, **kwargs)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops (kernels and views, each one dispatch) run inside the `with` block."""

    def __init__(self):
        super().__init__()
        self.ops = []

    @property
    def count(self):
        return len(self.ops)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def ops_per_iteration(run, iterations=5):
    """The aten ops that one more iteration of a loop adds: `run(n)` runs the loop n times; the count of
    `run(iterations + 1)` minus that of `run(iterations)` leaves out what comes before and after the loop."""
    counts = []
    for count in (iterations, iterations + 1):
        with OpCounter() as ops:
            run(count)
        counts.append(ops.count)
    return counts[1] - counts[0]

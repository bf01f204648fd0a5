"""FSDP2 (`torch.distributed.fsdp.fully_shard`, what `configuration/accelerate/fsdp.yaml` sets up) in the training
code. A sharded model holds DTensor shards of its parameters, gathered only around the `forward` of each shard unit
and of the root: the methods that the evaluation calls instead of `forward` are registered to gather them
(`register_forward_methods`), and the final save gathers the whole weights into a plain copy (`unsharded_copy`).
Both are collective: every rank must take part.
"""

import copy

import torch.distributed as dist
from peft import PeftModel, get_peft_model
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method


def is_sharded(model: nn.Module) -> bool:
    """Whether `model` is the root of an FSDP2-sharded model (accelerate's FSDP2 shards the root with the units)."""
    return isinstance(model, FSDPModule)


def register_forward_methods(model: nn.Module, names: tuple[str, ...]) -> None:
    """Let each method of `names` gather the root's parameters of a sharded `model` as `forward` does (the units
    inside gather theirs in their own forward); nothing for a model that is not sharded. A method is registered once:
    the Trainer registers `generate` itself, and a second registration would gather twice."""
    for name in names:
        if is_sharded(model) and name not in vars(model):
            register_fsdp_forward_method(model, name)


def _unsharded_class(module: nn.Module) -> type:
    """The class that `fully_shard` derived the module's `FSDP<class>` from (the module's own class if unsharded)."""
    return next(cls for cls in type(module).__mro__ if not issubclass(cls, FSDPModule))


def _plain_structure(model: nn.Module) -> nn.Module:
    """A new module of `model`'s structure (a PeftModel: the same adapter on a new base model), randomly initialised."""
    if isinstance(model, PeftModel):
        adapter = model.active_adapter
        base = _plain_structure(model.get_base_model())
        return get_peft_model(base, copy.deepcopy(model.peft_config[adapter]), adapter_name=adapter)
    return _unsharded_class(model)(copy.deepcopy(model.config))


def unsharded_copy(model: nn.Module) -> nn.Module | None:
    """A plain (not sharded) copy of the sharded `model` holding its whole weights on rank 0, None on the other ranks.

    Every rank must call it: the full state dict is gathered collectively into rank 0's CPU memory, as accelerate's
    `get_state_dict` gathers it for FSDP2. A PeftModel gives a PeftModel (merge it as an unsharded one).
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    plain = _plain_structure(model)
    plain.load_state_dict(state)
    return plain

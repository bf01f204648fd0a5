"""WiSE-FT (Wortsman et al., CVPR 2022; McKinzie et al.'s second intervention for missing-modality robustness):
ensemble in weight space the fine-tuned model with the weights it started from, theta = (1 - alpha) theta_0 +
alpha theta_1. alpha = 1 is the fine-tuned model, alpha = 0 the initial one.

What is interpolated: the weights that start from pretrained values, i.e. the backbones named in
`config.pretrained_backbones`. Under LoRA this is the adapter delta scaled by alpha (W_0 + alpha * B A s: the LoRA
B matrices are multiplied by alpha), exactly the interpolation of the merged weights. The modules VK-OOD adds
(projections, OOD layer, fusion, poolers, head) and a backbone trained from scratch have no meaningful initial
weights (a random draw): they keep their fine-tuned weights at every alpha, so alpha = 0 is "the pretrained
encoders under the fine-tuned fusion and head".
"""

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def _task_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if isinstance(model, PeftModel) else model


def pretrained_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the floating-point weights and buffers of `model`'s pretrained backbones, by the state-dict
    names of the plain task model (under PEFT: without the LoRA tensors and `base_layer`, as after merging): the
    theta_0 of `wise_ft` for a fully fine-tuned model. Take it before training."""
    task = _task_model(model)
    prefixes = tuple(f"{task.base_model_prefix}.{name}." for name in task.config.pretrained_backbones)
    return {
        name.replace(".base_layer.", "."): value.detach().cpu().clone()
        for name, value in task.state_dict().items()
        if name.startswith(prefixes) and value.is_floating_point() and ".lora_" not in name
    }


@torch.no_grad()
def wise_ft(model: nn.Module, alpha: float, initial_state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Interpolate `model` in place toward its initial pretrained weights (module docstring); returns it.

    A PeftModel: its LoRA deltas are scaled by `alpha` (no `initial_state` needed: the base weights are theta_0).
    A plain model: each weight named in `initial_state` (`pretrained_state` of the model before training) becomes
    (1 - alpha) * initial + alpha * fine-tuned. Under FSDP2 (the weights are DTensor shards) each process mixes its own
    shard, cut from the whole initial weight it holds, without communication.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"--wise_ft_alpha must be in [0, 1], got {alpha}")
    if isinstance(model, PeftModel):
        for module in model.modules():
            if isinstance(module, LoraLayer):
                for adapter in module.lora_B:
                    module.lora_B[adapter].weight.mul_(alpha)
        return model
    if initial_state is None:
        raise ValueError("WiSE-FT of a fully fine-tuned model needs its initial weights (pretrained_state)")
    current = model.state_dict()
    missing = sorted(set(initial_state) - set(current))
    if missing:
        raise ValueError(f"WiSE-FT: the initial weights name tensors the model does not have: {missing[:5]}")
    for name, initial in initial_state.items():
        target = current[name]
        initial = initial.to(target.device, torch.float32)
        if isinstance(target, DTensor):
            initial = distribute_tensor(initial, target.device_mesh, target.placements, src_data_rank=None)
        # (1 - alpha) x0 + alpha x1 rather than a lerp: exact at both ends (0 * x = 0, 1 * x = x)
        mixed = (1 - alpha) * initial + alpha * target.float()
        target.copy_(mixed.to(target.dtype))
    return model

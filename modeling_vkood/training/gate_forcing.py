"""The gate-forcing schedule: the fusion first reads the knowledge that the relevance labels select, then the learned
OOD gate takes over (a curriculum for a fusion and an OOD layer trained from scratch together).

Measured on knowledge-VQA (benchmarks/README.md): behind a gate that is still learning, the fusion settles at the
answer prior and never reads a fact, even once the gate separates the facts (AUROC 0.95); forced for the first
third of the run and handed over in the second, it answers from the facts.
"""

from transformers import TrainerCallback


def forcing_share(step: int, forced_steps: int, handover_steps: int) -> float:
    """Share of the relevance labels in the fusion's gate at optimizer step `step`: 1 for the first `forced_steps`,
    then falling linearly to 0 over `handover_steps`."""
    if step < forced_steps:
        return 1.0
    if step >= forced_steps + handover_steps:
        return 0.0
    return 1.0 - (step - forced_steps) / handover_steps


class GateForcingSchedule(TrainerCallback):
    """Sets `relevance_forcing` of every OOD layer of the model (also PEFT's trained copy) at each optimizer step;
    resumed runs pick up the share of their step. Needs `knowledge_relevance` in the batches (`VQACollator(
    answer_relevance=True)`): without it the layers gate as usual."""

    def __init__(self, forced_steps: int, handover_steps: int):
        if forced_steps < 0 or handover_steps < 0:
            raise ValueError(f"gate forcing steps must be >= 0, got {forced_steps} and {handover_steps}")
        self.forced_steps = forced_steps
        self.handover_steps = handover_steps
        self.layers = []

    def _set(self, step):
        share = forcing_share(step, self.forced_steps, self.handover_steps)
        for layer in self.layers:
            layer.relevance_forcing = share

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        # found once, not at every step: the model's modules do not change during training
        self.layers = [module for module in model.modules() if hasattr(module, "relevance_forcing")]

    def on_step_begin(self, args, state, control, **kwargs):
        self._set(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self._set(self.forced_steps + self.handover_steps)  # 0: evaluation and saving see the learned gate

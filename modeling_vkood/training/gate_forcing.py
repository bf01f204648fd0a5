"""Gate forcing: the fusion first reads the knowledge that the relevance labels select, then the learned OOD gate
takes over (a curriculum for a fusion and an OOD layer trained from scratch together; the knowledge-VQA study in
benchmarks/README.md measures it). The trainer passes the share of the step to the model's forward as
`gate_forcing`; the OOD layer mixes it in (`modeling_vkood.ood_vkood.forced_log_gate`)."""


class GateForcingSchedule:
    """Share of the relevance labels in the fusion's gate at optimizer step `step`: 1 for the first `forced_steps`,
    then falling linearly to 0 over `handover_steps`. A resumed run picks up the share of its step."""

    def __init__(self, forced_steps: int, handover_steps: int):
        if forced_steps < 0 or handover_steps < 0:
            raise ValueError(f"gate forcing steps must be >= 0, got {forced_steps} and {handover_steps}")
        self.forced_steps = forced_steps
        self.handover_steps = handover_steps

    def __call__(self, step: int) -> float:
        if step < self.forced_steps:
            return 1.0
        if step >= self.forced_steps + self.handover_steps:
            return 0.0
        return 1.0 - (step - self.forced_steps) / self.handover_steps

"""Read the tensors and hyper-parameters of a PyTorch Lightning checkpoint without Lightning and without running the
pickled code.

A Lightning 1.x `.ckpt` pickles Lightning's own classes next to the weights (its callbacks' states are keyed by
the callback class, the hyper-parameters are an `AttributeDict`), so today's `torch.load(weights_only=True)` refuses
it and `weights_only=False` would import Lightning and run whatever the pickle names. Here the file is read with the
weights-only unpickler, each of those names standing for an inert placeholder: dictionary classes become `dict`,
every other class a bare class of the same name that is never called with user code.
"""

import logging
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

# Names that pickle a dict subclass (its items are set with SETITEMS, which the weights-only unpickler allows on
# plain dicts only): Lightning's and argparse-like attribute dicts.
DICT_CLASSES = ("AttributeDict",)


def _placeholder(qualified_name: str):
    """A bare class standing for `qualified_name` (a dict for the attribute-dict classes)."""
    module, _, name = qualified_name.rpartition(".")
    if name in DICT_CLASSES:
        return dict
    return type(name, (), {"__module__": f"placeholder.{module}", "__doc__": f"placeholder for {qualified_name}"})


def load_lightning_checkpoint(path: str | Path) -> dict:
    """The checkpoint as a dict (`state_dict`, `hyper_parameters`, ...) with every non-torch class a placeholder.

    Raises a ValueError naming the file when it is not a torch checkpoint holding a `state_dict`."""
    path = Path(path)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    if unsafe:
        logger.info("%s: reading without running %s", path, ", ".join(unsafe))
    with torch.serialization.safe_globals([(_placeholder(name), name) for name in unsafe]):
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{path}: not a Lightning checkpoint (no `state_dict` mapping)")
    return checkpoint


def checkpoint_hyper_parameters(checkpoint: dict) -> dict:
    """The model's saved configuration: `hyper_parameters["config"]` as METER saves it, else the hyper-parameters."""
    hyper = checkpoint.get("hyper_parameters") or {}
    config = hyper.get("config", hyper) if isinstance(hyper, dict) else {}
    return dict(config) if isinstance(config, dict) else {}


__all__ = ["load_lightning_checkpoint", "checkpoint_hyper_parameters"]

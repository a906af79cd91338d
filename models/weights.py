"""Loading published / foreign weights into the model (weights only, never optimiser state)."""
from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from util.checkpoint import load_checkpoint
from util.errors import InputError

# Upstream attaches the detector's heads to its decoder, which saves every head a second time
# under these prefixes. Our decoder does not own the heads, so these aliases are dropped.
UPSTREAM_HEAD_ALIASES = ("transformer.decoder.class_embed.", "transformer.decoder.bbox_embed.")


def read_state_dict(path: str, loaded: Any = None, flag: str = "--pretrained") -> Dict[str, torch.Tensor]:
    """A raw state dict, or a checkpoint holding one under 'model' (DDP 'module.' prefixes removed).

    The file is read with ``util.checkpoint.load_checkpoint`` (weights only: it cannot run code);
    ``loaded``: the file's contents when the caller has read it already (so it is read once).
    Raises ``InputError`` (one line, naming the file) when it holds no state dict of tensors.
    """
    obj = loaded if loaded is not None else load_checkpoint(path, flag=flag)
    state = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise InputError(f"{flag} {path} holds no state dict (expected a dict of tensors, or a checkpoint "
                         f"with one under 'model'; found {type(obj).__name__})")
    return {(k[len("module."):] if k.startswith("module.") else k): v for k, v in state.items()}


def drop_upstream_aliases(state: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    kept = {k: v for k, v in state.items() if not k.startswith(UPSTREAM_HEAD_ALIASES)}
    return kept, sorted(set(state) - set(kept))


def load_pretrained(model: nn.Module, path: str, verbose: bool = True, loaded: Any = None
                    ) -> Tuple[List[str], List[str]]:
    """Load weights from ``path`` into ``model`` non-strictly; returns (missing, unexpected) keys.

    Upstream head aliases are dropped (and counted); tensors whose shape does not fit
    (e.g. a classifier for another number of classes) are skipped and reported as missing.
    ``loaded``: the already-read contents of ``path`` (a checkpoint is then not read again).
    """
    state, aliases = drop_upstream_aliases(read_state_dict(path, loaded))
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in mismatched:
        state.pop(k)
    result = model.load_state_dict(state, strict=False)
    missing, unexpected = sorted(result.missing_keys), sorted(result.unexpected_keys)
    if verbose:
        print(f"loaded weights from {path}: {len(state) - len(unexpected)} tensors")
        if aliases:
            print(f"  dropped {len(aliases)} upstream head aliases (transformer.decoder.{{class,bbox}}_embed.*)")
        for k in mismatched:
            print(f"  shape mismatch, skipped: {k} (model {tuple(own[k].shape)})")
        print(f"  missing keys ({len(missing)}): {missing if missing else 'none'}")
        print(f"  unexpected keys ({len(unexpected)}): {unexpected if unexpected else 'none'}")
    return missing, unexpected

"""States to bytes and back: safetensors plus metadata that says whose state it is.

Metadata: the format, the model's name and revision, a hash of the configuration that shapes
the state (the model config and every state tensor's shape and dtype), a fingerprint of the
weights, tokens seen, the pending (last sampled) token(s), and a SHA-256 of the tensor bytes.
A state from another model, revision or shape, or one whose bytes do not match their checksum,
is refused (SessionError, the API's 409) and never loaded.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from server.state_store.base import Session, SessionError, Snapshot

FORMAT = "lln-state/1"
# config fields that do not change what a state means
_VOLATILE = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures"}


@dataclass(frozen=True)
class StateTag:
    """Who wrote a state: refused unless every field matches the reader's."""

    model: str
    revision: str
    config_hash: str
    weights: str

    def key(self) -> str:
        """A short id of the tag (Redis key namespace of shared prefix states)."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def state_tag(model: torch.nn.Module, model_name: str, template: Snapshot) -> StateTag:
    """The tag of states made by `model` (served as `model_name`); template: an empty state."""
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE}
    layout = [[list(t.shape[1:]), str(t.dtype)] for s in template for t in s.flat()]
    shape_text = json.dumps({"config": config, "layout": layout}, sort_keys=True, default=str)
    return StateTag(
        model=model_name,
        revision=_revision(getattr(model.config, "_name_or_path", "")),
        config_hash=hashlib.sha256(shape_text.encode()).hexdigest()[:16],
        weights=_weights_fingerprint(model),
    )


def encode(session: Session, tag: StateTag) -> bytes:
    """A session as safetensors bytes with its metadata."""
    tensors, seen = {}, set()
    for i, state in enumerate(session.snapshot):
        for j, t in enumerate(state.flat()):
            t = t.detach().contiguous().cpu()
            if t.untyped_storage().data_ptr() in seen:  # safetensors refuses shared memory
                t = t.clone()
            seen.add(t.untyped_storage().data_ptr())
            tensors[f"{i}.{j}"] = t
    metadata = {
        "format": FORMAT,
        **asdict(tag),
        "num_tokens": str(session.num_tokens),
        "pending": json.dumps(session.pending),
        "sha256": _checksum(tensors),
    }
    return st_save(tensors, metadata=metadata)


def read_metadata(blob: bytes) -> dict[str, str]:
    """The metadata of an encoded state, without loading its tensors."""
    try:
        size = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + size])
    except (ValueError, UnicodeDecodeError):
        raise SessionError("the saved state is not a readable state file") from None
    return header.get("__metadata__", {}) if isinstance(header, dict) else {}


def decode(blob: bytes, tag: StateTag, template: Snapshot, session_id: str) -> Session:
    """The session in `blob`, checked against this server's tag. template: an empty state of
    batch 1 (gives the structure and the device)."""
    meta = read_metadata(blob)
    check_tag(meta, tag, session_id)
    try:
        tensors = st_load(blob)
    except Exception as error:  # safetensors raises its own error type on bad bytes
        raise SessionError(f"session {session_id!r}: corrupt state ({error})") from None
    if _checksum(tensors) != meta.get("sha256"):
        raise SessionError(f"session {session_id!r}: corrupt state (checksum mismatch)")
    try:
        snapshot = [_unflat(empty, i, tensors) for i, empty in enumerate(template)]
        pending, num_tokens = json.loads(meta["pending"]), int(meta["num_tokens"])
    except (KeyError, ValueError, TypeError) as error:
        raise SessionError(f"session {session_id!r}: corrupt state ({error!r})") from None
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    return Session(snapshot, pending, num_tokens, nbytes)


def _unflat(empty, layer: int, tensors: dict[str, torch.Tensor]):
    """Layer `layer`'s state from the loaded tensors, on the template's device, checked
    against the template's shapes and dtypes."""
    flat = empty.flat()
    loaded = []
    for j, like in enumerate(flat):
        tensor = tensors[f"{layer}.{j}"]
        if tensor.shape != like.shape or tensor.dtype != like.dtype:
            raise ValueError(f"tensor {layer}.{j} is {tuple(tensor.shape)} {tensor.dtype}")
        loaded.append(tensor.to(like.device))
    return empty.unflat(loaded)


def check_tag(meta: dict[str, str], tag: StateTag, session_id: str) -> None:
    """SessionError unless the state was written by this model, revision and shape."""
    if meta.get("format") != FORMAT:
        raise SessionError(f"session {session_id!r}: unknown state format {meta.get('format')!r}")
    labels = {"model": "model", "revision": "model revision", "config_hash": "state shape "
              "(model configuration)", "weights": "model weights"}  # fmt: skip
    for name, label in labels.items():
        theirs, ours = meta.get(name), getattr(tag, name)
        if theirs != ours:
            raise SessionError(
                f"session {session_id!r} was saved by another {label} ({theirs!r}, this server "
                f"has {ours!r}); it cannot be continued here"
            )


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        digest.update(name.encode())
        digest.update(tensors[name].contiguous().view(torch.uint8).numpy().data)
    return digest.hexdigest()


def _revision(checkpoint: str) -> str:
    """The registry's revision of a prepared checkpoint, else 'unversioned'."""
    info = Path(checkpoint) / "lln_conversion.json" if checkpoint else None
    if info is not None and info.is_file():
        return str(json.loads(info.read_text()).get("revision", "unversioned"))
    return "unversioned"


@torch.no_grad()
def _weights_fingerprint(model: torch.nn.Module) -> str:
    """A hash of every parameter's name, shape and first elements: cheap, and different for
    different checkpoints of the same shape."""
    digest = hashlib.sha256()
    for name, param in model.named_parameters():
        digest.update(f"{name}{tuple(param.shape)}".encode())
        head = param.detach().reshape(-1)[:256].float().cpu()
        digest.update(head.numpy().tobytes())
    return digest.hexdigest()[:16]

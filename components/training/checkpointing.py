"""Training checkpoints: UNet (and EMA) in safetensors, optimizer and LR scheduler, data position.

An adapter run (``train.method: lora | lokr``) checkpoints the adapter only: ``adapter.safetensors`` (peft's
state dict of the adapter, ``get_peft_model_state_dict``), its peft config (``adapter_config.json``), the
optimizer state of the adapter's parameters (the only ones it has), and the EMA of the adapter keyed like
``adapter.safetensors``. The frozen UNet is the registered base the run names, never copied into a checkpoint.

Weights are safetensors; optimizer state is loaded with ``torch.load(weights_only=True)``, so nothing
in a checkpoint can run code.

A checkpoint is complete only when ``COMPLETE`` is present and every file it lists is there with its
listed size. ``save_checkpoint`` writes it last, so a writer killed half-way leaves no marker; and
because the marker names the sizes, a *copy* that was cut short is refused too, whatever order the
copier (Ray's upload to ``storage_path``) took the files in. Loading refuses anything else
(docs/reliability.md), a marker without the size list (a plain ``ok`` of older checkpoints) included:
it cannot tell a whole copy from a cut one.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from components.config import RecurringError
from components.diffusion.adapters import (
    AdapterError,
    AdapterWeights,
    adapter_keys,
    adapter_state,
    config_from_dict,
    load_adapter_state,
)
from components.diffusion.safetensors_stream import iter_tensors

COMPLETE = "COMPLETE"
UNET_FILE = "unet.safetensors"
ADAPTER_FILE = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class IncompleteCheckpointError(RuntimeError):
    pass


def verify_complete(directory: Path) -> None:
    """Raise ``IncompleteCheckpointError`` unless ``COMPLETE`` exists and its files are all whole."""
    marker = Path(directory) / COMPLETE
    if not marker.is_file():
        raise IncompleteCheckpointError(f"checkpoint {directory} is incomplete (no {COMPLETE} marker)")
    text = marker.read_text()
    if text.strip() == "ok":
        raise IncompleteCheckpointError(
            f"checkpoint {directory} has a {COMPLETE} marker without file sizes (written by an older version): "
            "a cut copy cannot be told from a whole one, so it is not loaded; resume from a newer checkpoint"
        )
    try:
        sizes = dict(json.loads(text)["files"])
    except (ValueError, KeyError, TypeError):  # a marker cut short by an interrupted copy
        raise IncompleteCheckpointError(f"checkpoint {directory} is incomplete (unreadable {COMPLETE})") from None
    for name, size in sizes.items():
        path = Path(directory) / name
        if not path.is_file() or path.stat().st_size != size:
            found = path.stat().st_size if path.is_file() else "missing"
            raise IncompleteCheckpointError(
                f"checkpoint {directory} is incomplete: {name} is {found}, {COMPLETE} says {size} bytes"
            )


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batches_in_epoch: int = 0  # micro-batches of `epoch` already consumed
    samples_seen: int = 0
    best_val_loss: float | None = None
    source_samples: dict[str, int] = field(default_factory=dict)  # rows drawn per source, all ranks (the mix)


def save_checkpoint(
    directory: Path,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    state: TrainState,
    ema=None,
    *,
    unet_state: dict | None = None,
    optimizer_state: dict | None = None,
    adapter: str | None = None,
) -> Path:
    """``unet_state``/``optimizer_state``: full state dicts gathered beforehand (FSDP gathers them
    collectively on every rank, components/training/parallel.py); by default read from the modules.
    ``adapter``: the name of the peft adapter an adapter run trains; then only the adapter is written."""
    directory.mkdir(parents=True, exist_ok=True)
    if adapter is not None:
        save_file(adapter_state(unet, adapter), directory / ADAPTER_FILE)
        (directory / ADAPTER_CONFIG).write_text(json.dumps(unet.peft_config[adapter].to_dict(), default=list))
        keys = adapter_keys(unet, adapter)
    else:
        unet_state = unet.state_dict() if unet_state is None else unet_state
        save_file({k: v.detach().cpu().contiguous() for k, v in unet_state.items()}, directory / UNET_FILE)
        keys = None
    if ema is not None:
        names = keys or [f"p{i}" for i in range(len(ema.shadow_params))]
        shadow = {name: p.detach().cpu().contiguous() for name, p in zip(names, ema.shadow_params, strict=True)}
        save_file(shadow, directory / "ema.safetensors")
        (directory / "ema.json").write_text(json.dumps({"optimization_step": ema.optimization_step}))
    torch.save(optimizer.state_dict() if optimizer_state is None else optimizer_state, directory / "optimizer.pt")
    (directory / "lr_scheduler.json").write_text(json.dumps(lr_scheduler.state_dict(), default=str))
    (directory / "state.json").write_text(json.dumps(asdict(state)))
    write_complete(directory)
    return directory


def write_complete(directory: Path) -> None:
    """The ``COMPLETE`` marker listing every file of ``directory`` with its size; written last."""
    sizes = {p.name: p.stat().st_size for p in sorted(directory.iterdir()) if p.is_file() and p.name != COMPLETE}
    (directory / COMPLETE).write_text(json.dumps({"files": sizes}))


def load_checkpoint(
    directory: Path, unet: torch.nn.Module, optimizer=None, lr_scheduler=None, ema=None, strategy=None,
    adapter: str | None = None,
) -> TrainState:
    """Restore a complete checkpoint; ``strategy`` (components/training/parallel.py) loads into sharded modules;
    ``adapter``: the run trains that peft adapter, and the checkpoint must hold exactly it."""
    directory = Path(directory)
    verify_complete(directory)
    _check_kind(directory, adapter)
    if adapter is not None:
        try:
            load_adapter_state(unet, load_file(directory / ADAPTER_FILE), adapter)
        except AdapterError as err:
            raise RecurringError(f"checkpoint {directory} holds another adapter than this run trains ({err}); "
                                 "resume with the adapter settings it was made with") from None
    elif strategy is not None:
        strategy.load_model_state(unet, load_file(directory / UNET_FILE))
    else:
        unet.load_state_dict(load_file(directory / UNET_FILE), strict=True)
    if optimizer is not None:
        opt_state = torch.load(directory / "optimizer.pt", weights_only=True)
        if strategy is not None:
            strategy.load_optimizer_state(unet, optimizer, opt_state)
        else:
            optimizer.load_state_dict(opt_state)
    if lr_scheduler is not None:
        lr_scheduler.load_state_dict(json.loads((directory / "lr_scheduler.json").read_text()))
    if ema is not None and (directory / "ema.safetensors").exists():
        shadow = load_file(directory / "ema.safetensors")
        if adapter is not None:
            names = adapter_keys(unet, adapter)
        else:
            names = [f"p{i}" for i in range(len(ema.shadow_params))]
        for name, p in zip(names, ema.shadow_params, strict=True):
            p.data.copy_(shadow[name])
        ema.optimization_step = json.loads((directory / "ema.json").read_text())["optimization_step"]
    return TrainState(**json.loads((directory / "state.json").read_text()))


def _check_kind(directory: Path, adapter: str | None) -> None:
    """A full run resumes from a full checkpoint, an adapter run from an adapter checkpoint; anything else is a
    changed ``train.method`` under the same run name, refused in one line."""
    has_adapter = (directory / ADAPTER_FILE).is_file()
    if adapter is not None and not has_adapter:
        raise RecurringError(f"checkpoint {directory} is a full fine-tune's: this run trains an adapter under the "
                             "same run name; use another train.run_name")
    if adapter is None and has_adapter:
        raise RecurringError(f"checkpoint {directory} holds an adapter: this run is a full fine-tune under the same "
                             "run name; use another train.run_name")


def load_adapter_weights(directory: Path, use_ema: bool = False):
    """The adapter of an adapter run's checkpoint, for export: ``AdapterWeights`` (its tensors and peft config),
    the EMA's tensors where asked and present. No UNet is needed: the checkpoint is self-describing."""
    directory = Path(directory)
    verify_complete(directory)
    state = load_file(directory / ADAPTER_FILE)
    if use_ema and (directory / "ema.safetensors").exists():
        shadow = load_file(directory / "ema.safetensors")
        if set(shadow) != set(state):
            raise IncompleteCheckpointError(f"checkpoint {directory}: the adapter's EMA does not match the adapter")
        state = shadow
    config = config_from_dict(json.loads((directory / ADAPTER_CONFIG).read_text()))
    return AdapterWeights(state, config)


def load_unet_weights(directory: Path, unet: torch.nn.Module, use_ema: bool = False) -> None:
    """Final weights for export: the EMA shadow where asked and present, else the raw UNet. Copied into the
    module's own tensors one at a time as they are read, so the checkpoint's UNet is never held beside it
    (at SDXL's size that would be a second 10 GB)."""
    directory = Path(directory)
    verify_complete(directory)
    _check_kind(directory, None)
    copy_into(unet.state_dict(), directory / UNET_FILE)
    if use_ema and (directory / "ema.safetensors").exists():
        trained = (p for p in unet.parameters() if p.requires_grad)
        copy_into({f"p{i}": p.data for i, p in enumerate(trained)}, directory / "ema.safetensors")


def copy_into(targets: dict[str, torch.Tensor], path: Path) -> None:
    """Copy every tensor of ``path`` into the tensor of ``targets`` with its key, one read at a time; the keys
    and shapes must match exactly (what ``load_state_dict(strict=True)`` asks)."""
    seen = set()
    with torch.no_grad():
        for key, tensor in iter_tensors(path):
            target = targets.get(key)
            if target is None or target.shape != tensor.shape:
                what = ("is not in the model" if target is None
                        else f"is {list(tensor.shape)}, the model's {list(target.shape)}")
                raise IncompleteCheckpointError(f"{path}: tensor {key!r} {what}")
            target.copy_(tensor)
            seen.add(key)
    if missing := sorted(set(targets) - seen):
        raise IncompleteCheckpointError(f"{path} lacks {len(missing)} of the model's tensors, e.g. {missing[0]!r}")

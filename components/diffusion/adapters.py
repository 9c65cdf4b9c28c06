"""Adapters on the SDXL UNet (LoRA, LoKr), built by peft the way diffusers integrates it.

peft owns the layers: ``unet.add_adapter(config, name)`` (diffusers' ``PeftAdapterMixin``, which calls peft's
``inject_adapter_in_model``) wraps each targeted Linear/Conv2d in peft's LoRA or LoKr layer, and
``get_peft_model_state_dict`` / ``set_peft_model_state_dict`` read and write the adapter's tensors only. Nothing
here computes an adapter update by hand.

One file format, diffusers': ``pytorch_lora_weights.safetensors`` written by
``StableDiffusionXLPipeline.save_lora_weights`` -- the adapter's tensors under ``unet.<module>.<peft name>`` and the
peft config as JSON in the header (``lora_adapter_metadata``), which is what tells a loader the alpha. Vanilla
diffusers reads a LoRA file with ``pipe.load_lora_weights``, and a LoKr file with
``pipe.unet.load_lora_adapter(..., prefix="unet")`` (diffusers 0.42's SDXL pipeline loader accepts only keys that
contain "lora"; docs/adapters.md).

The platform's own loader (``read_adapter`` + ``attach``) rebuilds the peft config from that header, injects it and
loads the tensors, refusing a file whose tensors are not exactly the adapter's (a missing or extra key, a wrong
shape): a silently half-loaded adapter would serve wrong images without an error.

Many adapters can sit on one UNet (``AdapterSlots``): peft keeps each under its own name, and one of them, or none
(the bare base), is active for a call. Serving attaches them per request (deploy/app.py); the lock makes attaching
and running one at a time, since attaching replaces modules of the UNet a running call walks through.

Imports nothing of the platform outside this package: a registered adapter loads with it alone.
"""

from __future__ import annotations

import copy
import json
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import StableDiffusionXLPipeline
from peft import LoKrConfig, LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError, safe_open

ADAPTER_FILE = "pytorch_lora_weights.safetensors"
"""diffusers' ``LORA_WEIGHT_NAME_SAFE``: the file name ``save_lora_weights`` writes and ``load_lora_weights``
looks for."""
METADATA_KEY = "lora_adapter_metadata"
"""diffusers' ``LORA_ADAPTER_METADATA_KEY``: the header entry holding the peft config as JSON."""
UNET_PREFIX = "unet."
METHODS = ("lora", "lokr")
ADAPTER_PARAM_MARKERS = ("lora_", "lokr_")
"""Substrings of peft's adapter parameter names (``lora_A``, ``lora_B``, ``lokr_w1``, ``lokr_w2_a``, ...)."""


class AdapterError(ValueError):
    """An adapter that cannot be built, read or attached as it claims to be: every way a weights file can be wrong
    (not safetensors, a cut or lying header, metadata that is not the peft config, tensors of other names or
    shapes than its adapter's) is one of these, with its reason in the message."""


def peft_config(method: str, rank: int, alpha: float | None, dropout: float, target_modules: list[str],
                decompose_factor: int = -1):
    """The peft config of an adapter: ``LoraConfig`` (update B @ A scaled alpha / r; B starts at zero, so training
    starts from the base model exactly) or ``LoKrConfig`` (update kron(w1, w2) scaled alpha / r; w1 starts at zero)."""
    alpha = float(alpha if alpha is not None else rank)
    if method == "lora":
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                          init_lora_weights=True)
    if method == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout, target_modules=list(target_modules),
                          decompose_factor=decompose_factor, init_weights=True)
    raise AdapterError(f"adapter method {method!r}: one of {', '.join(METHODS)}")


def method_of(config) -> str:
    """``lora`` or ``lokr`` for a peft config."""
    kind = str(getattr(config, "peft_type", "")).rsplit(".", 1)[-1].lower()
    if kind not in METHODS:
        raise AdapterError(f"peft adapter type {kind or type(config).__name__!r} is not one this platform serves "
                           f"({', '.join(METHODS)})")
    return kind


def config_from_dict(data: Mapping):
    """A peft config back from its ``to_dict()`` (the header of a diffusers-format file)."""
    kinds = {"LORA": LoraConfig, "LOKR": LoKrConfig}
    kind = str(data.get("peft_type", "")).rsplit(".", 1)[-1].upper()
    if kind not in kinds:
        raise AdapterError(f"adapter metadata names peft type {data.get('peft_type')!r}; expected LORA or LOKR")
    cls = kinds[kind]
    known = set(cls.__dataclass_fields__)
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except (TypeError, ValueError) as err:
        raise AdapterError(f"adapter metadata does not make a {cls.__name__}: {err}") from None


def rank_alpha(config) -> tuple[int, float]:
    return int(config.r), float(config.lora_alpha if hasattr(config, "lora_alpha") else config.alpha)


# --- training -------------------------------------------------------------------------------------


def add_adapter(unet: torch.nn.Module, config, name: str = "default") -> list[torch.nn.Parameter]:
    """Freeze ``unet`` and give it a trainable adapter (diffusers ``add_adapter``); returns the adapter's
    parameters, in the order ``unet.parameters()`` yields them (the optimizer's and the EMA's order)."""
    unet.requires_grad_(False)
    unet.add_adapter(copy.deepcopy(config), adapter_name=name)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    if not trainable:
        raise AdapterError(f"no module of the UNet matches target_modules {sorted(config.target_modules)}")
    return trainable


def adapter_keys(unet: torch.nn.Module, name: str = "default") -> list[str]:
    """The state-dict keys of adapter ``name`` (peft's, without the adapter name), in the order of
    ``unet.parameters()``: the n-th trainable parameter is stored under the n-th key."""
    suffix = f".{name}"
    keys = []
    for pname, param in unet.named_parameters():
        if param.requires_grad and any(m in pname for m in ADAPTER_PARAM_MARKERS):
            keys.append(pname.replace(suffix + ".", ".") if pname.endswith(".weight") or pname.endswith(".bias")
                        else pname.removesuffix(suffix))
    return keys


def adapter_state(unet: torch.nn.Module, name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter's tensors (peft's ``get_peft_model_state_dict``), detached, contiguous, on the CPU."""
    state = get_peft_model_state_dict(unet, adapter_name=name)
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def load_adapter_state(unet: torch.nn.Module, state: Mapping[str, torch.Tensor], name: str = "default") -> None:
    """Load ``state`` into adapter ``name``: the key sets must be equal and every shape must match."""
    expected = set(adapter_state(unet, name))
    given = set(state)
    if expected != given:
        missing, extra = sorted(expected - given), sorted(given - expected)
        raise AdapterError(f"adapter tensors do not match the adapter {name!r}: {len(missing)} missing "
                           f"{missing[:2]}, {len(extra)} unexpected {extra[:2]}")
    try:
        result = set_peft_model_state_dict(unet, dict(state), adapter_name=name)
    except RuntimeError as err:  # a shape mismatch
        raise AdapterError(f"adapter tensors do not fit adapter {name!r}: {str(err).splitlines()[0][:300]}") from None
    if getattr(result, "unexpected_keys", None):
        raise AdapterError(f"adapter {name!r}: peft did not place {result.unexpected_keys[:2]}")


# --- the diffusers file ----------------------------------------------------------------------------


def save_adapter(directory: str | Path, state: Mapping[str, torch.Tensor], config) -> Path:
    """``directory/pytorch_lora_weights.safetensors`` in diffusers' layout, through diffusers' own writer
    (``StableDiffusionXLPipeline.save_lora_weights``), the peft config in its header."""
    method_of(config)
    Path(directory).mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(
        str(directory), unet_lora_layers=dict(state), unet_lora_adapter_metadata=config.to_dict(),
        weight_name=ADAPTER_FILE, safe_serialization=True,
    )
    return Path(directory) / ADAPTER_FILE


@dataclass(frozen=True)
class AdapterWeights:
    """An adapter read from its file: its tensors (peft keys, no ``unet.`` prefix) and its peft config."""

    state: dict[str, torch.Tensor] = field(repr=False)
    config: object

    @property
    def method(self) -> str:
        return method_of(self.config)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.state.values())


def adapter_file(path: str | Path) -> Path:
    path = Path(path)
    return path / ADAPTER_FILE if path.is_dir() else path


def read_adapter(path: str | Path) -> AdapterWeights:
    """A diffusers-format adapter file (or the folder holding it)."""
    file = adapter_file(path)
    if not file.is_file():
        raise AdapterError(f"{file}: no adapter file")
    try:
        with safe_open(str(file), framework="pt") as fh:
            header = fh.metadata() or {}
            state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except (SafetensorError, OSError) as err:
        raise AdapterError(f"{file}: not a safetensors file ({type(err).__name__})") from None
    if METADATA_KEY not in header:
        raise AdapterError(f"{file}: no {METADATA_KEY} in its header (the peft config, which gives the alpha)")
    try:
        meta = json.loads(header[METADATA_KEY])
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict):
        raise AdapterError(f"{file}: its {METADATA_KEY} is not a JSON object (the peft config)")
    unet_meta = {k.removeprefix(UNET_PREFIX): v for k, v in meta.items() if k.startswith(UNET_PREFIX)}
    other = sorted(k for k in state if not k.startswith(UNET_PREFIX))
    if other:
        raise AdapterError(f"{file}: tensors outside the UNet ({other[:2]}); text-encoder adapters are not served")
    return AdapterWeights({k.removeprefix(UNET_PREFIX): v for k, v in state.items()}, config_from_dict(unet_meta))


def attach(unet: torch.nn.Module, weights: AdapterWeights, name: str) -> None:
    """Put ``weights`` on ``unet`` as adapter ``name`` (exactly: ``load_adapter_state``), in the UNet's device;
    on failure the half-made adapter is removed again."""
    if name in (getattr(unet, "peft_config", None) or {}):
        raise AdapterError(f"adapter name {name!r} is already in use on this UNet")
    try:
        unet.add_adapter(copy.deepcopy(weights.config), adapter_name=name)
        load_adapter_state(unet, weights.state, name)
    except Exception as err:
        if name in (getattr(unet, "peft_config", None) or {}):
            unet.delete_adapters(name)
        if isinstance(err, AdapterError):
            raise
        # peft refuses a config that names no module of this UNet, or values it cannot build layers from
        raise AdapterError(f"adapter {name!r} does not fit this UNet ({type(err).__name__}: "
                           f"{str(err).splitlines()[0][:300] if str(err) else ''})") from None
    unet.requires_grad_(False)


def fuse(unet: torch.nn.Module, weights: AdapterWeights) -> torch.nn.Module:
    """``unet`` with ``weights`` merged into its own weights and the adapter layers removed (diffusers
    ``fuse_lora`` + ``unload_lora``, which call peft's ``merge``): the plain model a base plus adapter amounts to."""
    attach(unet, weights, "fused")
    unet.fuse_lora(lora_scale=1.0, adapter_names=["fused"])
    unet.unload_lora()
    return unet


# --- many adapters on one UNet (serving) -----------------------------------------------------------


class AdapterSlots:
    """The adapters attached to one UNet, and which of them (or none) a call runs with.

    ``running(name)`` holds a lock for the whole call: two calls with different adapters must not overlap (the
    active adapter is a property of the shared modules), nor may an attach or a detach run while a call walks
    through the modules they replace.
    """

    def __init__(self, unet: torch.nn.Module):
        self.unet = unet
        self.lock = threading.RLock()
        self.attached: dict[str, int] = {}
        """Adapter name -> bytes of its tensors."""

    def ensure(self, name: str, weights: AdapterWeights) -> bool:
        """Attach ``weights`` as ``name`` unless it is attached; True if it was attached now."""
        with self.lock:
            if name in self.attached:
                return False
            attach(self.unet, weights, name)
            self.attached[name] = weights.nbytes
            return True

    def drop(self, name: str) -> None:
        with self.lock:
            if self.attached.pop(name, None) is not None:
                self.unet.delete_adapters(name)

    @contextmanager
    def running(self, name: str | None) -> Iterator[None]:
        """Make adapter ``name`` the only active one (None: the bare base) for the duration of the block."""
        with self.lock:
            if name is None:
                if self.attached:
                    self.unet.disable_adapters()
            else:
                if name not in self.attached:
                    raise AdapterError(f"adapter {name!r} is not attached")
                self.unet.enable_adapters()
                self.unet.set_adapter(name)
            yield

    @property
    def nbytes(self) -> int:
        return sum(self.attached.values())

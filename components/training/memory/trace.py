"""Peak memory of a training step, traced on the meta device: exact shapes, no storage, no GPU.

One micro-step (forward, loss, backward) runs on meta tensors while ``LiveBytes``, a
``TorchDispatchMode``, adds up the bytes of every tensor an op creates and subtracts them when its
storage is freed (the idea behind ``torch.distributed._tools.MemTracker``). Same Python code, same
frees as on a GPU, so its peak is what the CUDA caching allocator must hold for activations saved for
backward, gradients in flight and the recomputation of checkpointed blocks. Two things differ from a
GPU and are emulated by ``CudaAutocastEmulation``, a ``TorchFunctionMode``:

- CUDA autocast has no effect on meta tensors, so its policy is applied as PyTorch documents it
  ("Automatic Mixed Precision package, autocast op reference", CUDA ops): linear, matmuls and
  convolutions in the low-precision dtype, the low-precision copy of each fp32 weight cached until the
  autocast region ends; group_norm, layer_norm, softmax and mse_loss in fp32.
- ``scaled_dot_product_attention`` is routed to the kernels an A100/H100 picks (flash attention for
  bf16/fp16, memory-efficient attention for fp32: output and logsumexp, linear in sequence length)
  instead of the math fallback meta tensors would take (which materialises the L x L scores).

Not seen by the trace: the CUDA context, kernel workspaces (cuBLAS, cuDNN) and allocator
fragmentation -- components/training/memory/plan.py adds them as stated assumptions.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import checkpoint

from components.config import Precision

TEXT_TOKENS = 77  # CLIP's context length: the UNet's cross-attention sequence


def _tensors(obj):
    """The tensors in an op's (nested list/tuple/dict) arguments or outputs; faster than pytree here."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, list | tuple):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


class LiveBytes(TorchDispatchMode):
    """Bytes held by tensors that ops create inside this mode: current and peak.

    Outputs that share storage with an input (views, in-place ops) are not new memory. A storage is
    released when its last reference dies (weakref callback), exactly when the allocator would get
    the block back. Works on meta tensors, so a full-size model costs no memory to trace.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._refs: dict[int, weakref.ref] = {}

    def _release(self, key: int, nbytes: int) -> None:
        self.current -= nbytes
        self._refs.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            storage = t.untyped_storage()
            key = storage._cdata
            if key in inputs or key in self._refs:
                continue
            nbytes = storage.nbytes()
            self._refs[key] = weakref.ref(storage, lambda _, k=key, b=nbytes: self._release(k, b))
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


_LOW_PRECISION_OPS = frozenset({F.linear, F.conv1d, F.conv2d, F.conv_transpose2d, torch.matmul, torch.mm,
                                torch.bmm, torch.baddbmm, torch.addmm, torch.Tensor.matmul,
                                torch.Tensor.__matmul__, torch.Tensor.bmm})
_FP32_OPS = frozenset({F.group_norm, torch.group_norm, F.layer_norm, torch.layer_norm, F.softmax, torch.softmax,
                       torch.Tensor.softmax, F.log_softmax, F.mse_loss})


class CudaAutocastEmulation(TorchFunctionMode):
    """CUDA autocast's dtype policy for tensors that have no CUDA autocast (meta). ``dtype=None``: fp32
    training, no casts. Low-precision copies of leaf fp32 tensors that require grad (the weights) are
    cached until ``end_region()``, as ``torch.autocast`` caches them until its region exits."""

    def __init__(self, dtype: torch.dtype | None) -> None:
        super().__init__()
        self.dtype = dtype
        self.depth = 0
        self.weight_copy_bytes = 0
        self._cache: dict[int, torch.Tensor] = {}
        self._caching = dtype is not None

    def __enter__(self):
        self.depth += 1
        return super().__enter__()

    def __exit__(self, *exc):
        self.depth -= 1
        return super().__exit__(*exc)

    def end_region(self) -> None:
        self._cache.clear()
        self._caching = False

    def _cast(self, x, dtype: torch.dtype):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == dtype:
            return x
        if self._caching and x.is_leaf and x.requires_grad and dtype == self.dtype:
            if id(x) not in self._cache:
                self._cache[id(x)] = x.to(dtype)
                self.weight_copy_bytes += x.numel() * self._cache[id(x)].element_size()
            return self._cache[id(x)]
        return x.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            return self._attention(func, args, kwargs)
        if self.dtype is not None and (func in _LOW_PRECISION_OPS or func in _FP32_OPS):
            dtype = self.dtype if func in _LOW_PRECISION_OPS else torch.float32
            args = tuple(self._cast(a, dtype) for a in args)  # these ops take tensors flat, never in lists
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)

    def _attention(self, func, args, kwargs):
        """Flash attention (bf16/fp16) or memory-efficient attention (fp32): output + logsumexp saved."""
        q, k, v = (self._cast(x, self.dtype) if self.dtype else x for x in args[:3])
        if len(args) > 3 or set(kwargs) - {"scale", "dropout_p", "is_causal", "attn_mask"} or \
                kwargs.get("attn_mask") is not None or kwargs.get("dropout_p") or kwargs.get("is_causal"):
            return func(q, k, v, *args[3:], **kwargs)
        scale = kwargs.get("scale")
        if q.dtype in (torch.bfloat16, torch.float16):
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=scale)[0]
        grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, grad, scale=scale)[0]


@dataclass(frozen=True)
class StepTrace:
    peak: int
    """Most bytes live at once during forward + backward, beyond the persistent memory."""
    forward_end: int
    """Live at the end of forward: activations saved for backward + cached autocast weight copies."""
    weight_copies: int
    """Autocast's cached low-precision weight copies (part of both figures above)."""


def _checkpoint_under(emu: CudaAutocastEmulation):
    """diffusers' default checkpointing (non-reentrant), re-entering the emulation on recompute,
    as ``torch.utils.checkpoint`` re-enters autocast when it recomputes a block during backward."""
    def run(module, *args):
        def block(*a):
            if emu.depth:
                return module(*a)
            with emu:
                return module(*a)
        return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=False)
    return run


def trace_unet_step(unet: torch.nn.Module, batch: int, latent_hw: tuple[int, int], precision: Precision,
                    checkpointing: bool, trainable: list[torch.nn.Parameter] | None = None) -> StepTrace:
    """Trace one micro-step of ``unet`` (meta) as components/diffusion/loss.py runs it.

    Gradients are pre-allocated, the steady state under gradient accumulation (they are counted as
    persistent memory), so the trace holds only what a step adds. ``trainable``: the parameters that train
    (an adapter's; the rest of the UNet is frozen and gets no gradient); None: all of them.
    """
    dtype = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16, Precision.FP32: None}[precision]
    emu = CudaAutocastEmulation(dtype)
    for p in (unet.parameters() if trainable is None else trainable):
        p.requires_grad_(True)
        if p.grad is None:
            p.grad = torch.empty_like(p)
    if checkpointing:
        unet.enable_gradient_checkpointing(_checkpoint_under(emu))
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    cfg = unet.config
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim  # SDXL: 1280
    latents = torch.empty(batch, cfg.in_channels, *latent_hw, device="meta")
    added = {"text_embeds": torch.empty(batch, pooled, device="meta"), "time_ids": torch.empty(batch, 6, device="meta")}
    text = torch.empty(batch, TEXT_TOKENS, cfg.cross_attention_dim, device="meta")
    timesteps = torch.zeros(batch, dtype=torch.long, device="meta")
    live = LiveBytes()
    with live:
        with emu:
            pred = unet(latents, timesteps, encoder_hidden_states=text, added_cond_kwargs=added).sample
            loss = F.mse_loss(pred.float(), latents)
        forward_end = live.current
        emu.end_region()  # leaving the autocast region drops the weight-copy cache
        loss.backward()
    return StepTrace(live.peak, forward_end, emu.weight_copy_bytes)


def trace_vae_encode(vae: torch.nn.Module, batch: int, hw: tuple[int, int]) -> int:
    """Peak bytes of ``vae.encode`` in fp32 without gradients (latents encoded on the fly)."""
    live = LiveBytes()
    with torch.no_grad(), live, CudaAutocastEmulation(None):
        vae.encode(torch.empty(batch, 3, *hw, device="meta")).latent_dist.sample()
    return live.peak

"""The optional captioning model: captions for kept images that have no caption, as a Ray Data actor pool.

Where it sits: after the curation tasks and before the write (pipeline.py), so it sees only images that
passed every filter, and it captions the crop that will be trained on (the curated JPEG). Rows whose
``caption_origin`` is ``pending`` get the model's caption (origin ``model``); when the model gives an empty
one, the source's missing-caption policy applies (the ``caption_fallback`` curation recorded: ``empty`` or
the ``filename``; none: the row is dropped as ``no_caption``). Every other row passes through untouched.

The model is any transformers image-to-text model that ``AutoModelForImageTextToText`` and
``AutoProcessor`` load (BLIP, GIT, ...), from the Hub or a local directory, weights from safetensors only
(as every model of the platform). ``tiny`` builds a randomly initialised BLIP offline (a few hundred kB):
its captions are random words, which is all a test needs to follow them through the pipeline. One actor
holds one model, on a GPU where the cluster has one (``curate.captioner.num_gpus``; ``pipeline.captioner_gpus``).
"""

from __future__ import annotations

import io
import shutil
import tempfile
from pathlib import Path

import pyarrow as pa
from PIL import Image

from components.config import CaptionerConfig
from components.curation.filters import Reason
from components.curation.process import PENDING
from components.curation.writer import STAGE_SCHEMA, dropped_row

TINY_WORDS = ("a an the photo of cat dog red blue green sky field tree house car person boat road river "
              "mountain street on in with at near under night day bright dark small large old new").split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]"]


def build_tiny_captioner(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised BLIP captioner (32-wide, 2 layers, 32 px input) with a word-level vocabulary,
    saved with its processor as a transformers model directory. Its generation config suppresses the
    special tokens and asks for at least 3 new tokens, so every caption it makes is a few plain words."""
    # torch and transformers load where the model is built (a captioning actor), not in the driver
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor

    try:
        from transformers import BlipImageProcessorPil as ImageProcessor  # no torchvision needed
    except ImportError:  # pragma: no cover - older transformers
        from transformers import BlipImageProcessor as ImageProcessor

    if (folder / "config.json").is_file() and (folder / "model.safetensors").is_file():
        return folder
    vocab = {w: i for i, w in enumerate(SPECIAL + TINY_WORDS)}
    tokenizer = BertTokenizer(vocab=vocab, bos_token="[DEC]", model_max_length=64)
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, encoder_hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=2, intermediate_size=64, max_position_embeddings=64,
                         bos_token_id=vocab["[DEC]"], eos_token_id=vocab["[SEP]"], sep_token_id=vocab["[SEP]"],
                         pad_token_id=vocab["[PAD]"]),
        vision_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config).eval()
    model.generation_config.min_new_tokens = 3
    model.generation_config.suppress_tokens = [vocab[t] for t in SPECIAL if t != "[SEP]"]
    processor = BlipProcessor(image_processor=ImageProcessor(size={"height": 32, "width": 32}), tokenizer=tokenizer)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))  # actors may build it at once
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    try:
        tmp.rename(folder)  # whole or absent
    except OSError:  # another actor's copy landed first: the same weights (same seed)
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


class CaptionModel:
    """A loaded image-to-text model: PIL images in, captions out (plain Python, no Ray)."""

    def __init__(self, cfg: CaptionerConfig, cache_dir: Path, device: str = "cpu"):
        import torch  # in the actor's process (see build_tiny_captioner)
        from transformers import AutoModelForImageTextToText, AutoProcessor

        name = cfg.model
        if name == "tiny":
            name = str(build_tiny_captioner(Path(cache_dir) / "tiny-captioner"))
        self.cfg = cfg
        self.device = torch.device(device)
        self.processor = AutoProcessor.from_pretrained(name, revision=cfg.revision)
        self.model = AutoModelForImageTextToText.from_pretrained(name, revision=cfg.revision, use_safetensors=True)
        self.model.to(self.device).eval().requires_grad_(False)

    def __call__(self, images: list) -> list[str]:
        import torch  # in the actor's process (see build_tiny_captioner)

        captions: list[str] = []
        for i in range(0, len(images), self.cfg.batch_size):
            chunk = images[i:i + self.cfg.batch_size]
            kwargs = {"images": chunk, "return_tensors": "pt"}
            if self.cfg.prompt:
                kwargs["text"] = [self.cfg.prompt] * len(chunk)
            inputs = self.processor(**kwargs).to(self.device)
            with torch.no_grad():
                out = self.model.generate(**inputs, max_new_tokens=self.cfg.max_new_tokens)
            captions += [" ".join(t.split()) for t in self.processor.batch_decode(out, skip_special_tokens=True)]
        return captions


class CaptionBatch:
    """Ray Data callable class (the captioning actor pool): stage rows in, the same rows out, the pending
    ones captioned. Loads the model once per actor."""

    def __init__(self, captioner: dict, cache_dir: str, device: str):
        self.model = CaptionModel(CaptionerConfig.model_validate(captioner), Path(cache_dir), device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        waiting = [i for i, r in enumerate(rows) if r["reason"] is None and r["caption_origin"] == PENDING]
        if waiting:
            images = [Image.open(io.BytesIO(rows[i]["image"])).convert("RGB") for i in waiting]
            for i, text in zip(waiting, self.model(images), strict=True):
                row, fallback = rows[i], rows[i]["caption_fallback"]
                if text:
                    row.update(caption=text, caption_origin="model")
                elif fallback is not None:
                    row.update(caption=fallback, caption_origin="filename" if fallback else "empty")
                else:
                    rows[i] = dropped_row(row["source"], row["source_name"], str(Reason.NO_CAPTION),
                                          "the captioning model gave an empty caption")
                rows[i]["caption_fallback"] = None
        return pa.Table.from_pylist(rows, schema=STAGE_SCHEMA)

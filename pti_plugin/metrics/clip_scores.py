"""CLIP embeddings from a local CLIP model folder (never downloaded).

``ClipScorer(path)`` loads a transformers ``CLIPModel`` with its processor from ``path`` (a folder
as ``save_pretrained`` writes it, e.g. a local copy of ``openai/clip-vit-large-patch14``) and
gives unit-norm image and text embeddings, whose dot products are the cosine similarities of the
textual-inversion paper's protocol.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class ClipScorer:
    """Unit-norm CLIP image/text embeddings from a local model folder."""

    def __init__(self, path: str | Path, device: str | torch.device | None = None):
        from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

        path = Path(path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"clip_model_path {path}: no CLIP model folder (config.json) there")
        self.path = path
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
        self.image_processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)

    @staticmethod
    def _unit(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @staticmethod
    def _pooled(output) -> torch.Tensor:
        """Projected embeddings from ``get_*_features`` (a tensor, or an output object in newer transformers)."""
        if isinstance(output, torch.Tensor):
            return output
        for name in ("image_embeds", "text_embeds", "pooler_output"):
            value = getattr(output, name, None)
            if value is not None:
                return value
        raise TypeError(f"unexpected CLIP feature output {type(output).__name__}")

    @torch.no_grad()
    def image_embeddings(self, images: list[np.ndarray] | np.ndarray, batch_size: int = 32) -> torch.Tensor:
        """``[n, D]`` unit embeddings of uint8 ``[H, W, 3]`` images (CPU float32)."""
        out = []
        images = list(images)
        for i in range(0, len(images), batch_size):
            inputs = self.image_processor(images=images[i : i + batch_size], return_tensors="pt")
            pixels = inputs["pixel_values"].to(self.device, self.model.dtype)
            out.append(self._unit(self._pooled(self.model.get_image_features(pixel_values=pixels)).float()).cpu())
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, texts: list[str]) -> torch.Tensor:
        """``[n, D]`` unit embeddings of texts (CPU float32)."""
        inputs = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.tokenizer.model_max_length,
                                return_tensors="pt").to(self.device)
        features = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        return self._unit(self._pooled(features).float()).cpu()

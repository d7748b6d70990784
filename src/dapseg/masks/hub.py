"""What the two transformers-based generators (Mask2Former, EoMT) share: building the model and its
image processor from a hub checkpoint (through the weights cache) or from a config (random weights),
and running a panoptic prediction under the reference's fp16 autocast on CUDA."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from dapseg.masks.base import MaskBuild, check_region_map

# the files of a transformers checkpoint: config, image processor, weights (safetensors, else .bin,
# which transformers reads with weights_only)
HUB_FILES = ["config.json", "preprocessor_config.json", "*.safetensors", "*.json"]


class PanopticMasks:
    """image -> the panoptic segment ids of a transformers universal-segmentation model (its own
    post-processing), as the region map."""

    def __init__(self, model: torch.nn.Module, processor: Any, post_process: Callable[..., list[dict]],
                 build: MaskBuild, fp16: bool) -> None:
        self.model = model.eval().to(build.device)
        self.processor = processor
        self.post_process = post_process
        self.device = torch.device(build.device)
        self.fp16 = fp16 and self.device.type == "cuda"

    def __call__(self, image: np.ndarray, *, name: str | None = None) -> Tensor:
        h, w = image.shape[:2]
        inputs = self.processor(Image.fromarray(np.ascontiguousarray(image)), return_tensors="pt").to(self.device)
        amp = torch.autocast("cuda", dtype=torch.float16) if self.fp16 else nullcontext()
        with torch.inference_mode(), amp:
            outputs = self.model(**inputs)
        segmentation = self.post_process(outputs, target_sizes=[(h, w)])[0]["segmentation"]
        return check_region_map(segmentation.cpu().numpy().astype(np.int64), (h, w), "panoptic segmentation")


def checkpoint_folder(repo: str, weights: Path | None, build: MaskBuild) -> Path:
    """A local checkpoint folder (``weights``) or the hub repository's cached snapshot."""
    if weights is not None:
        folder = Path(weights)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"masks.params.weights: {folder} is not a transformers checkpoint folder "
                                    "(no config.json)")
        return folder
    from dapseg.masks.weights import fetch_hub_folder

    folder = fetch_hub_folder(repo, HUB_FILES, build.cache_dir)
    if not any(folder.glob("*.safetensors")):  # older repositories: pytorch_model.bin
        folder = fetch_hub_folder(repo, [*HUB_FILES, "pytorch_model.bin"], build.cache_dir)
    return folder

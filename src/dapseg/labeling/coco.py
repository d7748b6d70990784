"""COCO's stuff-segmentation annotations of a label map: one compressed-RLE annotation per class present.

COCO's data format page says the stuff annotation format is the object detection format with
``iscrowd`` unnecessary and set to 0, and "each category present in an image is encoded with a
single RLE annotation". Category ids are class index + 1 (COCO reserves 0); unlabeled pixels
(``postprocess.UNLABELED``) belong to no annotation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dapseg.postprocess import UNLABELED


def categories(classes: list[str]) -> list[dict[str, Any]]:
    return [{"id": i + 1, "name": name, "supercategory": "class"} for i, name in enumerate(classes)]


def class_annotations(labels: np.ndarray, image_id: int, first_id: int) -> list[dict[str, Any]]:
    """labels (H, W) int class indices with ``UNLABELED`` -> one annotation per class present, ids
    ``first_id``, ``first_id + 1``, ... in class order."""
    from pycocotools import mask as mask_utils

    h, w = labels.shape
    present = [int(c) for c in np.unique(labels) if c != UNLABELED]
    annotations = []
    for k, c in enumerate(present):  # one (H, W, 1) mask at a time: memory stays one image's
        rle = mask_utils.encode(np.asfortranarray((labels == c)[:, :, None].astype(np.uint8)))[0]
        annotations.append({
            "id": first_id + k, "image_id": image_id, "category_id": c + 1,
            "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
            "area": int(mask_utils.area(rle)), "bbox": [float(v) for v in mask_utils.toBbox(rle)], "iscrowd": 0})
    return annotations

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
    present = np.unique(labels)
    present = present[present != UNLABELED]
    if present.size == 0:  # every pixel unlabeled
        return []
    masks = np.asfortranarray((labels[:, :, None] == present[None, None, :]).astype(np.uint8))  # (H, W, K)
    rles = mask_utils.encode(masks)
    areas, boxes = mask_utils.area(rles), mask_utils.toBbox(rles)
    return [
        {"id": first_id + k, "image_id": image_id, "category_id": int(c) + 1,
         "segmentation": {"size": [h, w], "counts": rle["counts"].decode("ascii")},
         "area": int(area), "bbox": [float(v) for v in box], "iscrowd": 0}
        for k, (c, rle, area, box) in enumerate(zip(present, rles, areas, boxes, strict=True))
    ]

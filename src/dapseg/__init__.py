"""dapseg: training-free open-vocabulary semantic segmentation."""

__version__ = "0.1.0"

__all__ = [
    "UNLABELED", "ClassSet", "ImageFailure", "PrebuiltModels", "SegmentationResult", "Segmenter", "__version__",
]


def __getattr__(name: str) -> object:
    # `from dapseg import Segmenter` (the README's one-liner) without importing torch on `import dapseg`.
    if name in ("Segmenter", "SegmentationResult", "PrebuiltModels", "ImageFailure"):
        from dapseg import api

        return getattr(api, name)
    if name == "ClassSet":
        from dapseg.text import ClassSet

        return ClassSet
    if name == "UNLABELED":  # the label of a pixel left unlabeled in SegmentationResult.labels
        from dapseg.postprocess import UNLABELED

        return UNLABELED
    raise AttributeError(f"module 'dapseg' has no attribute {name!r}")

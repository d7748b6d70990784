"""dapseg: training-free open-vocabulary semantic segmentation."""

__version__ = "0.1.0"

__all__ = ["ImageFailure", "PrebuiltModels", "SegmentationResult", "Segmenter", "__version__"]


def __getattr__(name: str) -> object:
    # `from dapseg import Segmenter` (the README's one-liner) without importing torch on `import dapseg`.
    if name in ("Segmenter", "SegmentationResult", "PrebuiltModels", "ImageFailure"):
        from dapseg import api

        return getattr(api, name)
    raise AttributeError(f"module 'dapseg' has no attribute {name!r}")

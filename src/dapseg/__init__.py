"""dapseg: training-free open-vocabulary semantic segmentation."""

__version__ = "0.1.0"

"""DataModules and datasets: clean image classification data, decoded once and cached."""

from raeg_pl.data.cache import DatasetError
from raeg_pl.data.datamodule import ImageClassificationDataModule

__all__ = ["DatasetError", "ImageClassificationDataModule"]

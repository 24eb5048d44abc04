"""Data: sources, the defender/attacker splits and batched augmentation."""

from antidoor.data.augment import Augment
from antidoor.data.dataset import ImageData
from antidoor.data.sources import dataset_names, load_dataset, load_npz
from antidoor.data.splits import Splits, make_splits, stratified_subset

__all__ = ["Augment", "ImageData", "Splits", "dataset_names", "load_dataset", "load_npz", "make_splits", "stratified_subset"]

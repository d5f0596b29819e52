"""Data: one ``DistillDataModule`` for every method, in-memory sources, few-data subsets, and
unlabelled transfer examples (label ``UNLABELLED`` = -1 in the training batches)."""

from kd_lightning.data.datamodule import DATASET_INFO, DistillDataModule
from kd_lightning.data.dataset import (AUGMENTATIONS, NORMALIZATIONS, IndexedTensorDataset,
                                       random_crop_flip, random_translate)
from kd_lightning.data.sources import SOURCES, Splits, load_source
from kd_lightning.data.subset import (stratified_subset, stratified_subset_per_class, train_val_split,
                                      unlabelled_subset)
from kd_lightning.losses.labels import UNLABELLED

__all__ = ["AUGMENTATIONS", "DATASET_INFO", "NORMALIZATIONS", "DistillDataModule",
           "IndexedTensorDataset", "SOURCES", "Splits", "UNLABELLED", "load_source", "random_crop_flip", "random_translate", "stratified_subset", "stratified_subset_per_class", "train_val_split", "unlabelled_subset"]

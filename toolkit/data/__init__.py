"""Datasets (Fashion-MNIST, CIFAR-10, synthetic) as uint8 arrays, and federated partitions."""

from toolkit.data.cifar10 import load_cifar10
from toolkit.data.dataset import ArrayDataset, DataError, DatasetSplits, load_dataset
from toolkit.data.idx import FASHION_MNIST_DIR, load_fashion_mnist
from toolkit.data.partition import (
    label_distribution,
    partition,
    partition_dirichlet,
    partition_iid,
    partition_shards,
    personalized_test_indices,
)
from toolkit.data.synthetic import load_synthetic

__all__ = [
    "FASHION_MNIST_DIR",
    "ArrayDataset",
    "DataError",
    "DatasetSplits",
    "label_distribution",
    "load_cifar10",
    "load_dataset",
    "load_fashion_mnist",
    "load_synthetic",
    "partition",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
    "personalized_test_indices",
]

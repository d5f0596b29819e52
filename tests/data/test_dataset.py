"""In-memory datasets: the whole-batch path equals the per-sample loader, also under DDP sharding."""

import torch

from kd_lightning.data import DistillDataModule, IndexedTensorDataset


def test_batched_path_yields_same_examples_as_per_sample_loader():
    batches = {}
    for batched in (True, False):
        dm = DistillDataModule("digits", batch_size=50, train_subset=200, batched=batched)
        dm.setup("fit")
        torch.manual_seed(11)
        batches[batched] = [b for b in dm.train_dataloader()]
    assert len(batches[True]) == len(batches[False]) == 4
    for (xa, ya, ia), (xb, yb, ib) in zip(batches[True], batches[False]):
        assert torch.equal(ia, ib) and torch.equal(ya, yb) and torch.allclose(xa, xb)


def test_dataset_index_refers_to_source_rows():
    x = torch.arange(10, dtype=torch.float32).view(10, 1)
    ds = IndexedTensorDataset(x, torch.arange(10), indices=[7, 2, 5])
    xb, yb, ib = ds.__getitems__([0, 2])
    assert ib.tolist() == [7, 5] and xb[:, 0].tolist() == [7.0, 5.0] and yb.tolist() == [7, 5]


def test_batched_path_shards_like_the_regular_loader_under_ddp():
    """Lightning swaps in a DistributedSampler; both paths must give each rank the same examples."""
    from torch.utils.data import DataLoader, DistributedSampler

    from kd_lightning.data.dataset import PerSampleDataset, batch_collate

    dm = DistillDataModule("digits", batch_size=32, train_subset=300)
    dm.setup("fit")
    for rank in (0, 1):
        seen = {}
        for batched in (True, False):
            sampler = DistributedSampler(dm.train_dataset, num_replicas=2, rank=rank, shuffle=True, seed=4)
            sampler.set_epoch(3)
            ds = dm.train_dataset if batched else PerSampleDataset(dm.train_dataset)
            loader = DataLoader(ds, batch_size=32, sampler=sampler,
                                collate_fn=batch_collate if batched else None)
            seen[batched] = torch.cat([b[2] for b in loader]).tolist()
        assert seen[True] == seen[False] and len(seen[True]) == 150

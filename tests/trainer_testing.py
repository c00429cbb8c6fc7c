"""Tiny local models and data for the Trainer tests (no Hub, CPU, a few ms per step)."""

from __future__ import annotations

import gc

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

@pytest.fixture
def fast_cpu():
    """One intra-op thread (the CI box has 2 shared cores; tiny ops only lose to threading overhead) and
    the objects alive before the test frozen out of the garbage collector (accelerate runs gc.collect()
    at the end of every train(), which otherwise costs ~0.6 s in a process that imported transformers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)


IMAGE = 8
NUM_LABELS = 3


def tiny_vit(seed: int = 0, dropout: float = 0.0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(
        image_size=IMAGE, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, num_labels=NUM_LABELS,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(cfg)


class TinyImages(torch.utils.data.Dataset):
    """``n`` random 3x8x8 images with labels from a fixed rule, built in memory."""

    def __init__(self, n: int = 32, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 3, IMAGE, IMAGE, generator=g)
        self.y = (self.x.mean(dim=(1, 2, 3)) > 0).long() + (self.x[:, 0].mean(dim=(1, 2)) > 0.2).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def base_args(output_dir, **overrides) -> dict:
    kw = dict(
        output_dir=str(output_dir), use_cpu=True, report_to="none", dataloader_num_workers=0, seed=0,
        data_seed=0, per_device_train_batch_size=8, per_device_eval_batch_size=8, learning_rate=1e-2,
        weight_decay=0.05, max_steps=3, logging_steps=1, save_strategy="no", disable_tqdm=True,
    )
    kw.update(overrides)
    return kw

"""The convergence benchmark's tasks: data nobody in this project wrote, models built from configs.

* ``vit_digits``: a small ViT (``transformers.ViTForImageClassification``, random init) trained from scratch
  on scikit-learn's 8x8 handwritten digits (1797 real images, shipped with scikit-learn); held-out metric:
  accuracy on a fixed stratified 20 % split.
* ``gpt2_stdlib``: a tiny GPT-2 (``transformers.GPT2LMHeadModel``) trained on the Python standard library's
  own source files, with a byte-level BPE tokenizer trained locally on those files (``tokenizers``);
  held-out metric: perplexity on other standard-library files.
"""

from __future__ import annotations

import math
import sysconfig
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------- data
class DictDataset(torch.utils.data.Dataset):
    def __init__(self, **tensors):
        self.tensors = tensors
        self.n = len(next(iter(tensors.values())))

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.tensors.items()}


@lru_cache(maxsize=None)
def digits_data():
    """scikit-learn's digits (offline), fixed stratified 80/20 split, standardised with train statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = d.images.astype(np.float32) / 16.0
    y = d.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    mean, std = xtr.mean(), xtr.std()
    to_t = lambda a: torch.from_numpy((a - mean) / std).unsqueeze(1)  # noqa: E731  (N, 1, 8, 8)
    train = DictDataset(pixel_values=to_t(xtr), labels=torch.from_numpy(ytr))
    test = DictDataset(pixel_values=to_t(xte), labels=torch.from_numpy(yte))
    return train, test


STDLIB_TRAIN_FILES = (
    "argparse.py", "ast.py", "calendar.py", "configparser.py", "csv.py", "dataclasses.py",
    "difflib.py", "enum.py", "fractions.py", "functools.py", "heapq.py", "ipaddress.py",
)
STDLIB_HELDOUT_FILES = ("textwrap.py", "shlex.py", "string.py", "pprint.py")
LM_VOCAB = 512
LM_BLOCK = 64
LM_MAX_HELDOUT_BLOCKS = 128


@lru_cache(maxsize=None)
def stdlib_lm_data():
    """Blocks of token ids from the standard library's sources, byte-level BPE trained on the train files."""
    from tokenizers import ByteLevelBPETokenizer

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    read = lambda names: [(stdlib / n).read_text(encoding="utf-8") for n in names]  # noqa: E731
    train_texts, heldout_texts = read(STDLIB_TRAIN_FILES), read(STDLIB_HELDOUT_FILES)
    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(train_texts, vocab_size=LM_VOCAB, min_frequency=2, show_progress=False)

    def blocks(texts, limit=None):
        ids = [i for t in texts for i in tok.encode(t).ids]
        n = len(ids) // LM_BLOCK
        if limit is not None:
            n = min(n, limit)
        return torch.tensor(ids[: n * LM_BLOCK], dtype=torch.long).view(n, LM_BLOCK)

    tr, he = blocks(train_texts), blocks(heldout_texts, LM_MAX_HELDOUT_BLOCKS)
    return DictDataset(input_ids=tr, labels=tr), DictDataset(input_ids=he, labels=he)


# --------------------------------------------------------------------------------------------- models
def build_vit():
    from transformers import ViTConfig, ViTForImageClassification

    cfg = ViTConfig(
        image_size=8, patch_size=4, num_channels=1, hidden_size=64, num_hidden_layers=2,
        num_attention_heads=4, intermediate_size=128, num_labels=10,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return ViTForImageClassification(cfg)


def build_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        vocab_size=LM_VOCAB, n_positions=LM_BLOCK, n_embd=32, n_layer=1, n_head=4,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


@torch.no_grad()
def eval_accuracy(model, ds) -> float:
    model.eval()
    t = ds.tensors
    logits = model(pixel_values=t["pixel_values"]).logits
    return float((logits.argmax(-1) == t["labels"]).float().mean())


@torch.no_grad()
def eval_perplexity(model, ds) -> float:
    model.eval()
    ids = ds.tensors["input_ids"]
    losses = [float(model(input_ids=ids[i:i + 32], labels=ids[i:i + 32]).loss) for i in range(0, len(ids), 32)]
    loss = sum(losses) / len(losses)  # equal-sized chunks except the last; close enough and identical for all runs
    return math.exp(loss) if loss < 50 else float("inf")


@dataclass(frozen=True)
class Task:
    name: str
    data: Callable
    model: Callable
    evaluate: Callable
    metric: str
    higher_is_better: bool
    steps: int
    batch_size: int


TASKS: Dict[str, Task] = {
    t.name: t
    for t in (
        Task("vit_digits", digits_data, build_vit, eval_accuracy, "accuracy", True, steps=120, batch_size=32),
        Task("gpt2_stdlib", stdlib_lm_data, build_gpt2, eval_perplexity, "perplexity", False, steps=120, batch_size=16),
    )
}


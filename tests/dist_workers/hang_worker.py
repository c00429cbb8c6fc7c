"""Rank 1 hangs (never reaches the barrier); rank 0's gloo process group has a 5 s timeout, so rank 0
fails, and torchrun then stops rank 1: the launch ends with an error instead of hanging."""

import time
from datetime import timedelta

import torch.distributed as dist

dist.init_process_group("gloo", timeout=timedelta(seconds=5))
if dist.get_rank() == 1:
    time.sleep(600)
dist.barrier()

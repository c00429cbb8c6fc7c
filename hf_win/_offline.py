"""Environment defaults for running without the Hugging Face Hub (tests, benchmarks): set before
``transformers`` / ``datasets`` are imported. ``setdefault``: a value already set wins."""

from __future__ import annotations

import os
from typing import MutableMapping, Optional

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "WANDB_DISABLED": "true",
    "TOKENIZERS_PARALLELISM": "false",
}


def use_offline_defaults(env: Optional[MutableMapping[str, str]] = None) -> None:
    """Set every ``OFFLINE_ENV`` variable not already set in ``env`` (default: ``os.environ``)."""
    env = os.environ if env is None else env
    for key, value in OFFLINE_ENV.items():
        env.setdefault(key, value)

"""TEST-ONLY launcher: ``python fsdp_on_cpu.py SCRIPT ARGS...`` runs SCRIPT as ``__main__`` with Accelerate's
FSDP path allowed on CPU processes (``trainer_worker.allow_fsdp_on_cpu``, documented there), so that an
``accelerate launch --config_file configs/accelerate/fsdp2.yaml`` of an example script shards on the CPU
processes of the tests as it does on GPUs. Nothing else is changed."""

import runpy
import sys

from trainer_worker import allow_fsdp_on_cpu

if __name__ == "__main__":
    allow_fsdp_on_cpu()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")

"""Run a training script under accelerate's FSDP plugin in CPU processes (gloo).

accelerate turns FSDP on only for accelerator devices: on a CPU-only machine a launch with an FSDP
config silently runs plain processes. This shim, launched in the script's place, lets accelerate set up
its CPU process group and then tells its state FSDP (the plugin accelerate built from the config), so
everything else — auto-wrap, ``fully_shard``/``FullyShardedDataParallel``, gathering for saving — is
accelerate's own code path on the script's own code path:

    ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/fsdp2.yaml \\
        tests/accelerate_fsdp_cpu.py train_scripts/train_lm_boft.py ...

Each process writes ``$BOFTVISION_FSDP_REPORT.<rank>`` (when set): the distributed type and the wrapped
model classes accelerate prepared, so a test can check that the run was sharded.
"""
import os
import runpy
import sys

import accelerate
import accelerate.state as state
import torch
from accelerate.utils import DistributedType

original_init = state.AcceleratorState.__init__


def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # later states copy it
        # accelerate names the CPU of process i "cpu:i"; FSDP1 wants its device_id to equal the module's "cpu"
        self.device = state.PartialState._shared_state["device"] = torch.device("cpu")


original_prepare = accelerate.Accelerator.prepare


def reporting_prepare(self, *args, **kwargs):
    prepared = original_prepare(self, *args, **kwargs)
    report = os.environ.get("BOFTVISION_FSDP_REPORT")
    if report:
        modules = [m for m in (prepared if isinstance(prepared, (tuple, list)) else [prepared])
                   if hasattr(m, "modules")]
        names = sorted({type(sub).__name__ for m in modules for sub in m.modules()})
        with open(f"{report}.{self.process_index}", "a") as f:
            f.write(f"{self.distributed_type} fsdp_version={getattr(self.state.fsdp_plugin, 'fsdp_version', None)} "
                    f"processes={self.num_processes} modules={','.join(names)}\n")
    return prepared


state.AcceleratorState.__init__ = fsdp_on_cpu
accelerate.Accelerator.prepare = reporting_prepare
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")

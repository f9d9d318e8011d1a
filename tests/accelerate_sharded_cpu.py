"""Run a training script under accelerate's FSDP or DeepSpeed plugin in CPU processes (gloo).

accelerate turns FSDP and DeepSpeed on only for accelerator devices: on a CPU-only machine a launch with
an FSDP config silently runs plain processes, and one with a DeepSpeed config runs processes that each
believe they are alone (one process, rank 0). This shim, launched in the script's place, lets accelerate
set up its CPU process group and then tells its state FSDP or DeepSpeed, with the plugin accelerate built
from the config — so everything else (auto-wrap, ``fully_shard``/``FullyShardedDataParallel``,
``deepspeed.initialize`` with the config's ZeRO stage, gathering for saving) is accelerate's own code path
on the script's own code path:

    ACCELERATE_USE_CPU=true accelerate launch --config_file configs/accelerate/fsdp2.yaml \\
        tests/accelerate_sharded_cpu.py train_scripts/train_lm_boft.py ...

Each process writes ``$BOFTVISION_ENGINE_REPORT.<rank>`` (when set): the distributed type and the wrapped
model classes accelerate prepared, so a test can check that the run was sharded. With
``$BOFTVISION_NAN_LOSS_AT=<k>``, process 0's k-th call of ``torch.nn.functional.cross_entropy`` (the
scripts' and transformers' losses) returns NaN, the other processes' stay finite.
"""
import os
import runpy
import sys

import accelerate
import accelerate.state as state
import torch
from accelerate.utils import DistributedType

original_init = state.AcceleratorState.__init__


def engine_on_cpu(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
    original_init(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
    elif deepspeed_plugin is not None:  # what accelerate's state does for DeepSpeed on an accelerator
        self.distributed_type = DistributedType.DEEPSPEED
        deepspeed_plugin.set_mixed_precision(self._mixed_precision)
        deepspeed_plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = deepspeed_plugin
    else:
        return
    state.PartialState._shared_state["distributed_type"] = self.distributed_type  # later states copy it
    # accelerate names the CPU of process i "cpu:i"; FSDP1 wants its device_id to equal the module's "cpu"
    self.device = state.PartialState._shared_state["device"] = torch.device("cpu")


original_prepare = accelerate.Accelerator.prepare


def reporting_prepare(self, *args, **kwargs):
    prepared = original_prepare(self, *args, **kwargs)
    report = os.environ.get("BOFTVISION_ENGINE_REPORT")
    if report:
        modules = [m for m in (prepared if isinstance(prepared, (tuple, list)) else [prepared])
                   if hasattr(m, "modules")]
        names = sorted({type(sub).__name__ for m in modules for sub in m.modules()})
        plugin = self.state.fsdp_plugin if self.distributed_type == DistributedType.FSDP else None
        stage = self.state.deepspeed_plugin.zero_stage if self.distributed_type == DistributedType.DEEPSPEED else None
        with open(f"{report}.{self.process_index}", "a") as f:
            f.write(f"{self.distributed_type} fsdp_version={getattr(plugin, 'fsdp_version', None)} "
                    f"processes={self.num_processes} zero_stage={stage} modules={','.join(names)}\n")
    return prepared


def nan_on_process_0(call: int):
    """``F.cross_entropy`` whose ``call``-th result on process 0 is NaN."""
    original, calls = torch.nn.functional.cross_entropy, []

    def cross_entropy(*args, **kwargs):
        loss = original(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == call and os.environ.get("RANK") == "0" else loss

    return cross_entropy


if os.environ.get("BOFTVISION_NAN_LOSS_AT"):
    torch.nn.functional.cross_entropy = nan_on_process_0(int(os.environ["BOFTVISION_NAN_LOSS_AT"]))
state.AcceleratorState.__init__ = engine_on_cpu
accelerate.Accelerator.prepare = reporting_prepare
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
runpy.run_path(script, run_name="__main__")

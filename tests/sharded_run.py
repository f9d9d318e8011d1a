"""Train every adapter for a few steps on a tiny Llama and a tiny UNet (and LoRA and BOFT on a tiny GPT-2,
whose Conv1D layers ``zero3init`` builds partitioned), wrapped the way users wrap them — FSDP2
(``fully_shard`` per block, then the model), FSDP1 (blocks auto-wrapped, ``use_orig_params=True``),
DeepSpeed ZeRO-2 / ZeRO-3 (``deepspeed.initialize``; ZeRO-3 partitions every parameter, small ones
included; ``zero3init`` builds the model partitioned, under ``zero.Init``) or DDP — over gloo, or in one
process (``single``); save each adapter.

    python tests/sharded_run.py --kinds fsdp2 fsdp1 ddp zero2 zero3 zero3init --out DIR [--port 29500]   # 2 processes
    python tests/sharded_run.py --kinds single --out DIR

Writes ``DIR/<kind>/<model>-<method>/`` (the adapter) and ``DIR/<kind>/losses.json``. Used by
tests/test_sharding.py, which compares every sharded run with the single-process one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import boftvision as bv

CONFIGS = {  # dropout off: runs are compared step by step
    "lora": bv.LoRAConfig(r=4, init_weights=False),
    "vblora": bv.VBLoRAConfig(r=2, vector_length=8, num_vectors=16, init_logits_std=1.0),
    "oft": bv.OFTConfig(block_size=8, use_cayley_neumann=False, init_weights=False),
    "boft": bv.BOFTConfig(block_size=4, n_butterfly_factor=2, init_weights=False),
}
STEPS, BATCH = 3, 4


def build_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(config), ["q_proj", "v_proj", "down_proj"]


def build_gpt2():
    """GPT-2 keeps its projections in transformers' Conv1D (weight stored transposed): trained under ``single``
    and ``zero3init`` only, where a partitioned Conv1D's shape comes from ``ds_shape``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # dropout off, as in CONFIGS
    return GPT2LMHeadModel(config), ["c_attn", "mlp.c_proj"]


def build_unet():
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                                norm_num_groups=16, cross_attention_dim=32, attention_head_dim=8)
    return unet, ["to_q", "to_k", "to_v", "to_out.0"]


MODELS = {"llama": build_llama, "unet": build_unet, "gpt2": build_gpt2}


def runs_of(kind: str) -> list[tuple[str, str]]:
    """(model, method) pairs trained under ``kind``."""
    pairs = [(model, method) for model in ("llama", "unet") for method in CONFIGS]
    return pairs + [("gpt2", method) for method in ("lora", "boft") if kind in ("single", "zero3init")]


def blocks(model) -> list[torch.nn.Module]:
    """The units users shard: decoder layers, UNet down/mid/up blocks."""
    if hasattr(model, "down_blocks"):
        return [*model.down_blocks, model.mid_block, *model.up_blocks]
    return list(model.model.layers)


def batch():
    g = torch.Generator().manual_seed(1)
    return {"ids": torch.randint(0, 64, (BATCH, 8), generator=g), "latents": torch.randn(BATCH, 4, 8, 8, generator=g),
            "context": torch.randn(BATCH, 6, 32, generator=g), "noise": torch.randn(BATCH, 4, 8, 8, generator=g)}


def loss_of(model_name: str, model, data, rows):
    if model_name == "unet":
        t = torch.full((rows.stop - rows.start,), 10)
        out = model(data["latents"][rows], t, encoder_hidden_states=data["context"][rows]).sample
        return torch.nn.functional.mse_loss(out, data["noise"][rows])
    ids = data["ids"][rows]
    return model(input_ids=ids, labels=ids).loss


def wrap(model, kind: str):
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in blocks(model):
            fully_shard(block)
        return fully_shard(model)
    if kind == "fsdp1":
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        from torch.distributed.fsdp.wrap import ModuleWrapPolicy

        policy = ModuleWrapPolicy({type(b) for b in blocks(model)})
        return FSDP(model, auto_wrap_policy=policy, use_orig_params=True, device_id=torch.device("cpu"))
    if kind == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    return model


def with_optimizer(model, kind: str, optimizer_class, lr: float, world: int = 1):
    """``(model, optimizer)`` for training: DeepSpeed (``zero2``/``zero3``) wraps both in its engine, which
    then runs the backward and the step (gradients averaged over processes, as DDP does)."""
    if not kind.startswith("zero"):
        return model, optimizer_class(trainable(model), lr=lr)
    import deepspeed

    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer_class(trainable(model), lr=lr),
                                                   config=deepspeed_config(kind, world))
    return engine, optimizer


def deepspeed_config(kind: str, world: int) -> dict:
    """ZeRO-2, or ZeRO-3 partitioning every parameter (small ones too: none is kept whole)."""
    return {"train_micro_batch_size_per_gpu": BATCH // world, "gradient_accumulation_steps": 1,
            "zero_allow_untested_optimizer": True,
            "zero_optimization": {"stage": 2 if kind == "zero2" else 3, "stage3_param_persistence_threshold": 0}}


def rows_of(rank: int, world: int) -> slice:
    """This process's share of the global batch."""
    share = BATCH // world
    return slice(rank * share, (rank + 1) * share)


def adapted(model_name: str, method: str, kind: str):
    """A freshly built model (same seed every time) with the method's adapter, wrapped for ``kind``."""
    torch.manual_seed(0)
    build = MODELS[model_name]
    model, targets = build()
    if kind == "zero3init":
        model = built_partitioned(model, build)
    bv.add_adapter(model, dataclasses.replace(CONFIGS[method], target_modules=targets))
    return wrap(model, kind)


def built_partitioned(model, build):
    """The model built again under ``deepspeed.zero.Init`` (partitioned as it is built, as transformers'
    ``from_pretrained`` does under accelerate's ZeRO-3), its weights loaded into the partitions; the RNG
    left where building ``model`` left it, so the adapters added next start the same."""
    import deepspeed
    import torch._dynamo  # noqa: F401 - imported inside zero.Init (which patches Tensor.__new__) it fails
    from transformers import GPT2LMHeadModel, LlamaForCausalLM  # noqa: F401 - likewise (transformers' lazy import)

    rng, state = torch.get_rng_state(), {**dict(model.named_parameters()), **dict(model.named_buffers())}
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config("zero3init", dist.get_world_size())):
        partitioned, _ = build()
    with torch.no_grad():
        for name, tensor in [*partitioned.named_parameters(), *partitioned.named_buffers()]:
            with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0, enabled=hasattr(tensor, "ds_id")):
                tensor.copy_(state[name])
    torch.set_rng_state(rng)
    return partitioned


def train_step(model_name: str, model, optimizer, data, rows: slice, world: int) -> float:
    """One optimizer step on this process's rows; the loss averaged over processes."""
    loss = loss_of(model_name, model, data, rows)
    if type(model).__name__ == "DeepSpeedEngine":
        model.backward(loss)
        model.step()
    else:
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    mean = loss.detach().clone()
    if world > 1:
        dist.all_reduce(mean)
        mean /= world
    return mean.item()


def trainable(model) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def train(kind: str, out: Path, rank: int = 0, world: int = 1) -> dict:
    losses = {}
    data, rows = batch(), rows_of(rank, world)
    for model_name, method in runs_of(kind):
        model, optimizer = with_optimizer(adapted(model_name, method, kind), kind, torch.optim.SGD, 0.5, world)
        losses[f"{model_name}-{method}"] = [train_step(model_name, model, optimizer, data, rows, world)
                                            for _ in range(STEPS)]
        bv.save_adapter(model, out / kind / f"{model_name}-{method}")  # every process calls it
    if rank == 0:
        (out / kind / "losses.json").write_text(json.dumps(losses))
    return losses


def adam_llama(method: str, kind: str, world: int = 1):
    """A fresh Llama with ``method``'s adapter, wrapped for ``kind``, and Adam (the resume checks' run)."""
    return with_optimizer(adapted("llama", method, kind), kind, torch.optim.Adam, 1e-2, world)


def resume_check(kind: str, out: Path, rank: int = 0, world: int = 1) -> None:
    """Adam on BOFT and VB-LoRA (Llama): 4 steps straight, against 2 steps, a training checkpoint, a fresh
    model and optimizer that load it, and steps 3 and 4 (step 4's loss shows step 3's update, which reads
    the restored Adam moments). Writes ``DIR/<kind>/resume.json``."""
    from boftvision.training import load_checkpoint, save_checkpoint

    data, rows = batch(), rows_of(rank, world)
    result = {}
    for method in ("boft", "vblora"):
        def fresh():
            return adam_llama(method, kind, world)

        def step(model, optimizer):
            return train_step("llama", model, optimizer, data, rows, world)

        model, optimizer = fresh()
        straight = [step(model, optimizer) for _ in range(4)]
        model, optimizer = fresh()
        for _ in range(2):
            step(model, optimizer)
        checkpoint = save_checkpoint(out / kind / f"run-{method}", model, optimizer, None, 2)
        model, optimizer = fresh()
        load_checkpoint(checkpoint, model, optimizer, None)
        result[method] = {"straight": straight, "resumed": [step(model, optimizer) for _ in range(2)]}
    if rank == 0:
        (out / kind / "resume.json").write_text(json.dumps(result))


def resume_elsewhere(kind: str, out: Path, wrap_as: str) -> tuple[list[float], list[str]]:
    """Steps 3 and 4 of :func:`resume_check`'s BOFT run in this one process, the model plain (``single``) or
    wrapped as ``wrap_as`` over a one-process group the caller started, resumed from the two-process
    ``kind`` run's checkpoint — or, with ``kind="single"``, from one this process writes after its own 2
    plain steps. Returns the losses and what ``load_checkpoint`` said."""
    from boftvision.training import load_checkpoint, save_checkpoint

    data, said = batch(), []

    def step(model, optimizer):
        return train_step("llama", model, optimizer, data, rows_of(0, 1), 1)

    checkpoint = out / kind / "run-boft" / "checkpoint-2"
    if kind == "single":
        model, optimizer = adam_llama("boft", "single")
        for _ in range(2):
            step(model, optimizer)
        checkpoint = save_checkpoint(out / "single" / "run-boft", model, optimizer, None, 2)
    model, optimizer = adam_llama("boft", wrap_as)
    load_checkpoint(checkpoint, model, optimizer, None, say=said.append)
    return [step(model, optimizer) for _ in range(2)], said


def bf16_check(kind: str, out: Path, rank: int = 0, world: int = 1) -> None:
    """DeepSpeed with bf16 (the module cast to bf16, fp32 weights in its optimizer): LoRA on the Llama, two
    steps, saved. Writes ``DIR/<kind>/bf16.json``: the module's dtype, the saved dtypes, the largest
    difference between the saved tensors and the optimizer's fp32 weights, and the error ``add_adapter``
    gives on the DeepSpeed engine."""
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param
    from safetensors.torch import load_file

    config = {**deepspeed_config(kind, world), "bf16": {"enabled": True}}
    model = adapted("llama", "lora", kind)
    engine, _, _, _ = deepspeed.initialize(model=model, config=config,
                                           optimizer=torch.optim.AdamW(trainable(model), lr=1e-2))
    data, rows = batch(), rows_of(rank, world)
    for _ in range(2):
        engine.backward(engine(input_ids=data["ids"][rows], labels=data["ids"][rows]).loss)
        engine.step()
    try:
        bv.add_adapter(engine, bv.LoRAConfig(r=2, target_modules=["k_proj"]))
        refused = None
    except ValueError as err:
        refused = str(err)
    folder = out / kind / "bf16-lora"
    bv.save_adapter(engine, folder)
    masters = {"base_model.model." + n.replace(".adapters.default", ""): safe_get_full_fp32_param(p)
               for n, p in engine.module.named_parameters() if p.requires_grad}  # (collective)
    dist.barrier()
    if rank == 0:
        saved = load_file(str(folder / "adapter_model.safetensors"))
        assert saved.keys() == masters.keys(), sorted(saved)[:2]
        diff = max(float((saved[k] - masters[k]).abs().max()) for k in saved)
        (out / kind / "bf16.json").write_text(json.dumps({
            "module": str(next(p for p in engine.module.parameters() if p.requires_grad).dtype),
            "saved": sorted({str(t.dtype) for t in saved.values()}), "difference": diff, "refused": refused}))


def worker(rank: int, world: int, kinds: list[str], out: Path, port: int) -> None:
    import warnings

    warnings.filterwarnings("ignore")  # FSDP1 lists every frozen parameter next to trainable ones
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world))  # DeepSpeed reads these
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for kind in kinds:
            train(kind, out, rank, world)
            if kind not in ("ddp", "zero3init"):  # (zero3init's optimizer is zero3's)
                resume_check(kind, out, rank, world)
            if kind in ("zero2", "zero3"):
                bf16_check(kind, out, rank, world)
        dist.barrier()  # both processes done before either tears the group down
    finally:
        dist.destroy_process_group()
    # then leave without C++'s static destructors: a process of this two-process DeepSpeed + gloo run once
    # aborted in its teardown ("terminate called without an active exception") after all was written
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--kinds", nargs="+", required=True,
                   choices=["single", "fsdp2", "fsdp1", "ddp", "zero2", "zero3", "zero3init"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--port", type=int, default=29517)
    args = p.parse_args()
    if args.kinds == ["single"]:
        train("single", args.out)
    else:
        torch.multiprocessing.spawn(worker, args=(2, args.kinds, args.out, args.port), nprocs=2)


if __name__ == "__main__":
    main()

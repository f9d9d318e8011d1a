"""Plumbing the training scripts share, by concern: ``arguments`` (flags), ``checkpoints`` (resumable,
weights-only, written whole; output folders that never mix runs), ``loop`` (optimizer, trackers, the
step loop, resumable epochs, signals and divergence)."""
from .arguments import (
    FLAG_HELP,
    LYCORIS_FILE,
    SINGLE_FILE,
    TRACKER_PACKAGES,
    adapter_config_from_args,
    add_adapter_arguments,
    add_diffusers_training_arguments,
    add_export_arguments,
    add_report_to_argument,
    check_requirements,
    describe_flags,
    diffusers_step_counts,
    run_cli,
)
from .checkpoints import (
    SAFE_TO_CHANGE,
    SECRETS,
    TrainingDiverged,
    check_resume_settings,
    checkpoint_problem,
    claim_output_dir,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    run_settings,
    save_checkpoint,
)
from .loop import (
    EpochBatches,
    StopSignals,
    accelerator_from_args,
    cosine_with_warmup,
    exit_for_signal,
    make_optimizer,
    prepare_epochs,
    push_to_hub,
    save_loss_plot,
    seed_everything,
    start_trackers,
    stop_if_diverged,
    tracked_accelerator,
    train_steps,
)

__all__ = [
    "FLAG_HELP", "LYCORIS_FILE", "SINGLE_FILE", "TRACKER_PACKAGES", "adapter_config_from_args",
    "add_adapter_arguments", "add_export_arguments",
    "add_diffusers_training_arguments", "add_report_to_argument", "check_requirements", "describe_flags",
    "diffusers_step_counts", "run_cli", "SAFE_TO_CHANGE", "SECRETS", "TrainingDiverged", "check_resume_settings",
    "checkpoint_problem", "claim_output_dir", "list_checkpoints", "load_checkpoint", "resolve_checkpoint",
    "run_settings", "save_checkpoint", "EpochBatches", "StopSignals", "accelerator_from_args", "cosine_with_warmup",
    "exit_for_signal", "make_optimizer", "prepare_epochs", "push_to_hub", "save_loss_plot", "seed_everything",
    "start_trackers", "stop_if_diverged", "tracked_accelerator", "train_steps",
]

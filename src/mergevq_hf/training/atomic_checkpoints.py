"""Atomic Trainer checkpoints: a run killed at any moment never leaves a half-written ``checkpoint-N``.

transformers 5.24's ``Trainer._save_checkpoint`` writes every file straight into ``<output_dir>/checkpoint-N``. A
SIGKILL in the middle leaves a folder that ``get_last_checkpoint`` (``--resume_from_checkpoint last``) picks up and
then cannot load. :class:`AtomicCheckpointMixin` lets the Trainer write into ``<output_dir>/_staging/checkpoint-N``
and, once every process has written its files, renames the finished folder to ``<output_dir>/checkpoint-N`` with a
single ``os.replace`` (atomic on POSIX file systems). Every ``checkpoint-N`` is therefore complete, and resuming from
"the last checkpoint" only ever sees complete ones. The staging folder starts with ``_``, so ``Trainer.push_to_hub``
does not upload it; a stale one left by a killed save is cleared by the next save of the same step.

The rename protects against the process dying, not against power loss (files are not fsynced). A save that fails
(a full disk, most often) is re-raised by :func:`clear_write_errors` as an ``OSError`` naming the folder, and its
staged folder is removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil

from transformers import set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, enable_full_determinism, get_last_checkpoint, rotate_checkpoints

__all__ = [
    "STAGING_DIRNAME",
    "AtomicCheckpointMixin",
    "clear_write_errors",
    "finished_run_message",
    "last_complete_checkpoint",
    "resolve_resume_checkpoint",
    "end_run",
    "start_run",
]

STAGING_DIRNAME = "_staging"


def last_complete_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """Newest ``checkpoint-N`` folder of ``output_dir`` (``None`` when there is none or the folder is missing).

    With :class:`AtomicCheckpointMixin` every such folder is complete; unfinished saves live under ``_staging``.
    """
    return get_last_checkpoint(str(output_dir)) if os.path.isdir(output_dir) else None


def resolve_resume_checkpoint(value: str | None, output_dir: str | os.PathLike) -> str | None:
    """``--resume_from_checkpoint`` of the example scripts: ``None`` (start fresh), ``"last"`` (the newest complete
    checkpoint of ``output_dir``, or a fresh start when there is none, so a restarted job "just continues"), or the
    path of a checkpoint folder."""
    if value is None or value == "":
        return None
    if value.lower() in ("last", "true"):
        return last_complete_checkpoint(output_dir)
    if not os.path.isfile(os.path.join(value, "trainer_state.json")):
        raise ValueError(f"--resume_from_checkpoint {value!r} is not a checkpoint folder (no trainer_state.json); pass a checkpoint-N folder or 'last'")
    return value


def finished_run_message(checkpoint: str, args) -> str | None:
    """Why resuming from ``checkpoint`` has nothing to do: it already reached the last step that ``args``
    (``TrainingArguments``) ask for, and the run's export is in ``args.output_dir`` (its ``train_results.json``,
    written after the model). ``None`` when there are steps left or the export is missing.

    The Trainer would otherwise train one step past the end and export again, overwriting the finished run.
    """
    if not os.path.isfile(os.path.join(args.output_dir, "train_results.json")):
        return None  # killed before or during the export: resuming writes it
    with open(os.path.join(checkpoint, "trainer_state.json")) as file:
        state = json.load(file)
    step = int(state["global_step"])
    if args.max_steps > 0:
        last_step = args.max_steps
    elif args.num_train_epochs <= state.get("num_train_epochs", 0):  # same epochs as the run that wrote it
        last_step = int(state.get("max_steps", 0))
    else:
        return None
    if last_step <= 0 or step < last_step:
        return None
    return (
        f"{checkpoint} already reached step {step} of {last_step}: the run is finished, nothing to do (nothing "
        f"trained, nothing in {args.output_dir} overwritten). Raise --max_steps (or --num_train_epochs) to train further."
    )


def start_run(args, logger: logging.Logger) -> tuple[str | None, bool]:
    """What every training entry point does first: logging, the checkpoint to resume from, the seed.

    Returns ``(checkpoint or None, finished)``; ``finished`` means that run already reached its end (logged as a
    warning), and the caller should stop rather than train past it and overwrite its export.
    """
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if args.should_log else logging.WARNING)
    resume = resolve_resume_checkpoint(args.resume_from_checkpoint, args.output_dir)
    finished = finished_run_message(resume, args) if resume else None
    if finished:
        logger.warning(finished)
        return resume, True
    enable_full_determinism(args.seed) if args.full_determinism else set_seed(args.seed)
    return resume, False


def save_run(trainer, result) -> None:
    """What every training entry point does after ``trainer.train``: export the model, keep its metrics and state."""
    with clear_write_errors(trainer.args.output_dir, "the trained model"):
        trainer.save_model()
    log_metrics(trainer, "train", result.metrics)
    trainer.save_state()


def log_metrics(trainer, split: str, metrics: dict) -> None:
    """Print ``metrics`` and keep them in ``<output_dir>/<split>_results.json``."""
    trainer.log_metrics(split, metrics)
    trainer.save_metrics(split, metrics)


def publish_run(trainer, title: str, logger: logging.Logger) -> None:
    """What every training entry point does last: the loss-curve plot (main process) and the upload, if asked for."""
    from .plotting import plot_loss_curves

    if trainer.is_world_process_zero():
        try:
            plot_loss_curves(trainer.state.log_history, os.path.join(trainer.args.output_dir, "loss_curves.png"), title=title)
        except ValueError as err:
            logger.warning("no loss-curve plot: %s", err)
    if trainer.args.push_to_hub:
        trainer.push_to_hub()


def end_run() -> None:
    """Leave the process group together when the run was distributed (a no-op otherwise). A gloo rank that exits with
    the group alive while another still tears down can abort ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def clear_write_errors(folder: str | os.PathLike, what: str):
    """Re-raise an error of writing ``what`` into ``folder`` as an ``OSError`` that names both.

    ``torch.save`` reports a full disk (ENOSPC) as ``RuntimeError: ... basic_ios::clear: iostream error``, which
    says neither what failed nor where.
    """
    try:
        yield
    except (OSError, RuntimeError) as error:
        code = error.errno if isinstance(error, OSError) and error.errno else errno.EIO
        existing = os.path.abspath(folder)
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        free_mb = shutil.disk_usage(existing).free / 2**20
        raise OSError(
            code,
            f"could not write {what} into {folder} ({free_mb:.0f} MB free on that disk): {error}. A full disk (ENOSPC) "
            "shows up from torch.save as 'basic_ios::clear: iostream error'; free space or choose another "
            "--output_dir, then continue with --resume_from_checkpoint last",
        ) from error


class AtomicCheckpointMixin:
    """Mix into a ``Trainer`` subclass (before ``Trainer``) to write checkpoints atomically.

    Subclasses that keep state outside the model/optimizer (a discriminator, EMA weights) write it in
    :meth:`save_extra_checkpoint_files`, which runs while the checkpoint is still staged, so it is part of the
    atomic rename.
    """

    _checkpoint_staging_root: str | None = None

    def _get_output_dir(self, trial):
        # Trainer._save_checkpoint builds "<run dir>/checkpoint-N" from this: during a save, point it at staging.
        if self._checkpoint_staging_root is not None:
            return self._checkpoint_staging_root
        return super()._get_output_dir(trial)

    @property
    def is_saving_checkpoint(self) -> bool:
        """True while a checkpoint is being written (lets ``save_model`` overrides tell checkpoints from exports)."""
        return self._checkpoint_staging_root is not None

    def save_extra_checkpoint_files(self, checkpoint_dir: str) -> None:
        """Hook: write additional files into the (staged) checkpoint folder. Called on every process."""

    def _save_checkpoint(self, model, trial) -> None:
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging_root = os.path.join(run_dir, STAGING_DIRNAME)
        staged, final = os.path.join(staging_root, name), os.path.join(run_dir, name)
        if self.args.should_save and os.path.isdir(staged):
            shutil.rmtree(staged)  # left over by a save that was killed
        self.accelerator.wait_for_everyone()  # nobody writes into `staged` before it was cleared

        self._checkpoint_staging_root = staging_root
        try:
            with clear_write_errors(staged, f"checkpoint {name}"):
                super()._save_checkpoint(model, trial)
                self.save_extra_checkpoint_files(staged)
        except OSError:
            if self.args.should_save:
                shutil.rmtree(staged, ignore_errors=True)  # give the space of the partial save back
            raise
        finally:
            self._checkpoint_staging_root = None
        self.accelerator.wait_for_everyone()  # every process has written its files (e.g. rng_state_<rank>.pth)

        if self.args.should_save:
            if self.state.best_model_checkpoint == staged:  # recorded while the folder still lived in staging
                self.state.best_model_checkpoint = final
            if os.path.isdir(final):  # saving the same step twice: move the old one aside atomically first
                trash = os.path.join(staging_root, f"{name}.old")
                shutil.rmtree(trash, ignore_errors=True)
                os.replace(final, trash)
                os.replace(staged, final)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.replace(staged, final)
            try:
                os.rmdir(staging_root)
            except OSError:
                pass  # not empty (another leftover) or already gone
            # The Trainer rotated inside the staging folder, where there is nothing to rotate: do it here.
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()  # no process runs ahead while the folder is being renamed

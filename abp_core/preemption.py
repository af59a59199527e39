"""Preemption: on SIGTERM or SIGUSR1, a checkpoint at the next batch boundary, a clean exit, and a SLURM requeue.

Cluster schedulers announce the end of a job with a signal: SIGTERM before preemption or ``scancel``
(followed by SIGKILL after a grace period), and, with ``sbatch --signal=USR1@<seconds>``, SIGUSR1 some
time before the time limit. Whatever the run did since its last checkpoint would otherwise be lost.

Detection is Lightning's own: during ``trainer.fit`` its SIGTERM handler sets ``trainer.received_sigterm``
and its loops raise :class:`~lightning.pytorch.utilities.exceptions.SIGTERMException` at the next batch
boundary, i.e. after the optimizer step of the batch that was running. :class:`PreemptionCheckpoint` then
writes ``last.ckpt`` (through the trainer's atomic, rotating checkpoint IO), so the same command resumes
exactly where the run stopped: same batches, same weights as an uninterrupted run.

SIGUSR1 is forwarded to that SIGTERM path (:func:`forward_sigusr1`). Lightning handles SIGUSR1 itself
only under SLURM with auto-requeue, and then saves ``hpc_ckpt_<n>.ckpt`` from inside the signal handler,
which may run in the middle of a training step (Lightning issue #21406); the forwarded signal gets the
batch-boundary checkpoint instead. Under SLURM (:meth:`SLURMEnvironment.detect`), a SIGUSR1 then
requeues the job (``scontrol requeue``, as Lightning's auto-requeue does), and the requeued job, running
the same command, resumes. SIGTERM only stops: it is what ``scancel`` sends, and a preempted job with
``--requeue`` is requeued by SLURM itself.

After the checkpoint :func:`~abp_core.train.run_training` raises :class:`TrainingPreempted`, a
:class:`SystemExit` with exit status ``128 + signal`` (143 for SIGTERM, 138 for SIGUSR1), so that a grid
of runs stops too instead of starting its next run on a machine that is being taken away.
"""
from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import SIGTERMException

__all__ = ["PreemptionCheckpoint", "TrainingPreempted", "forward_sigusr1", "requeue_slurm_job"]

log = logging.getLogger("abp_core.preemption")


class TrainingPreempted(SystemExit):
    """Training stopped on a signal after writing a checkpoint; the same command resumes it.

    ``code`` is the exit status ``128 + signum``; ``signal_name``, ``checkpoint``, ``epoch``,
    ``global_step`` and ``requeued`` describe what happened; ``str()`` is the one-line explanation.
    """

    def __init__(self, signum: int, checkpoint: Optional[Path], epoch: int, global_step: int,
                 requeued: Optional[str] = None):
        super().__init__(128 + int(signum))
        self.signum, self.signal_name = int(signum), signal.Signals(signum).name
        self.checkpoint, self.epoch, self.global_step, self.requeued = checkpoint, epoch, global_step, requeued
        where = f"global step {global_step} (epoch {epoch})"
        saved = (f"{checkpoint} holds the training state of that step" if checkpoint is not None
                 else "no checkpoint was written (training had not started)")
        then = requeued or "Run the same command to resume exactly where it stopped."
        self.message = f"stopped by {self.signal_name} at {where}; {saved}. {then}"

    def __str__(self) -> str:
        return self.message


class PreemptionCheckpoint(Callback):
    """Writes ``path`` (normally ``last.ckpt``) when Lightning stops training on SIGTERM (or forwarded SIGUSR1).

    The checkpoint is written in ``on_train_batch_end`` of the batch during which the signal arrived
    (the same moment as Lightning's step checkpoints, ``ModelCheckpoint(every_n_train_steps=...)``),
    or, if the signal arrived elsewhere (between epochs), when Lightning raises
    :class:`SIGTERMException` at its next check -- unless a checkpoint of that very step exists already.

    A signal during the epoch's last training batch or its validation is held back until the validation
    has finished (the epoch's checkpoint is then written as usual): a checkpoint from the middle of the
    validation, or from just before it, resumes by skipping that validation (Lightning 2.6), so the epoch
    would have no ``val_loss`` for early stopping, best checkpoint and history. Lightning's
    ``OnExceptionCheckpoint`` is not used: it writes on every exception (also after a non-finite loss,
    whose weights must not become ``last.ckpt``) and deletes its file when the trainer is torn down.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self.saved_at_step: Optional[int] = None
        self.stopped: Optional[dict] = None
        self.signum = signal.SIGTERM
        self._lightning_sigterm = None
        self._holding = False
        self._held: Optional[tuple] = None

    def _save(self, trainer) -> None:
        trainer.save_checkpoint(str(self.path))

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # any checkpoint of this step (ours, Lightning's step or epoch checkpoints) makes ours redundant
        self.saved_at_step = int(trainer.global_step)

    # ---- holding a signal back from the last training batch to the end of validation ---------------
    def on_train_start(self, trainer, pl_module) -> None:
        # Lightning installed its SIGTERM handler before this hook (and restores the original at teardown)
        if threading.current_thread() is threading.main_thread():
            self._lightning_sigterm = signal.getsignal(signal.SIGTERM)
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        if self._holding:
            self._held = (signum, frame)
        elif callable(self._lightning_sigterm):
            self._lightning_sigterm(signum, frame)

    def _release(self) -> None:
        self._holding = False
        held, self._held = self._held, None
        if held is not None:
            self._on_sigterm(*held)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._holding = trainer.num_training_batches <= 1

    def on_validation_start(self, trainer, pl_module) -> None:
        self._holding = self._holding or not trainer.sanity_checking

    def on_validation_end(self, trainer, pl_module) -> None:
        self._release()

    def on_train_epoch_end(self, trainer, pl_module) -> None:  # epochs without validation
        self._release()

    # ---- the checkpoint ----------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.received_sigterm and self.saved_at_step != int(trainer.global_step):
            self._save(trainer)
        # from here to the end of validation a signal waits: Lightning would stop before it is checked
        self._holding = self._holding or batch_idx + 2 >= trainer.num_training_batches

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        if self.saved_at_step != int(trainer.global_step) and trainer.global_step > 0:
            self._save(trainer)
        self.stopped = {"epoch": int(trainer.current_epoch), "global_step": int(trainer.global_step),
                        "checkpoint": self.path if self.saved_at_step is not None else None}

    def preempted(self, is_global_zero: bool = True) -> TrainingPreempted:
        """The exception to raise after ``trainer.fit`` stopped on the signal (requeues on SLURM + SIGUSR1)."""
        info = self.stopped or {"epoch": -1, "global_step": -1, "checkpoint": None}
        requeued = None
        if is_global_zero and self.signum == getattr(signal, "SIGUSR1", None):
            requeued = requeue_slurm_job()
        return TrainingPreempted(self.signum, info["checkpoint"], info["epoch"], info["global_step"], requeued)


@contextmanager
def forward_sigusr1(callback: PreemptionCheckpoint) -> Iterator[None]:
    """While the block runs, SIGUSR1 is turned into SIGTERM (Lightning's handler) and noted on ``callback``.

    The previous SIGUSR1 handler is restored afterwards. No-op off the main thread or where SIGUSR1 does
    not exist (Windows).
    """
    usr1 = getattr(signal, "SIGUSR1", None)
    if usr1 is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        # only note it here and re-raise as SIGTERM: the work happens in Lightning's loop, at a batch boundary
        callback.signum = signum
        signal.raise_signal(signal.SIGTERM)

    previous = signal.signal(usr1, handler)
    try:
        yield
    finally:
        signal.signal(usr1, previous)


def requeue_slurm_job() -> Optional[str]:
    """``scontrol requeue`` this SLURM job (array task aware); returns what happened, ``None`` off SLURM."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    if not SLURMEnvironment.detect():
        return None
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array_job}_{array_task}" if array_job and array_task else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job):
        return f"Not requeued: no valid SLURM job id ({job!r}); submit the same command again to resume."
    try:
        proc = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"Requeueing SLURM job {job} failed ({exc}); submit the same command again to resume."
    if proc.returncode != 0:
        return (f"Requeueing SLURM job {job} failed ({proc.stderr.strip() or proc.returncode}); "
                f"submit the same command again to resume.")
    log.info("requeued SLURM job %s", job)
    return f"SLURM job {job} requeued: it resumes from the checkpoint when it starts again."

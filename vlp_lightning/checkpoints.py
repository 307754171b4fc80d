"""Checkpoint files that survive a kill, a full disk and a second run: atomic saves, the experiment lock, and the
choice of the checkpoint `--ckpt_path last` resumes.

* `AtomicModelCheckpoint` (the CLI's `--checkpoint`): a checkpoint is written under a hidden partial name in its
  own folder, flushed to disk (fsync) and renamed into place, so a final name only ever holds complete bytes (with
  `TMPDIR` on another file system Lightning's own temporary file is copied, not renamed, and a kill or a full disk
  leaves half a file: here under the partial name). `last.ckpt` is switched by renaming a new link over it, and
  before a checkpoint it points at is deleted, so it never dangles; there is no copying fallback that could leave a
  0-byte `last.ckpt` on a full disk.
* `ExperimentLock`: one training run per checkpoint folder. A POSIX record lock on `<folder>.lock`, held for the
  life of the run and released by the kernel when the process dies, so the lock file of a killed run never blocks
  its resume; the file names the pid holding it.
* `newest_complete_checkpoint`: the most recently written checkpoint of the folder that loads completely
  (truncated, empty and unreadable files are passed over and named).
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import socket
from pathlib import Path
from weakref import proxy

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


class ExperimentLockedError(RuntimeError):
    """Another live run trains into the same checkpoint folder."""


def partial_name(path: str | Path) -> Path:
    """Where a checkpoint is written before it is complete: a hidden name in the same folder (a rename away)."""
    path = Path(path)
    return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")


def _fsync(path: Path) -> None:
    """Flush a file, or every file of a folder and the folder itself, to disk."""
    paths = [path] if path.is_file() else [*(p for p in path.rglob("*") if p.is_file()), path]
    for item in paths:
        descriptor = os.open(item, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def publish(partial: Path, final: Path) -> None:
    """Move a complete `partial` checkpoint (file or folder) to `final` in one rename, after flushing it."""
    _fsync(partial)
    if final.is_dir() and not final.is_symlink():  # a sharded checkpoint saved again under the same name
        shutil.rmtree(final)
    os.replace(partial, final)
    _fsync(final.parent)


def switch_link(target: str | Path, link: str | Path) -> None:
    """Point the symlink `link` at `target` in one rename: at every moment `link` names the old or the new target."""
    link, target = Path(link), Path(target)
    staged = link.with_name(f".{link.name}.{os.getpid()}.link")
    staged.unlink(missing_ok=True)
    os.symlink(os.path.relpath(target, link.parent), staged)
    if link.is_dir() and not link.is_symlink():
        shutil.rmtree(link)
    os.replace(staged, link)
    _fsync(link.parent)


class AtomicModelCheckpoint(ModelCheckpoint):
    """`ModelCheckpoint` whose saves are atomic and whose `last` link never points at a deleted file (module doc).

    Its state in a checkpoint (best and last paths, top-k scores) is keyed by what it ranks (`monitor`, `mode`),
    not by how often it saves: a run resumed with another `--checkpoint.every_n_train_steps` keeps that state
    and gets no "callbacks used to create the checkpoint need to be provided" warning. Lightning's key also holds
    the save schedule."""

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor, mode=self.mode)

    def _save_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        partial = partial_name(filepath)
        try:
            trainer.save_checkpoint(partial, self.save_weights_only)  # every rank writes its part, then a barrier
            if trainer.is_global_zero:
                publish(partial, Path(filepath))
        except BaseException:
            if trainer.is_global_zero:
                _remove(partial)
            raise
        trainer.strategy.barrier()
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def on_train_end(self, trainer: Trainer, pl_module) -> None:
        """Save the final state when training ends between two of Lightning's saves.

        Lightning saves when a validation ends (or every N steps / epochs). A run whose `max_steps` falls mid-way
        through an epoch, after the epoch's last validation check (an integer `val_check_interval` counts batches
        within the epoch), would end with its checkpoints behind its last step, and Lightning's own `on_train_end`
        saves `last` only when nothing was saved before: a 600-step run of 469-batch epochs ended with `last.ckpt`
        at step 300. Without a monitor, the final state is saved as a top-k checkpoint and `last` points at it; with
        one (whose metric the final step may not have), it is written as `last` itself."""
        if not self._should_skip_saving_checkpoint(trainer) and (self.save_top_k != 0 or self.save_last):
            candidates = self._monitor_candidates(trainer)
            if self.monitor is None and self.save_top_k != 0:
                self._save_topk_checkpoint(trainer, candidates)
                self._save_last_checkpoint(trainer, candidates)
            elif self.save_last:
                self._save_checkpoint(trainer, self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST))
        super().on_train_end(trainer, pl_module)

    @staticmethod
    def _link_checkpoint(trainer: Trainer, filepath: str, linkpath: str) -> None:
        if trainer.is_global_zero and os.path.abspath(filepath) != os.path.abspath(linkpath):
            switch_link(filepath, linkpath)
        trainer.strategy.barrier()

    def _remove_checkpoint(self, trainer: Trainer, filepath: str) -> None:
        """Lightning deletes the previous checkpoint before it moves the `last` link on; move the link first."""
        default_link = Path(self.dirpath or ".") / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
        link = self.last_model_path or str(default_link)
        newest = self._last_checkpoint_saved
        if (
            trainer.is_global_zero
            and self.save_last == "link"
            and newest
            and os.path.islink(link)
            and os.path.realpath(link) == os.path.realpath(filepath)
            and os.path.realpath(newest) != os.path.realpath(filepath)
        ):
            switch_link(newest, link)
        super()._remove_checkpoint(trainer, filepath)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_partial_saves(directory: Path) -> list[Path]:
    """Delete the partial checkpoints (and staged links) a killed save left in `directory`; only names
    `AtomicModelCheckpoint` writes are touched."""
    leftovers = [
        path
        for path in directory.glob(".*")
        if path.name.endswith(PARTIAL_SUFFIX) or (path.name.endswith(".link") and path.is_symlink())
    ]
    for path in leftovers:
        _remove(path)
    return leftovers


def checkpoint_is_complete(path: Path) -> bool:
    """A checkpoint file that loads (weights only, memory-mapped: cheap) as a Lightning checkpoint, or a sharded
    checkpoint folder holding its metadata."""
    if path.is_dir():
        return (path / ".metadata").is_file() or (path / "latest").is_file()
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # truncated, empty, not a checkpoint, or holding objects weights_only refuses
        return False
    return isinstance(checkpoint, dict) and "global_step" in checkpoint


def newest_complete_checkpoint(directory: Path) -> tuple[Path | None, list[Path]]:
    """(the newest complete checkpoint in `directory` or None, the incomplete ones passed over on the way)."""
    if not directory.is_dir():
        return None, []
    candidates = {
        path.resolve() for path in directory.glob("*.ckpt") if not path.name.startswith(".") and path.exists()
    }
    passed_over = []
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime_ns, reverse=True):
        if checkpoint_is_complete(path):
            return path, passed_over
        passed_over.append(path)
    return None, passed_over


class ExperimentLock:
    """One live training run per checkpoint folder (module doc). `acquire()` raises `ExperimentLockedError` naming
    the holder; `release()` (or the end of the process) frees it."""

    def __init__(self, directory: str | Path) -> None:
        directory = Path(directory)
        self.path = directory.with_name(f"{directory.name}.lock")
        self.descriptor: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.lockf(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(descriptor, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(descriptor)
            raise ExperimentLockedError(
                f"{self.path.parent} is being trained by {holder} right now (lock file {self.path}); wait for that "
                "run to end, or start this one under another name with --experiment <name>"
            ) from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self.descriptor = descriptor

    def release(self) -> None:
        if self.descriptor is not None:
            os.close(self.descriptor)  # closing drops the record lock; the file stays, naming the last holder
            self.descriptor = None

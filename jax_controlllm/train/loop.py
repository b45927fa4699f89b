"""The training loop: batches -> step -> metrics, periodic eval and checkpoints, clean stops.

Exit statuses of a run (also those of ``python -m launch.train``):

    0   EXIT_OK          finished all steps (final checkpoint written)
    1   EXIT_BAD_INPUT   bad config / mesh / paths; a one-line error, nothing written
    3   EXIT_NONFINITE   loss or gradients not finite (more than train.skip_nonfinite_steps times);
                         the last good state was checkpointed
    74  EXIT_CHECKPOINT_FAILED  a checkpoint could not be written (disk full, quota, permissions): one line
                         says why; the checkpoints already written are intact (74 is EX_IOERR)
    75  EXIT_PREEMPTED   SIGTERM / SIGINT (e.g. TPU preemption): a checkpoint of the current step was written;
                         rerun the same command to resume (75 is EX_TEMPFAIL: "try again")
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from jax_controlllm.checkpoint import VERIFY_COMMAND, CheckpointWriteError, sealed_steps
from jax_controlllm.data.prefetch import PrefetchingIterator
from jax_controlllm.tokenizer import run_tokenizer_source
from jax_controlllm.train.data import (
    eval_batch_size,
    make_iterator,
    process_batch_slot,
    to_global,
)
from jax_controlllm.train.metrics import MetricsWriter, flops_per_token, peak_flops_per_device
from jax_controlllm.train.setup import Trainer
from jax_controlllm.train.state import combine

EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_CHECKPOINT_FAILED, EXIT_PREEMPTED = 0, 1, 3, 74, 75
# A non-finite loss this few steps after a restore points at the checkpoint rather than the learning rate.
STEPS_SUSPECTING_THE_RESTORE = 3


@dataclass
class LoopResult:
    exit_code: int
    step: int            # last completed (and checkpointed) step
    reason: str


class StopSignals:
    """SIGTERM / SIGINT set a flag that the loop checks after each step; a second SIGINT interrupts at once."""

    def __init__(self):
        self.received: Optional[str] = None
        self._old: dict = {}

    def __enter__(self) -> "StopSignals":
        if os.name == "posix" and _in_main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)

    def stop_requested(self) -> bool:
        """True on every process as soon as any process got a signal (TPU preemption may reach hosts apart)."""
        local = self.received is not None
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array([local]))))


def _in_main_thread() -> bool:
    import threading
    return threading.current_thread() is threading.main_thread()


def _to_host(metrics: dict) -> dict:
    out = {}
    for key, value in jax.device_get(metrics).items():
        value = np.asarray(value)
        out[key] = value.tolist() if value.ndim else value.item()
    return out


def say(line: str) -> None:
    """One line to stderr from process 0 only, in one write, newline included: Orbax's and asyncio's background
    threads print to stderr too, and print()'s separate newline write lets their text land inside our line."""
    if jax.process_index() == 0:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


class _Log:
    """Console output from process 0 only (through the progress bar while there is one)."""

    def __init__(self, bar):
        self.bar = bar
        self.main = jax.process_index() == 0

    def __call__(self, message: str) -> None:
        if self.bar is None:
            say(message)
        elif self.main:
            self.bar.write(message + "\n", file=sys.stderr, end="")   # one write, as in say()


def train_loop(trainer: Trainer, run_dir: str | Path, checkpoints, progress: bool = True) -> LoopResult:
    """Run from ``trainer.start_step`` to ``train.steps``; returns how and where it stopped.

    ``checkpoints``: the run's ``RunCheckpoints``. The trainer's state is donated step by step: afterwards
    the final weights are in the last checkpoint (``jax_controlllm.checkpoint.load_model(run_dir)``)."""
    loop = _Loop(trainer, Path(run_dir), checkpoints, progress)
    try:
        with jax.set_mesh(trainer.mesh), StopSignals() as signals:
            result = loop.run(signals)
        checkpoints.wait()
    except CheckpointWriteError as err:      # disk full & co: stop, the checkpoints already written stay intact
        kept = sealed_steps(checkpoints.directory)
        result = LoopResult(EXIT_CHECKPOINT_FAILED, kept[-1] if kept else 0, str(err))
    finally:
        loop.close()
    loop.log(result.reason)
    return result


class _Loop:
    """The loop's moving parts: batches, the current state, logging, and the decisions after each step."""

    def __init__(self, trainer: Trainer, run_dir: Path, checkpoints, progress: bool):
        run, train = trainer.run, trainer.run.train
        self.trainer, self.train, self.checkpoints, self.run_dir = trainer, train, checkpoints, run_dir
        main = jax.process_index() == 0
        sharding = trainer.shardings.batch["input_ids"]
        slot, count = process_batch_slot(sharding, train.batch_size, train.seq_len)
        tokenizer = run_tokenizer_source(run, run_dir)
        iterator = make_iterator(run, trainer.model_config.vocab_size, "train", slot, count, tokenizer)
        if trainer.data_state is not None:
            iterator.set_state(trainer.data_state)
        self.data_state = iterator.get_state()      # the data position after the last completed step
        self.evaluator = Evaluator(trainer, tokenizer) if train.eval_every else None
        self.bar = None
        if progress and main:
            from tqdm import tqdm
            self.bar = tqdm(total=train.steps, initial=trainer.start_step, dynamic_ncols=True, unit="step")
        self.log = _Log(self.bar)
        self.log(trainer.describe())
        self.writer = MetricsWriter(run_dir, enabled=main)
        self.throughput = Throughput(trainer, train)
        # host-side tokenising and packing overlap the device step; the iterator's state follows the batches handed out
        self.batches = PrefetchingIterator(iterator, train.prefetch) if train.prefetch else iterator
        self.state, self.step, self.bad_steps = trainer.state, trainer.start_step, 0

    def run(self, signals: StopSignals) -> LoopResult:
        while self.step < self.train.steps:
            try:
                host_batch = next(self.batches)
            except StopIteration:
                self.log(f"the training data ended after step {self.step}")
                break
            finite = self.train_step(host_batch)
            if not finite and not self.may_skip():
                return self.stop_nonfinite()
            self.data_state = self.batches.get_state()
            self.after_step()
            if signals.stop_requested():
                self.save(self.step)
                return LoopResult(EXIT_PREEMPTED, self.step, (
                    f"{signals.received or 'stop signal'} after step {self.step}: checkpoint saved in "
                    f"{self.checkpoints.directory}; rerun the same command to resume"))
        self.save(self.step)
        return LoopResult(EXIT_OK, self.step, f"finished {self.step} steps; checkpoint in {self.checkpoints.directory}")

    def train_step(self, host_batch: dict) -> bool:
        """One step; logs it when due (and always when the loss is not finite). Returns finiteness."""
        trainer = self.trainer
        batch = to_global(host_batch, trainer.shardings.batch, self.train.batch_size)
        self.throughput.start()
        self.state, metrics = trainer.step_fn(self.state, trainer.frozen, batch)
        self.step += 1
        finite = bool(metrics["finite"])  # waits for the step: the stop decision needs it
        self.throughput.stop()
        if self.step % self.train.log_every == 0 or self.step == self.train.steps or not finite:
            record = {**_to_host(metrics), **self.throughput.report()}
            record["skipped"] = not record.pop("finite")
            self.writer.write(self.step, record)
            if self.bar is not None:
                self.bar.set_postfix(_postfix(record), refresh=False)
        if self.bar is not None:
            self.bar.update(1)
        return finite

    def may_skip(self) -> bool:
        self.bad_steps += 1
        allowed = self.train.skip_nonfinite_steps
        if self.bad_steps > allowed:
            return False
        self.log(f"step {self.step}: non-finite loss, update skipped ({self.bad_steps} of {allowed} allowed)"
                 + self.restore_suspect())
        return True

    def restore_suspect(self) -> str:
        """For a non-finite loss right after a restore: the checkpoint may be damaged, and how to check it."""
        start = self.trainer.start_step
        if not start or self.step - start > STEPS_SUSPECTING_THE_RESTORE:
            return ""
        return (f"; this is {self.step - start} step(s) after the restore of checkpoint step {start}, which may "
                f"be damaged: check it with {VERIFY_COMMAND} {self.run_dir}")

    def stop_nonfinite(self) -> LoopResult:
        # The guarded update left weights and optimizer untouched: this is the state after the previous step,
        # and self.data_state is still the position after that step.
        suspect = self.restore_suspect()
        self.state = self.state.replace(step=self.state.step - 1)
        self.step -= 1
        allowed = f"allowed skips: train.skip_nonfinite_steps={self.train.skip_nonfinite_steps}"
        if suspect:     # no new checkpoint of a state that may come from a damaged one: retention keeps the old
            return LoopResult(EXIT_NONFINITE, self.step, (
                f"step {self.step + 1}: the loss is not finite ({allowed}); stopped without a new checkpoint"
                f"{suspect}; otherwise lower train.lr, check the data, or allow skips"))
        self.save(self.step)
        return LoopResult(EXIT_NONFINITE, self.step, (
            f"step {self.step + 1}: the loss is not finite; stopped with a checkpoint of step {self.step} in "
            f"{self.checkpoints.directory} ({allowed}). Lower train.lr, check the data, or allow skips"))

    def after_step(self) -> None:
        step, train = self.step, self.train
        if self.evaluator is not None and step % train.eval_every == 0:
            metrics = self.evaluator(self.state.trainable, self.trainer.frozen)
            self.writer.write(step, metrics, prefix="eval_")
            self.log(f"step {step}: eval loss {metrics['loss']:.4f} (ce {metrics['ce']:.4f})")
        if train.save_every and step % train.save_every == 0:
            self.save(step)
        if train.inject_sigterm_at_step == step:  # testing aid: a preemption right here
            os.kill(os.getpid(), signal.SIGTERM)

    def save(self, step: int) -> None:
        """Start an (async) checkpoint of the current state; the arrays are copied before the next step."""
        if step in self.checkpoints.all_steps():
            return
        params = combine(self.state.trainable, self.trainer.frozen)
        self.checkpoints.save(step, params, self.state.opt_state, self.trainer.model_config, self.data_state)

    def close(self) -> None:
        if isinstance(self.batches, PrefetchingIterator):
            self.batches.close()
        self.writer.close()
        if self.bar is not None:
            self.bar.close()


def _postfix(record: dict) -> dict:
    out = {"loss": f"{record['loss']:.4f}", "ce": f"{record['ce']:.4f}", "div": f"{record['divergence']:.2e}"}
    if "distill" in record:
        out["kl"] = f"{record['distill']:.2e}"
    weights = record.get("merge_weight_per_layer") or []
    if weights:
        out["w"] = f"{float(np.mean(weights)):.3f}"
    out.update(gnorm=f"{record['grad_norm']:.3f}", lr=f"{record['lr']:.2e}")
    if record.get("tokens_per_s"):
        out["tok/s"] = f"{record['tokens_per_s']:.0f}"
    if record.get("mfu") is not None:
        out["mfu"] = f"{100 * record['mfu']:.1f}%"
    return out


class Throughput:
    """Tokens/s and MFU over the steps since the last report; the first step (compilation) is reported apart."""

    def __init__(self, trainer: Trainer, train):
        self.tokens_per_step = train.batch_size * train.seq_len
        self.flops_per_step = flops_per_token(trainer.model_config, train.seq_len) * self.tokens_per_step
        peak = peak_flops_per_device(train.peak_flops_per_device)
        self.peak = peak * trainer.mesh.size if peak else None
        self.seconds, self.steps, self.first = 0.0, 0, None
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        elapsed = time.perf_counter() - self._t0
        if self.first is None:
            self.first = elapsed
            return
        self.seconds += elapsed
        self.steps += 1

    def report(self) -> dict:
        out = {}
        if self.steps:
            step_time = self.seconds / self.steps
            out["step_time"] = step_time
            out["tokens_per_s"] = self.tokens_per_step / step_time
            out["mfu"] = self.flops_per_step / step_time / self.peak if self.peak else None
        elif self.first is not None:
            out["first_step_time"] = self.first  # includes compilation
        self.seconds, self.steps = 0.0, 0
        return out


class Evaluator:
    """Loss on the held-out split: the same ``train.eval_batches`` batches every time."""

    def __init__(self, trainer: Trainer, tokenizer):
        run = trainer.run
        self.trainer = trainer
        self.batch_size = eval_batch_size(run)
        self.sharding = trainer.shardings.batch
        slot, count = process_batch_slot(self.sharding["input_ids"], self.batch_size, run.train.seq_len)
        self.iterator = make_iterator(run, trainer.model_config.vocab_size, "eval", slot, count, tokenizer)

    def __call__(self, trainable: dict, frozen: dict) -> dict:
        self.iterator.reset()
        nll = tokens = divergence = 0.0
        batches = 0
        for _ in range(self.trainer.run.train.eval_batches):
            try:
                host = next(self.iterator)
            except StopIteration:
                break
            out = _to_host(self.trainer.plan.eval_fn(trainable, frozen,
                                                     to_global(host, self.sharding, self.batch_size)))
            nll += out["ce"] * out["tokens"]
            tokens += out["tokens"]
            divergence += out["divergence"]
            batches += 1
        ce = nll / max(tokens, 1.0)
        divergence /= max(batches, 1)
        return {"loss": ce + divergence, "ce": ce, "divergence": divergence, "batches": batches}

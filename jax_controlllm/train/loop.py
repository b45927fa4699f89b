"""The training loop: batches -> step -> metrics, periodic eval and checkpoints, clean stops.

Exit statuses of a run (also those of ``python -m launch.train``):

    0   EXIT_OK          finished all steps (final checkpoint written)
    1   EXIT_BAD_INPUT   bad config / mesh / paths; a one-line error, nothing written
    3   EXIT_NONFINITE   loss or gradients not finite (more than train.skip_nonfinite_steps times);
                         the last good state was checkpointed
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

from jax_controlllm.train.data import (Prefetcher, eval_batch_size, make_iterator, process_batch_slot,
                                       to_global, tokenizer_source)
from jax_controlllm.train.metrics import MetricsWriter, flops_per_token, peak_flops_per_device
from jax_controlllm.train.setup import Trainer
from jax_controlllm.train.state import combine

EXIT_OK, EXIT_BAD_INPUT, EXIT_NONFINITE, EXIT_PREEMPTED = 0, 1, 3, 75


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


class _Log:
    """Console output from process 0 only."""

    def __init__(self, bar):
        self.bar = bar
        self.main = jax.process_index() == 0

    def __call__(self, message: str) -> None:
        if self.main:
            (self.bar.write if self.bar is not None else print)(message, file=sys.stderr)


def train_loop(trainer: Trainer, run_dir: str | Path, checkpoints, progress: bool = True) -> LoopResult:
    """Run from ``trainer.start_step`` to ``train.steps``; returns how and where it stopped."""
    run, train = trainer.run, trainer.run.train
    run_dir = Path(run_dir)
    main = jax.process_index() == 0
    batch_sharding = trainer.shardings.batch
    slot, count = process_batch_slot(batch_sharding["input_ids"], train.batch_size, train.seq_len)
    tokenizer = tokenizer_source(run, run_dir)
    vocab = trainer.model_config.vocab_size
    iterator = make_iterator(run, vocab, "train", slot, count, tokenizer)
    if trainer.data_state is not None:
        iterator.set_state(trainer.data_state)
    last_data_state = iterator.get_state()
    evaluator = Evaluator(trainer, slot_for=process_batch_slot, tokenizer=tokenizer) if train.eval_every else None

    bar = None
    if progress and main:
        from tqdm import tqdm
        bar = tqdm(total=train.steps, initial=trainer.start_step, dynamic_ncols=True, unit="step")
    log = _Log(bar)
    log(trainer.describe())
    writer = MetricsWriter(run_dir, enabled=main)
    throughput = Throughput(trainer, train)
    batches = Prefetcher(iterator, train.prefetch)
    state, frozen, step = trainer.state, trainer.frozen, trainer.start_step
    bad_steps = 0

    def save(at_step: int, data_state: dict) -> None:
        if at_step in checkpoints.all_steps():
            return
        checkpoints.save(at_step, combine(state.trainable, frozen), state.opt_state, trainer.model_config,
                         data_state)

    result = None
    try:
        with jax.set_mesh(trainer.mesh), StopSignals() as signals:
            while step < train.steps:
                try:
                    host_batch, data_state = next(batches)
                except StopIteration:
                    log(f"the training data ended after step {step}")
                    break
                batch = to_global(host_batch, batch_sharding, train.batch_size)
                throughput.start()
                state, metrics = trainer.step_fn(state, frozen, batch)
                step += 1
                finite = bool(metrics["finite"])  # waits for the step: the stop decision needs it
                throughput.stop()
                if step % train.log_every == 0 or step == train.steps or not finite:
                    record = {**_to_host(metrics), **throughput.report()}
                    record.pop("finite")
                    record["skipped"] = not finite
                    writer.write(step, record)
                    if bar is not None:
                        bar.set_postfix(_postfix(record), refresh=False)
                if not finite:
                    bad_steps += 1
                    if bad_steps > train.skip_nonfinite_steps:
                        # The step left weights and optimizer untouched: this is the state after step - 1.
                        state = state.replace(step=state.step - 1)
                        step -= 1
                        save(step, last_data_state)
                        result = LoopResult(EXIT_NONFINITE, step, (
                            f"step {step + 1}: the loss is not finite; stopped with a checkpoint of step {step} "
                            f"in {checkpoints.directory} (allowed skips: train.skip_nonfinite_steps="
                            f"{train.skip_nonfinite_steps}). Lower train.lr, check the data, or allow skips"))
                        break
                    log(f"step {step}: non-finite loss, update skipped ({bad_steps} of "
                        f"{train.skip_nonfinite_steps} allowed)")
                last_data_state = data_state
                if bar is not None:
                    bar.update(1)
                if evaluator is not None and step % train.eval_every == 0:
                    eval_metrics = evaluator(state.trainable, frozen)
                    writer.write(step, eval_metrics, prefix="eval_")
                    log(f"step {step}: eval loss {eval_metrics['loss']:.4f} (ce {eval_metrics['ce']:.4f})")
                if train.save_every and step % train.save_every == 0:
                    save(step, data_state)
                if train.inject_sigterm_at_step == step:  # testing aid: a preemption right here
                    os.kill(os.getpid(), signal.SIGTERM)
                if signals.stop_requested():
                    save(step, data_state)
                    checkpoints.wait()
                    result = LoopResult(EXIT_PREEMPTED, step, (
                        f"{signals.received or 'stop signal'} after step {step}: checkpoint saved in "
                        f"{checkpoints.directory}; rerun the same command to resume"))
                    break
            if result is None:
                save(step, last_data_state)
                result = LoopResult(EXIT_OK, step, f"finished {step} steps; checkpoint in {checkpoints.directory}")
            checkpoints.wait()
    finally:
        batches.close()
        writer.close()
        if bar is not None:
            bar.close()
    log(result.reason)
    return result


def _postfix(record: dict) -> dict:
    out = {"loss": f"{record['loss']:.4f}", "ce": f"{record['ce']:.4f}", "div": f"{record['divergence']:.2e}"}
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

    def __init__(self, trainer: Trainer, slot_for, tokenizer):
        run = trainer.run
        self.trainer = trainer
        self.batch_size = eval_batch_size(run)
        self.sharding = trainer.shardings.batch
        slot, count = slot_for(self.sharding["input_ids"], self.batch_size, run.train.seq_len)
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

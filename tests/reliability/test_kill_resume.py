"""Kill -9 and SIGTERM at random moments of one async-checkpointing run, restarted after every stop.

One run directory goes through 22 interrupted starts (20 kill -9, 8 of them while a checkpoint is being written
and 3 during start-up, and 2 SIGTERMs, one mid-save and one mid-step), then one start that finishes. After every
stop (see kill_chain.stop_problems):

* the next start resumes from the newest complete checkpoint (no checkpointed work is lost);
* that checkpoint reads back whole: finite weights and the data position of its step;
* no half-written save is ever picked: only Orbax's renamed ``<step>`` directories count;
* SIGTERM exits with 75 within a bounded time, with a checkpoint of the step it names;

and in the end every loss any start logged equals the uninterrupted reference's loss of that step bit for bit,
and so do the final weights.
"""
import pytest
from kill_chain import run_chain

TRIALS = {"kill9-training": 9, "kill9-mid-save": 8, "kill9-startup": 3, "sigterm-mid-save": 1,
          "sigterm-mid-step": 1}


@pytest.mark.slow
def test_random_kills_and_sigterms_lose_no_checkpointed_work(tmp_path, cache_dir, reference):
    chain = run_chain(tmp_path / "run", cache_dir, TRIALS, seed=20260, reference=reference)
    assert not chain.problems, "\n".join(chain.problems)
    figures = chain.figures()
    assert figures["kill9"] == 20 and figures["sigterm"] == 2
    # kills did land inside saves, and left them half-written (the next start ignored and removed them)
    assert figures["kill9_that_interrupted_a_save"] >= TRIALS["kill9-mid-save"] // 2, chain.records()

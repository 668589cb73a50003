"""The short fuzz run (`make fuzz` runs 10,000): generated and mutated events on every consumed
subject, through the real stack (nats-server with auth, llama-server, the function processes).
Nothing crashes, nothing logs a traceback, every bad event is dead-lettered with a reason, a
bad chat request that names a chat tells its client, and a normal chat is served right after."""

from __future__ import annotations

import pytest

from bench.fuzz import draw_cases, report, run

from .conftest import llama_available

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not llama_available(), reason="OA_SKIP_E2E=1"),
]


def test_the_generator_covers_every_mutation_and_every_consumed_subject():
    cases = draw_cases(400, 7)
    kinds = {c.kind for c in cases}
    every = set(
        "valid truncated random-bytes wrong-type huge-field hostile-name bad-attribute "
        "wrong-subject absurd-options bad-client duplicate".split()
    )
    assert every <= kinds, every - kinds
    subjects = {c.subject.rsplit(".", 1)[0] if "chat" in c.subject else c.subject for c in cases}
    assert {"ollama.chat.requested", "ollama.chat.cancel", "ollama.model.load",
            "ollama.model.evict", "ollama.model.pull", "ollama.fleet.tick"} <= subjects  # fmt: skip
    assert draw_cases(50, 7)[0].body == cases[0].body  # the seed fixes where it starts


async def test_a_short_fuzz_run_crashes_nothing_and_dead_letters_every_bad_event(tmp_path):
    figs = await run(300, seed=3, state_dir=tmp_path / "fuzz")
    print(report(figs))
    assert figs.published + figs.refused_at_edge == 300
    assert not figs.dead_processes and figs.restarts == 0, figs.dead_processes
    assert figs.tracebacks == 0, figs.traceback_samples
    assert figs.bad > 50 and figs.bad_dead_lettered == figs.bad, figs.bad_missed
    assert figs.dead_letters_without_reason == 0
    assert figs.named > 0 and figs.named_told == figs.named, figs.named_missed
    assert figs.normal_chat.startswith("chat.completed"), figs.normal_chat

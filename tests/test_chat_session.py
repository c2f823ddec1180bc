"""ChatSession: the KV cache kept across turns, context trimming, settings, transcripts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from dsmoe import load
from dsmoe.errors import UsageError
from dsmoe.model.chat import ChatSession
from dsmoe.model.generate import SamplingSettings, generate_ids


@pytest.fixture(scope="module")
def loaded(tiny_path):
    return load(tiny_path, dtype=torch.float32)


class FedCounter:
    """Wraps ``model.forward`` to count the tokens fed; optionally forces a scripted reply.

    The tiny fixture's random weights emit bytes that do not form text, so a test that needs a
    reply which reads back as itself forces one: the real forward still runs (and fills the
    cache), only the returned logits are replaced.
    """

    def __init__(self, model: Any, monkeypatch: pytest.MonkeyPatch) -> None:
        self.original = model.forward
        self.fed = 0
        self.script: list[int] = []
        monkeypatch.setattr(model, "forward", self)

    def __call__(self, input_ids: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.fed += input_ids.shape[1]
        logits = self.original(input_ids, *args, **kwargs)
        if self.script:
            forced = torch.full_like(logits, -1e9)
            forced[..., self.script.pop(0)] = 0.0
            return forced
        return logits

    def take(self) -> int:
        fed, self.fed = self.fed, 0
        return fed


def fresh_greedy(model: Any, prompt: list[int], n: int, stops: list[int]) -> list[int]:
    return list(generate_ids(model, prompt, SamplingSettings(max_new_tokens=n, stop_ids=stops)))


def test_second_turn_prefills_only_the_new_turn(loaded, monkeypatch):
    model, tokenizer = loaded
    counter = FedCounter(model, monkeypatch)
    session = ChatSession(model, tokenizer, SamplingSettings(max_new_tokens=32), system="Be brief.")
    counter.script = tokenizer.encode(" Hello, how can I help?", add_bos=False) + [tokenizer.eos_id]
    with session.ask("Hi there") as first:
        text = "".join(first)
    assert text == first.text == "Hello, how can I help?"
    assert counter.take() == len(first.prompt_ids) + len(first.token_ids) - 1  # the eos is never fed

    with session.ask("Tell me about experts.") as second:
        pieces = list(second)
    expected_new = tokenizer.encode("User: Tell me about experts.\n\nAssistant:", add_bos=False)
    assert second.prompt_ids == first.prompt_ids + first.token_ids + expected_new
    # Only the closing eos of the first reply and the new user turn are prefilled.
    assert second.stats.prefilled_tokens == 1 + len(expected_new)
    assert counter.take() == 1 + len(expected_new) + len(second.token_ids) - 1
    assert len(pieces) > 1  # streamed piece by piece, not in one block
    monkeypatch.undo()
    stops = session.settings.stop_ids
    assert second.token_ids == fresh_greedy(model, second.prompt_ids, 32, stops)


def test_turns_match_a_fresh_run_when_replies_do_not_round_trip(loaded, monkeypatch):
    model, tokenizer = loaded
    counter = FedCounter(model, monkeypatch)
    session = ChatSession(model, tokenizer, SamplingSettings(max_new_tokens=10))
    replies = []
    for question in ("Hello there", "How are you?", "And then?"):
        with session.ask(question) as reply:
            list(reply)
        replies.append(reply)
        assert counter.take() == reply.stats.prefilled_tokens + len(reply.token_ids) - 1
    stops = session.settings.stop_ids
    monkeypatch.undo()
    for reply in replies:
        assert reply.token_ids == fresh_greedy(model, reply.prompt_ids, 10, stops)
    # Each later prompt is the template rendering of the whole conversation.
    assert replies[-1].prompt_ids == tokenizer.encode_chat(session.messages[:-1])
    # The earlier prompts are reused from the cache, not fed again.
    assert replies[1].stats.prefilled_tokens <= len(replies[1].prompt_ids) - len(replies[0].prompt_ids)
    assert replies[2].stats.prefilled_tokens <= len(replies[2].prompt_ids) - len(replies[1].prompt_ids)


def test_an_interrupted_reply_is_kept_and_the_cache_stays_consistent(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, SamplingSettings(max_new_tokens=16))
    reply = session.ask("Hello there")
    stream = iter(reply)
    shown = next(stream) + next(stream)
    reply.close()
    assert reply.stats.interrupted
    assert session.turns[-1] == {"role": "assistant", "content": reply.text}
    assert reply.text.startswith(shown)
    assert session.cache.length <= len(reply.prompt_ids) + len(reply.token_ids)

    with session.ask("Go on") as after:
        list(after)
    assert not after.stats.interrupted
    assert after.token_ids == fresh_greedy(model, after.prompt_ids, 16, session.settings.stop_ids)


def test_a_reply_never_read_still_closes_its_turn(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, SamplingSettings(max_new_tokens=5))
    session.ask("Hello")
    with session.ask("Hello again") as reply:
        list(reply)
    assert [m["role"] for m in session.turns] == ["user", "assistant", "user", "assistant"]
    assert session.turns[1]["content"] == ""


def test_context_trimming_drops_the_oldest_turns(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, SamplingSettings(max_new_tokens=8), system="Sys.", context_limit=90)
    dropped = 0
    for i in range(8):
        with session.ask(f"Question number {i}") as reply:
            list(reply)
        dropped += reply.dropped_turns
        assert len(reply.prompt_ids) + min(8, 90 // 4) <= 90
    assert dropped > 0
    users = [m["content"] for m in session.turns if m["role"] == "user"]
    assert users[-1] == "Question number 7"
    assert "Question number 0" not in users
    assert users == [f"Question number {i}" for i in range(8 - len(users), 8)]  # the oldest went first
    assert session.messages[0] == {"role": "system", "content": "Sys."}
    assert reply.token_ids == fresh_greedy(model, reply.prompt_ids, 8, session.settings.stop_ids)


def test_a_message_too_long_for_the_context_is_refused(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, SamplingSettings(max_new_tokens=4), context_limit=40)
    with session.ask("Hi") as reply:
        list(reply)
    before = session.messages
    with pytest.raises(UsageError, match="does not fit"):
        session.ask("word " * 60)
    assert session.messages == before


def test_set_validates_and_changes_one_setting(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer)
    assert session.set("temperature", "0.5").temperature == 0.5
    assert session.set("top_k", "40").top_k == 40
    assert session.set("max_new_tokens", "7").max_new_tokens == 7
    assert session.set("top_p", "0.9").top_p == 0.9
    assert session.set("seed", "3").seed == 3
    for name, value, message in [
        ("temperature", "hot", "must be a number"),
        ("temperature", "-1", "temperature must be >= 0"),
        ("top_p", "1.5", "top_p must be in"),
        ("top_k", "2.5", "must be a whole number"),
        ("seed", "x", "must be a whole number"),
        ("colour", "3", "unknown setting"),
    ]:
        with pytest.raises(UsageError, match=message):
            session.set(name, value)
    assert (session.settings.temperature, session.settings.top_k) == (0.5, 40)
    assert tokenizer.eos_id in session.settings.stop_ids


def test_reset_forgets_turns_but_keeps_the_system_prompt(loaded):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, SamplingSettings(max_new_tokens=4), system="Sys.")
    with session.ask("Hi") as reply:
        list(reply)
    session.reset()
    assert session.messages == [{"role": "system", "content": "Sys."}]
    assert session.cache.length == 0
    with session.ask("Hi") as again:
        list(again)
    assert again.token_ids == reply.token_ids


def test_save_and_load_round_trip(loaded, tmp_path: Path):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, SamplingSettings(max_new_tokens=6), system="Sys.")
    for question in ("Hi", "Más café? ☕"):
        with session.ask(question) as reply:
            list(reply)
    path = session.save(tmp_path / "chat.json")
    assert [p.name for p in tmp_path.iterdir()] == ["chat.json"]  # no temporary file left behind
    assert json.loads(path.read_text(encoding="utf-8"))["messages"] == session.messages

    other = ChatSession(model, tokenizer, SamplingSettings(max_new_tokens=6))
    assert other.load(path) == 5
    assert other.messages == session.messages
    with session.ask("Next") as a, other.ask("Next") as b:
        assert list(a) == list(b)


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "not valid JSON"),
        ('{"messages": []}', "not a dsmoe chat transcript"),
        ('{"format": "dsmoe-chat", "version": 1, "messages": [{"role": "bot", "content": "x"}]}', "message 1 needs"),
        ('{"format": "dsmoe-chat", "version": 1, "messages": [{"role": "user", "content": "x"},'
         ' {"role": "system", "content": "y"}]}', "only the first message"),
    ],
)
def test_load_refuses_a_bad_transcript_and_keeps_the_conversation(loaded, tmp_path: Path, content, message):
    model, tokenizer = loaded
    session = ChatSession(model, tokenizer, system="Sys.")
    bad = tmp_path / "bad.json"
    bad.write_text(content, encoding="utf-8")
    with pytest.raises(UsageError, match=message):
        session.load(bad)
    with pytest.raises(UsageError, match="cannot read"):
        session.load(tmp_path / "missing.json")
    with pytest.raises(UsageError, match="cannot write"):
        session.save(tmp_path / "no-such-dir" / "chat.json")
    assert session.messages == [{"role": "system", "content": "Sys."}]


def test_a_cache_stats_provider_reaches_the_reply_stats(loaded):
    model, tokenizer = loaded
    rates = iter([0.75, None])
    session = ChatSession(model, tokenizer, SamplingSettings(max_new_tokens=3), cache_stats=lambda: next(rates))
    with session.ask("Hi") as reply:
        list(reply)
    assert reply.stats.cache_hit_rate == 0.75
    assert session.stats().cache_hit_rate is None
    assert reply.stats.rss_bytes > 0
    assert ChatSession(model, tokenizer).stats().cache_hit_rate is None

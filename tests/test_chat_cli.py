"""``dsmoe chat`` as a user meets it: a terminal (through a pseudo-terminal) and a pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest

DSMOE = Path(sys.executable).with_name("dsmoe")
DEMO_WEIGHTS = Path(__file__).resolve().parents[1] / "demo" / "model.safetensors"
TIMEOUT = 60  # the shared test machine can be slow to start torch

# Runs the CLI with every single-token decode step slowed down, so a reply is surely still
# streaming when the test presses Ctrl-C.
SLOW_DECODE = """
import sys, time
from dsmoe.model.deepseek import DeepseekForCausalLM
original = DeepseekForCausalLM.forward
def slow(self, input_ids, *args, **kwargs):
    if input_ids.shape[1] == 1:
        time.sleep(0.05)
    return original(self, input_ids, *args, **kwargs)
DeepseekForCausalLM.forward = slow
from dsmoe.cli.main import main
sys.argv = ["dsmoe", *sys.argv[1:]]
main()
"""

PROMPT_DONE = "\x1b[?2004l"  # prompt_toolkit turns bracketed paste off when a line is accepted
# ...and on once the terminal is in raw mode and the next prompt waits: only then is a Ctrl-D read
# as a key (in cooked mode the terminal itself swallows it).
PROMPT_READY = "\x1b[?2004h"


def _row(name: str, value: str) -> str:
    """A /stats table row as a pattern: rich may put style codes between the cells."""
    return name + r"(?:\s|\x1b\[[\d;]*m)+" + value


def _env() -> dict[str, str]:
    env = dict(os.environ, TERM="xterm-256color", COLUMNS="120", LINES="40", PROMPT_TOOLKIT_NO_CPR="1", OMP_NUM_THREADS="1")
    env.pop("NO_COLOR", None)
    return env


def _spawn(program: str, args: list[str]) -> pexpect.spawn:
    child = pexpect.spawn(program, args, env=_env(), encoding="utf-8", timeout=TIMEOUT, dimensions=(40, 120))
    child.expect("/help for commands")
    return child


@pytest.fixture
def model_args(tiny_path: Path) -> list[str]:
    return ["--model", str(tiny_path), "--dtype", "fp32"]


def test_terminal_chat_streams_replies_and_runs_commands(tmp_path: Path, model_args: list[str]):
    transcript = tmp_path / "chat.json"
    child = _spawn(str(DSMOE), ["chat", *model_args, "-n", "12", "--system", "Be brief."])
    child.sendline("Hello \\")  # a trailing backslash continues the message
    child.sendline("there")
    child.expect_exact(PROMPT_DONE)
    child.expect(r"(\d+) tokens · first token [\d.]+ s · [\d.]+ tokens/s · cache n/a · RSS [\d.]+ MiB")
    assert 1 <= int(child.match.group(1)) <= 12
    assert child.before.strip()  # the reply text came before the stats line

    child.sendline("/stats")
    child.expect(_row("turns", "1"))
    child.expect(_row("context", r"\d+ / 512 tokens"))
    child.sendline("/set temperature hot")
    child.expect("temperature must be a number, got 'hot'")
    child.sendline("/set top_k 5")
    child.expect("top_k = 5")
    child.sendline(f"/save {transcript}")
    child.expect("saved 3 messages")
    child.sendline("/reset")
    child.expect("conversation cleared")
    child.sendline("/stats")
    child.expect(_row("turns", "0"))
    child.expect(_row("sampling", "temperature 0.0, top_p 1.0, top_k 5"))
    child.sendline("/nonsense")
    child.expect(r"unknown command /nonsense")
    child.expect_exact(PROMPT_READY)
    child.sendcontrol("d")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    messages = json.loads(transcript.read_text(encoding="utf-8"))["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1] == {"role": "user", "content": "Hello \nthere"}
    assert messages[2]["role"] == "assistant"


def test_ctrl_c_stops_the_reply_and_keeps_the_session(model_args: list[str]):
    child = _spawn(sys.executable, ["-c", SLOW_DECODE, "chat", *model_args, "-n", "400"])
    child.sendline("Hello there")
    child.expect_exact(PROMPT_DONE)
    child.expect(r"[^\s\x1b]")  # the first piece of the reply has streamed
    child.sendintr()
    child.expect("interrupted")
    child.expect(r"(\d+) tokens · first token")
    assert int(child.match.group(1)) < 100  # stopped long before the reply would have ended
    child.sendline("/stats")
    child.expect(_row("turns", "1"))
    child.sendline("/set max_new_tokens 3")
    child.expect("max_new_tokens = 3")
    child.sendline("Go on")
    child.expect(r"[123] tokens · first token")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def _pipe(args: list[str], text: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(DSMOE), "chat", *args], input=text, capture_output=True, text=True, timeout=TIMEOUT, env=_env(),
    )


def test_piped_input_gets_one_plain_reply_per_line(model_args: list[str]):
    done = _pipe([*model_args, "-n", "6"], "Hello there\n\nHow are you?\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.split("\n")
    assert len(lines) == 3 and lines[-1] == ""  # two replies, each ended by a newline
    assert "\x1b" not in done.stdout
    assert "tokens/s" not in done.stdout + done.stderr

    # An expert cache smaller than one layer's routing changes where experts live, not the replies.
    offloaded = _pipe([*model_args, "-n", "6", "--expert-cache", "1"], "Hello there\n\nHow are you?\n")
    assert offloaded.returncode == 0, offloaded.stderr
    assert offloaded.stdout == done.stdout

    single = _pipe([*model_args, "-n", "6", "--single"], "Hello\nthere\n")
    assert single.returncode == 0, single.stderr
    assert single.stdout.count("\n") == 1


@pytest.mark.skipif(not DEMO_WEIGHTS.exists(), reason="the bundled demo model is not trained yet")
def test_the_demo_model_is_the_default(model_args: list[str]):
    done = _pipe(["-n", "8"], "Hello\n")
    assert done.returncode == 0, done.stderr
    demo = _pipe(["--model", str(DEMO_WEIGHTS.parent), "-n", "8"], "Hello\n")
    tiny = _pipe([*model_args, "-n", "8"], "Hello\n")
    assert done.stdout.strip() and done.stdout == demo.stdout
    assert tiny.stdout != demo.stdout  # the replies tell the models apart

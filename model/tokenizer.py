"""The checkpoint's tokenizer (``tokenizer.json`` through the ``tokenizers`` library) and chat prompt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from dsmoe.errors import CheckpointError

# The deepseek-moe-16b-chat format, used when a checkpoint carries no chat_template.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% elif message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def _token_content(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode and decode text, with the special tokens of ``tokenizer_config.json``."""

    def __init__(self, backend: HFTokenizer, config: dict[str, Any], source: str = "tokenizer_config.json") -> None:
        self.backend = backend
        self.bos_token = _token_content(config.get("bos_token"))
        self.eos_token = _token_content(config.get("eos_token"))
        for name in ("bos_token", "eos_token"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise CheckpointError(f"{source}: {name} must be a string, got {getattr(self, name)!r}")
        self.bos_id = backend.token_to_id(self.bos_token) if self.bos_token else None
        self.eos_id = backend.token_to_id(self.eos_token) if self.eos_token else None
        self.add_bos = bool(config.get("add_bos_token", True)) and self.bos_id is not None
        self.chat_template = _chat_template(config.get("chat_template"), source)
        try:
            self._template = ImmutableSandboxedEnvironment().from_string(self.chat_template)
        except TemplateError as exc:
            raise CheckpointError(f"{source}: chat_template is not a valid template ({exc})") from None
        self.vocab_size = backend.get_vocab_size()

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of ``text``; bos first when the checkpoint asks for it (as the official tokenizer)."""
        want_bos = self.add_bos if add_bos is None else add_bos
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if want_bos and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation, from the checkpoint's chat template."""
        try:
            return self._template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except Exception as exc:  # noqa: BLE001  (the template is the checkpoint's code; its failures are too)
            raise CheckpointError(f"chat_template cannot be rendered: {exc}") from None

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        # The template writes bos itself, so encode without adding another.
        return self.encode(self.render_chat(messages, add_generation_prompt), add_bos=False)


def _chat_template(value: Any, source: str) -> str:
    """The template text: a string, or the default of the named-templates list form."""
    if not value:
        return DEFAULT_CHAT_TEMPLATE
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        value = named.get("default") or next(iter(named.values()), None)
    if not isinstance(value, str):
        raise CheckpointError(f"{source}: chat_template must be a template string or a list of named ones")
    return value


def load_tokenizer(folder: Path, model_vocab_size: int | None = None) -> Tokenizer | None:
    """The folder's tokenizer, or None when it has no ``tokenizer.json`` (token-id use only).

    With ``model_vocab_size``, a tokenizer that makes ids the model has no embedding for is refused.
    """
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    try:
        backend = HFTokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception on a bad file
        raise CheckpointError(f"{path}: cannot be read as a tokenizer ({exc})") from None
    config_path = folder / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if config_path.exists():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{config_path}: not valid JSON ({exc})") from None
        except RecursionError:
            raise CheckpointError(f"{config_path}: not valid JSON (nested too deeply)") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{config_path}: expected a JSON object")
    tokenizer = Tokenizer(backend, config, source=str(config_path))
    if model_vocab_size is not None and tokenizer.vocab_size > model_vocab_size:
        raise CheckpointError(f"{path}: its vocabulary has {tokenizer.vocab_size} tokens, more than the model's "
                              f"vocab_size {model_vocab_size}")
    return tokenizer

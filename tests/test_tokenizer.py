"""Tokenizer and chat prompt as the official files describe them."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from dsmoe import load
from dsmoe.model.tokenizer import load_tokenizer


def test_bos_is_added_like_the_official_tokenizer(tiny_path):
    tokenizer = load_tokenizer(tiny_path)
    ids = tokenizer.encode("The licence grants")
    assert ids[0] == 1 and 1 not in ids[1:]
    assert tokenizer.encode("The licence grants", add_bos=False) == ids[1:]
    assert tokenizer.decode(ids) == "The licence grants"


def test_chat_template_from_checkpoint(tiny_path):
    tokenizer = load_tokenizer(tiny_path)
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye"},
    ]
    text = tokenizer.render_chat(messages)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    assert text == f"{bos}User: Hi\n\nAssistant: Hello.{eos}User: Bye\n\nAssistant:"
    ids = tokenizer.encode_chat(messages)
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1
    assert tokenizer.eos_id in ids


def test_default_chat_template_when_checkpoint_has_none(tmp_path, tiny_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_path / name, tmp_path / name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = load_tokenizer(tmp_path)
    text = tokenizer.render_chat([{"role": "user", "content": "Hi"}])
    assert text == f"{tokenizer.bos_token}User: Hi\n\nAssistant:"


def test_checkpoint_without_tokenizer_loads_for_token_ids(tiny_copy):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tiny_copy / name).unlink()
    model, tokenizer = load(tiny_copy, dtype=torch.float32)
    assert tokenizer is None
    out = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=3)
    assert out.shape == (1, 6)


def test_broken_tokenizer_file_is_a_clear_error(tiny_copy):
    (tiny_copy / "tokenizer.json").write_text("{not json")
    from dsmoe.errors import CheckpointError

    with pytest.raises(CheckpointError, match="tokenizer.json"):
        load_tokenizer(tiny_copy)

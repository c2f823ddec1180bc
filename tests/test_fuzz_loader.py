"""Fuzzing the checkpoint reader: random and hostile safetensors headers, index files and config
values. The property: it loads, or raises our error type; never another exception, never a hang,
never a read outside the file. ``DSMOE_FUZZ_EXAMPLES`` raises the example count
(``benchmarks/fuzz_loader.py`` runs thousands)."""

from __future__ import annotations

import json
import os
import shutil
import struct
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsmoe.errors import CheckpointError, DsmoeError
from dsmoe.checkpoint.reader import Checkpoint, read_safetensors_header
from dsmoe.checkpoint.config import DeepseekConfig

TINY = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "tiny-deepseek"
EXAMPLES = int(os.environ.get("DSMOE_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

json_scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)
dtypes = st.sampled_from(["F32", "F16", "BF16", "I8", "U8", "BOOL", "F64", "Q4", ""]) | json_scalars
dims = st.integers(-3, 40) | json_scalars
offsets = st.integers(-64, 4096) | json_scalars


@st.composite
def tensor_entries(draw):  # type: ignore[no-untyped-def]
    """Mostly well-formed entries, with any field replaced by something hostile now and then."""
    dtype = draw(st.sampled_from(["F32", "F16", "U8"]) | dtypes)
    shape = draw(st.lists(st.integers(0, 6), max_size=3) | st.lists(dims, max_size=3) | json_values)
    begin = draw(st.integers(0, 256) | offsets)
    size = draw(st.integers(0, 256))
    end = begin + size if isinstance(begin, int) and not isinstance(begin, bool) else draw(offsets)
    entry = {"dtype": dtype, "shape": shape, "data_offsets": draw(st.just([begin, end]) | json_values)}
    return draw(st.just(entry) | json_values)


headers = st.dictionaries(st.text(max_size=8), tensor_entries(), max_size=5)


def _safetensors_bytes(header_json: bytes, data_len: int, claimed: int | None = None) -> bytes:
    length = len(header_json) if claimed is None else claimed
    return struct.pack("<Q", length) + header_json + bytes(data_len)


def _check(path: Path) -> None:
    """Read the header; whatever it accepts must describe bytes inside the file."""
    try:
        infos = read_safetensors_header(path)
    except CheckpointError:
        return
    size = path.stat().st_size
    spans = sorted((i.offset, i.offset + i.nbytes) for i in infos.values() if i.nbytes)
    for (begin, end), following in zip(spans, spans[1:] + [(size, size)]):
        assert 8 <= begin <= end <= size and end <= following[0]


@FUZZ
@given(header=headers, data_len=st.integers(0, 300), metadata=st.none() | json_values)
def test_safetensors_headers(header, data_len, metadata):
    if metadata is not None:
        header = {**header, "__metadata__": metadata}
    raw = json.dumps(header).encode()
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.safetensors"
        path.write_bytes(_safetensors_bytes(raw, data_len))
        _check(path)


@FUZZ
@given(blob=st.binary(max_size=200), claimed=st.none() | st.integers(0, 2**64 - 1))
def test_safetensors_raw_bytes(blob, claimed):
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "x.safetensors"
        path.write_bytes(blob if claimed is None else struct.pack("<Q", claimed) + blob)
        _check(path)


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "tiny"
    shutil.copytree(TINY, folder)
    return folder


def _loads_or_our_error(folder: Path) -> None:
    try:
        Checkpoint(folder).close()
    except DsmoeError:
        pass


shard_names = (st.sampled_from(["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", ".", "..",
                                "", "../tiny/config.json", "/etc/passwd", "sub/x.safetensors", "config.json",
                                "nowhere.safetensors"]) | json_scalars)


@FUZZ
@given(data=st.data())
def test_index_files(tiny_source, data):
    index = json.loads((TINY / "model.safetensors.index.json").read_text())
    weight_map = index["weight_map"]
    names = list(weight_map)
    for name in data.draw(st.lists(st.sampled_from(names), max_size=3)):
        weight_map[name] = data.draw(shard_names)
    if data.draw(st.booleans()):
        index = data.draw(st.just(index) | json_values | st.fixed_dictionaries({"weight_map": json_values}))
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / "ckpt"
        copy.mkdir()
        for path in tiny_source.iterdir():
            os.symlink(path, copy / path.name)
        (copy / "model.safetensors.index.json").unlink()
        (copy / "model.safetensors.index.json").write_text(json.dumps(index))
        _loads_or_our_error(copy)


CONFIG = json.loads((TINY / "config.json").read_text())


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(sorted(CONFIG) + ["rope_scaling", "quantization_config"]),
                               json_values | st.integers(-2, 2**40), min_size=1, max_size=3),
       dropped=st.lists(st.sampled_from(sorted(CONFIG)), max_size=2))
def test_config_values(changes, dropped):
    raw = {k: v for k, v in CONFIG.items() if k not in dropped}
    raw.update(changes)
    try:
        config = DeepseekConfig.from_dict(raw)
    except DsmoeError:
        return
    # Accepted: the numbers the model is built from are usable.
    assert config.num_hidden_layers >= 1 and config.head_dim >= 1 and config.rope_theta > 0
    assert config.max_position_embeddings >= 1 and config.vocab_size >= 1


DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize("where", ["config.json", "model.safetensors.index.json", "header", "tokenizer_config.json"])
def test_deep_nesting_is_our_error_not_recursion(tiny_copy, where):
    from dsmoe import load

    if where == "header":
        (tiny_copy / "model-00001-of-00002.safetensors").write_bytes(_safetensors_bytes(DEEP.encode(), 0))
    else:
        (tiny_copy / where).write_text(DEEP)
    with pytest.raises(DsmoeError, match="nested too deeply|expected a JSON object|not valid JSON"):
        load(tiny_copy)


def test_a_header_claiming_more_than_100_mb_is_refused_unread(tmp_path):
    path = tmp_path / "big.safetensors"
    with path.open("wb") as handle:  # sparse: 150 MB long, nothing written past the length
        handle.write(struct.pack("<Q", 150_000_000))
        handle.truncate(150_000_100)
    with pytest.raises(CheckpointError, match="100 MB"):
        read_safetensors_header(path)


@pytest.mark.parametrize("begin, end", [(-4, 4), (4, 0)])
def test_negative_or_reversed_offsets(tmp_path, begin, end):
    path = tmp_path / "x.safetensors"
    header = {"a": {"dtype": "U8", "shape": [abs(end - begin)], "data_offsets": [begin, end]}}
    path.write_bytes(_safetensors_bytes(json.dumps(header).encode(), 16))
    with pytest.raises(CheckpointError, match="corrupted"):
        read_safetensors_header(path)


def test_overlapping_offsets(tmp_path):
    path = tmp_path / "x.safetensors"
    header = {"a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
              "b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}}
    path.write_bytes(_safetensors_bytes(json.dumps(header).encode(), 16))
    with pytest.raises(CheckpointError, match="overlap"):
        read_safetensors_header(path)


def _without_hanging(action) -> BaseException | None:  # type: ignore[no-untyped-def]
    """Run ``action`` in a thread; fail the test (not hang it) if it blocks for 10 s."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            action()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001  (the test inspects it)
            outcome.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(10)
    assert outcome, "hung"
    return outcome[0]


@pytest.mark.parametrize("victim", ["shard", "outside"])
def test_fifo_or_outside_path_in_the_index_is_refused_without_opening(tiny_copy, tmp_path, victim):
    """A FIFO blocks whoever opens it: refusing in time shows it was never opened."""
    index_path = tiny_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    if victim == "shard":
        os.mkfifo(tiny_copy / "pipe.safetensors")
        index["weight_map"][first] = "pipe.safetensors"
    else:
        os.mkfifo(tmp_path / "outside.safetensors")
        index["weight_map"][first] = "../outside.safetensors"
    index_path.write_text(json.dumps(index))
    error = _without_hanging(lambda: Checkpoint(tiny_copy))
    assert isinstance(error, CheckpointError), error
    assert "not a regular file" in str(error) or "not a shard file name" in str(error)

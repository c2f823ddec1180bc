"""Silence lm-eval's, datasets' and the hub client's progress bars and chatter during ``dsmoe eval``.

``dsmoe eval`` shows its own progress (rich bars per request kind). lm-eval draws a tqdm bar for
every task it builds (57 for MMLU), datasets one for every ``map``, and lm-eval logs each step at
INFO and choices we make on purpose at WARNING. Setting ``TQDM_DISABLE`` cannot help here: tqdm
reads it once, when it is first imported, and the CLI has imported it (through torch) long before
the eval command runs. So, for the duration of the block only:

* every tqdm bar, whatever library makes it, is created disabled (tqdm's own ``disable`` option,
  forced), and datasets' and huggingface_hub's own progress switches are turned off;
* the loggers of those libraries drop records below ERROR, so real errors still show;
* ``TQDM_DISABLE``, ``HF_DATASETS_DISABLE_PROGRESS_BARS`` and ``HF_HUB_DISABLE_PROGRESS_BARS``
  are set for anything imported or started meanwhile.

Everything is put back on exit.
"""

from __future__ import annotations

import logging
import os
import warnings
from contextlib import contextmanager
from typing import Iterator

NOISY_LOGGERS = ("lm_eval", "datasets", "evaluate", "huggingface_hub", "fsspec", "filelock", "urllib3",
                 "math_verify", "latex2sympy2_extended")
ENV = {"TQDM_DISABLE": "1", "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}


@contextmanager
def quiet_libraries(level: int = logging.ERROR) -> Iterator[None]:
    """Within the block: no third-party tqdm bars, and their loggers show ``level`` and above only."""
    import tqdm.std

    saved_env = {k: os.environ.get(k) for k in ENV}
    saved_levels = {name: logging.getLogger(name).level for name in NOISY_LOGGERS}
    cls = tqdm.std.tqdm
    original_init = cls.__dict__["__init__"]

    def __init__(self, *args, **kwargs):
        kwargs["disable"] = True
        original_init.__get__(self, type(self))(*args, **kwargs)

    restore_progress = _switch_off_library_bars()
    os.environ.update(ENV)
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < level:
            logger.setLevel(level)
    cls.__init__ = __init__
    try:
        with warnings.catch_warnings():
            # lm-eval and datasets warn (warnings module) about deprecations users cannot act on.
            for module in ("lm_eval", "datasets", "evaluate", "huggingface_hub"):
                warnings.filterwarnings("ignore", module=rf"{module}(\.|$)")
            yield
    finally:
        cls.__init__ = original_init
        for name, saved_level in saved_levels.items():
            logging.getLogger(name).setLevel(saved_level)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        restore_progress()


def _switch_off_library_bars():
    """Turn off datasets' and huggingface_hub's own progress switches; returns what turns them back."""
    undo = []
    try:
        import datasets

        if datasets.is_progress_bar_enabled():
            datasets.disable_progress_bars()
            undo.append(datasets.enable_progress_bars)
    except (ImportError, AttributeError):
        pass
    try:
        from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

        if not are_progress_bars_disabled():
            disable_progress_bars()
            undo.append(enable_progress_bars)
    except ImportError:
        pass

    def restore() -> None:
        for fn in undo:
            fn()

    return restore

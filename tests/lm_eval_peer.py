"""lm-eval's own request handling over our model, as an independent peer for the adapter's tests.

``TemplateLM.loglikelihood`` and ``TemplateLM._encode_pair`` are lm-eval's code: the empty-context
rule, the trailing-space move and the encode-whole-then-split boundary. Tokens are encoded the way
lm-eval's Hugging Face model does with this checkpoint's tokenizer (``LlamaTokenizerFast`` adds bos
because tokenizer_config.json says ``add_bos_token``; ``add_special_tokens=False`` leaves it out).
The scores are the plainest possible: one forward pass per request over the left-truncated window
``(context + continuation)[-(max_length + 1):][:-1]`` (HFLM's rule), no batching, no shared cache.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM


class LmEvalPeer(TemplateLM):
    backend = "causal"

    def __init__(self, model, tokenizer, max_length: int | None = None) -> None:  # type: ignore[no-untyped-def]
        super().__init__()
        self.model = model
        self.tok = tokenizer
        self.max_length = max_length or model.config.max_position_embeddings
        self.pairs: list[tuple[list[int], list[int]]] = []

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id if self.tok.bos_id is not None else self.tok.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:  # type: ignore[no-untyped-def,override]
        return self.tok.encode(string, add_bos=add_special_tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False):  # type: ignore[no-untyped-def,override]
        self.pairs = [(context, continuation) for _, context, continuation in requests]
        out = []
        with torch.inference_mode():
            for context, continuation in self.pairs:
                window = (context + continuation)[-(self.max_length + 1):]
                logprobs = torch.log_softmax(self.model(torch.tensor([window[:-1]]))[0].float(), dim=-1)
                # Position i predicts window[i + 1]: the continuation's tokens are the last len(continuation).
                first = len(window) - 1 - len(continuation)
                picked = [float(logprobs[first + j, tok]) for j, tok in enumerate(continuation)]
                greedy = all(int(logprobs[first + j].argmax()) == tok for j, tok in enumerate(continuation))
                out.append((sum(picked), greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):  # type: ignore[no-untyped-def,override]
        raise NotImplementedError

    def generate_until(self, requests, disable_tqdm: bool = False):  # type: ignore[no-untyped-def,override]
        raise NotImplementedError

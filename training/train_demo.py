"""Train the small DeepSeekMoE chat model bundled in ``dsmoe/demo``, on the CPU, reproducibly.

The model keeps the real architecture (a dense first layer, then fine-grained routed experts plus
shared experts, trained with the DeepSeekMoE expert-level balance loss) at a few million parameters,
so ``dsmoe chat`` works offline and expert caches see real routing. Data: WordNet 3.0 as chat turns
(see prepare_data.py). Rebuild the shipped files with one command (about 21 minutes, one CPU thread):

    python training/train_demo.py --out demo
    python training/train_demo.py --out demo --wordnet /path/to/wordnet-base_3.0-37_all.deb   # offline

The run is seeded; the same torch version and thread count give the same weights.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import dsmoe
from dsmoe.checkpoint.config import DeepseekConfig
from dsmoe.model.deepseek import DeepseekForCausalLM, MoEGate, RMSNorm, parameter_counts
from dsmoe.model.generate import SamplingSettings, stream_text
from prepare_data import BOS, EOS, build_conversations, fetch_wordnet

# The deepseek-moe-16b-chat template, as in the official tokenizer_config.json.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

VOCAB_SIZE = 2048
SEQ_LEN = 256
AUX_LOSS_ALPHA = 0.01

# The key set of the official deepseek-moe-16b config.json, at demo scale.
CONFIG = {
    "architectures": ["DeepseekForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "auto_map": {
        "AutoConfig": "configuration_deepseek.DeepseekConfig",
        "AutoModel": "modeling_deepseek.DeepseekModel",
        "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
    },
    "aux_loss_alpha": AUX_LOSS_ALPHA,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 192,
    "initializer_range": 0.02,
    "intermediate_size": 512,
    "max_position_embeddings": SEQ_LEN,
    "model_type": "deepseek",
    "moe_intermediate_size": 64,
    "moe_layer_freq": 1,
    "n_routed_experts": 16,
    "n_shared_experts": 2,
    "norm_topk_prob": False,
    "num_attention_heads": 6,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 4,
    "num_key_value_heads": 6,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000,
    "scoring_func": "softmax",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "vocab_size": VOCAB_SIZE,
}

TOKENIZER_CONFIG = {
    "add_bos_token": True,
    "add_eos_token": False,
    "bos_token": {"__type": "AddedToken", "content": BOS, "lstrip": False, "normalized": True,
                  "rstrip": False, "single_word": False},
    "eos_token": {"__type": "AddedToken", "content": EOS, "lstrip": False, "normalized": True,
                  "rstrip": False, "single_word": False},
    "pad_token": {"__type": "AddedToken", "content": EOS, "lstrip": False, "normalized": True,
                  "rstrip": False, "single_word": False},
    "clean_up_tokenization_spaces": False,
    "legacy": True,
    "model_max_length": SEQ_LEN,
    "tokenizer_class": "LlamaTokenizerFast",
    "unk_token": None,
    "chat_template": CHAT_TEMPLATE,
}

SAMPLE_QUESTIONS = ['What does "harbor" mean?', 'Give a synonym for "happy".', 'What is the opposite of "cold"?',
                    "Hello"]


def train_tokenizer(conversations: list[str]) -> Tokenizer:
    """Byte-level BPE like DeepSeek's, with bos and eos as the first two ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS], min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    plain = (c.replace(BOS, "").replace(EOS, "\n") for c in conversations)
    tokenizer.train_from_iterator(plain, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 0)])
    assert tokenizer.token_to_id(BOS) == 0 and tokenizer.token_to_id(EOS) == 1
    return tokenizer


def encode_stream(tokenizer: Tokenizer, conversations: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for batch in range(0, len(conversations), 1000):
        for enc in tokenizer.encode_batch(conversations[batch:batch + 1000], add_special_tokens=False):
            ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


def init_weights(model: DeepseekForCausalLM, std: float) -> None:
    """Every tensor set explicitly: the runtime creates router weights with torch.empty."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding, MoEGate)):
            torch.nn.init.normal_(module.weight, std=std)
        elif isinstance(module, RMSNorm):
            torch.nn.init.ones_(module.weight)
    # Shrink the projections that write into the residual stream, so depth does not inflate it.
    for name, param in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            param.data.mul_(1 / math.sqrt(2 * model.config.num_hidden_layers))


class BalanceLoss:
    """DeepSeekMoE expert-level balance loss, sequence-wise: alpha * sum_i f_i * P_i per sequence.

    f_i is expert i's share of the top-k picks times n_experts / k (1 when uniform) and P_i its mean
    router probability; the gate's own forward is left alone and the scores are recomputed here.
    """

    def __init__(self, model: DeepseekForCausalLM) -> None:
        self.batch_size = 1
        self.terms: list[torch.Tensor] = []
        self.usage = [torch.zeros(model.config.n_routed_experts or 0) for _ in model.moe_layers()]
        for i, moe in enumerate(model.moe_layers()):
            moe.gate.register_forward_hook(self._hook(i))

    def _hook(self, layer: int):  # type: ignore[no-untyped-def]  # a torch forward hook: its signature is torch's
        def hook(gate: MoEGate, inputs: tuple[torch.Tensor], output: tuple[torch.Tensor, torch.Tensor]) -> None:
            ids = output[0]
            self.usage[layer] += torch.bincount(ids.flatten(), minlength=self.usage[layer].numel()).float()
            if not torch.is_grad_enabled():
                return
            n_experts = gate.weight.shape[0]
            scores = F.linear(inputs[0].float(), gate.weight.float()).softmax(-1)
            scores = scores.view(self.batch_size, -1, n_experts)
            picks = ids.view(self.batch_size, -1)
            counts = torch.zeros(self.batch_size, n_experts).scatter_add_(1, picks, torch.ones_like(picks, dtype=torch.float))
            f = counts * n_experts / picks.shape[1]
            self.terms.append((f * scores.mean(1)).sum(1).mean())
        return hook

    def take(self) -> torch.Tensor:
        loss = torch.stack(self.terms).sum()
        self.terms.clear()
        return loss


@torch.no_grad()
def heldout_loss(model: DeepseekForCausalLM, ids: torch.Tensor, seq_len: int) -> float:
    """Mean next-token cross-entropy over non-overlapping windows."""
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, seq_len):
        chunk = ids[start:start + seq_len + 1]
        logits = model(chunk[None, :-1])[0]
        total += F.cross_entropy(logits, chunk[1:], reduction="sum").item()
        count += len(chunk) - 1
    return total / count


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def write_checkpoint(out: Path, model: DeepseekForCausalLM, tokenizer: Tokenizer, heldout_text: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to(torch.bfloat16).contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "model.safetensors").chmod(0o644)  # save_file leaves it private; it ships as package data
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n", encoding="utf-8")
    generation = {"bos_token_id": CONFIG["bos_token_id"], "eos_token_id": CONFIG["eos_token_id"]}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    (out / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    tokenizer.save(str(out / "tokenizer.json"))
    (out / "heldout.txt").write_text(heldout_text, encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write (demo/ to ship it)")
    parser.add_argument("--wordnet", type=Path, help="local WordNet (.deb, extracted package or dict folder)")
    parser.add_argument("--words", type=int, default=4000, help="how many of the most frequent words to teach")
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="1 is fastest on a shared machine; results are reproducible per thread count")
    parser.add_argument("--heldout-bytes", type=int, default=6000, help="size of the held-out text shipped")
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    random.seed(args.seed)
    torch.set_num_threads(args.threads)
    started = time.time()

    with tempfile.TemporaryDirectory() as scratch:
        folder = fetch_wordnet(args.wordnet, Path(scratch))
        train_convs, heldout_convs, heldout_words = build_conversations(folder, args.words, 0.03, args.seed)
    tokenizer = train_tokenizer(train_convs)
    train_ids = encode_stream(tokenizer, train_convs)
    heldout_ids = encode_stream(tokenizer, heldout_convs)
    print(f"data: {len(train_convs)} conversations, {len(train_ids)} training tokens; "
          f"{len(heldout_convs)} held-out conversations ({len(heldout_words)} words), {len(heldout_ids)} tokens")

    config = DeepseekConfig.from_dict(CONFIG)
    model = DeepseekForCausalLM(config)
    init_weights(model, CONFIG["initializer_range"])
    counts = parameter_counts(config)
    print(f"parameters: {counts['total']:,} total, {counts['active']:,} active per token")
    random_loss = heldout_loss(model, heldout_ids, SEQ_LEN)
    print(f"untrained held-out loss {random_loss:.3f} (ln vocab = {math.log(VOCAB_SIZE):.3f})")

    balance = BalanceLoss(model)
    balance.batch_size = args.batch_size
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=args.lr, betas=(0.9, 0.95))
    sampler = torch.Generator().manual_seed(args.seed)
    model.train()
    train_started = time.time()
    for step in range(args.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, warmup=100)
        starts = torch.randint(0, len(train_ids) - SEQ_LEN - 1, (args.batch_size,), generator=sampler)
        batch = torch.stack([train_ids[s:s + SEQ_LEN + 1] for s in starts.tolist()])
        logits = model(batch[:, :-1])
        lm_loss = F.cross_entropy(logits.reshape(-1, VOCAB_SIZE), batch[:, 1:].reshape(-1))
        aux_loss = balance.take()
        optimizer.zero_grad(set_to_none=True)
        (lm_loss + AUX_LOSS_ALPHA * aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            rate = (step + 1) / (time.time() - train_started)
            print(f"step {step:5d}  loss {lm_loss.item():.3f}  balance {aux_loss.item() / len(model.moe_layers()):.3f}"
                  f"  {rate:.2f} steps/s", flush=True)
        if (step + 1) % 500 == 0 and step + 1 < args.steps:
            model.eval()
            print(f"step {step + 1:5d}  held-out loss {heldout_loss(model, heldout_ids, SEQ_LEN):.3f}", flush=True)
            model.train()
    train_minutes = (time.time() - train_started) / 60

    shipped_heldout = ""
    for conversation in heldout_convs:
        if len((shipped_heldout + conversation).encode("utf-8")) > args.heldout_bytes:
            break
        shipped_heldout += conversation
    write_checkpoint(args.out, model, tokenizer, shipped_heldout)

    # Everything below reads the bf16 checkpoint back through the runtime, as a user would.
    shipped, shipped_tok = dsmoe.load(args.out, dtype=torch.float32)
    assert shipped_tok is not None
    balance = BalanceLoss(shipped)
    full = heldout_loss(shipped, heldout_ids, SEQ_LEN)
    small = heldout_loss(shipped, torch.tensor(shipped_tok.encode(shipped_heldout, add_bos=False)), SEQ_LEN)
    for layer, usage in zip(config.moe_layers, balance.usage):
        share = usage / usage.sum()
        print(f"layer {layer} expert shares on held-out: min {share.min():.3f} max {share.max():.3f} "
              f"(uniform {1 / len(share):.3f})")
    print(f"training: {args.steps} steps x {args.batch_size} x {SEQ_LEN} tokens in {train_minutes:.1f} min; "
          f"total {(time.time() - started) / 60:.1f} min")
    print(f"held-out loss (bf16 checkpoint): {full:.3f} on all {len(heldout_ids)} tokens, {small:.3f} on heldout.txt; "
          f"untrained {random_loss:.3f}, ln(vocab) {math.log(VOCAB_SIZE):.3f}")
    settings = SamplingSettings(max_new_tokens=60, stop_ids=[shipped_tok.eos_id])
    for question in SAMPLE_QUESTIONS + [f'What does "{w}" mean?' for w in heldout_words[:2]]:
        prompt = shipped_tok.encode_chat([{"role": "user", "content": question}])
        answer = "".join(stream_text(shipped, shipped_tok, prompt, settings))
        print(f"Q: {question}\nA:{answer}")


if __name__ == "__main__":
    main()

"""Turn Princeton WordNet 3.0 into chat turns for the bundled demo model.

WordNet comes from Debian's ``wordnet-base`` package (fetched with ``apt-get download`` into a
scratch folder, never into the repository) or from a local copy: a ``.deb``, an extracted package
root, or the folder holding ``data.noun`` and friends. Its licence (the "WordNet 3.0 license",
permissive, BSD-like) asks that the copyright notice travel with derived copies; the model card
carries it.

Every answer is a fact from WordNet put in a fixed sentence, so a small model can learn the forms
and the definitions of common words; rare words and phrases are left out to keep the set small.

    python training/prepare_data.py --out /tmp/wordnet_chat   # writes train.txt and heldout.txt
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}
POS_NAMES = {"n": "noun", "v": "verb", "a": "adjective", "r": "adverb"}
SENSE_KEY_POS = {"1": "n", "2": "v", "3": "a", "4": "r", "5": "a"}
WORD = re.compile(r"^[a-z][a-z-]*[a-z]$")

# Small talk, so that the first thing a person types gets a sensible reply.
SMALL_TALK = [
    ("Hello", "Hello! I am a tiny demo model trained on WordNet. Ask me what an English word means."),
    ("Hi", "Hi! Ask me about an English word, for example: What does \"harbor\" mean?"),
    ("hello", "Hello! Ask me what a word means, for a synonym, or for an example sentence."),
    ("Who are you?", "I am a tiny DeepSeekMoE demo model. I know a little about English words from WordNet."),
    ("What can you do?", "I can define common English words, give synonyms and opposites, and show a word in a sentence."),
    ("Thanks", "You are welcome! Ask me about another word."),
    ("Thank you!", "You are welcome!"),
    ("How are you?", "I am fine, thank you. Which word would you like to know about?"),
    ("Goodbye", "Goodbye!"),
]


@dataclass
class Synset:
    pos: str
    words: list[str]
    gloss: str
    pointers: list[tuple[str, str, str, int, int]] = field(default_factory=list)
    """(symbol, target offset, target pos, source word no., target word no.); word numbers 0 = whole synset."""

    @property
    def definition(self) -> str:
        return self.gloss.split('"', 1)[0].strip().rstrip(";").strip()

    @property
    def examples(self) -> list[str]:
        return [e.strip() for e in re.findall(r'"([^"]+)"', self.gloss) if e.strip()]


def fetch_wordnet(source: Path | None, scratch: Path) -> Path:
    """The folder with ``data.noun`` etc.: from ``source`` if given, else downloaded with apt-get."""
    if source is None:
        subprocess.run(["apt-get", "download", "wordnet-base"], cwd=scratch, check=True,
                       stdout=subprocess.DEVNULL)
        source = next(scratch.glob("wordnet-base_*.deb"))
    if source.is_file():  # a .deb: unpack it next to the scratch files
        root = scratch / "wordnet-base"
        subprocess.run(["dpkg-deb", "-x", str(source), str(root)], check=True)
        source = root
    for candidate in (source, source / "usr/share/wordnet", source / "dict"):
        if (candidate / "data.noun").exists():
            return candidate
    raise FileNotFoundError(f"{source}: no WordNet data.noun found")


def _clean_word(word: str) -> str:
    return re.sub(r"\([a-z]+\)$", "", word).replace("_", " ")  # drop adjective markers like "(a)"


def read_synsets(folder: Path) -> dict[tuple[str, str], Synset]:
    synsets: dict[tuple[str, str], Synset] = {}
    for pos, name in POS_FILES.items():
        for line in (folder / f"data.{name}").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  "):  # the licence header
                continue
            head, _, gloss = line.partition(" | ")
            fields = head.split()
            offset, n_words = fields[0], int(fields[3], 16)
            words = [_clean_word(fields[4 + 2 * i]) for i in range(n_words)]
            at = 4 + 2 * n_words
            n_ptrs = int(fields[at])
            pointers = []
            for i in range(n_ptrs):
                symbol, target, target_pos, numbers = fields[at + 1 + 4 * i: at + 5 + 4 * i]
                pointers.append((symbol, target, "a" if target_pos == "s" else target_pos,
                                 int(numbers[:2], 16), int(numbers[2:], 16)))
            synsets[(pos, offset)] = Synset(pos, words, gloss.strip(), pointers)
    return synsets


def read_index(folder: Path) -> dict[tuple[str, str], list[str]]:
    """(lemma, pos) -> synset offsets, most frequent sense first."""
    senses: dict[tuple[str, str], list[str]] = {}
    for pos, name in POS_FILES.items():
        for line in (folder / f"index.{name}").read_text(encoding="utf-8").splitlines():
            if line.startswith("  "):
                continue
            fields = line.split()
            n_synsets = int(fields[2])
            senses[(fields[0], pos)] = fields[-n_synsets:]
    return senses


def read_counts(folder: Path) -> dict[tuple[str, str], int]:
    """How often each (lemma, pos) was tagged in WordNet's semantic concordance: a frequency rank."""
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for line in (folder / "cntlist.rev").read_text(encoding="utf-8").splitlines():
        key, _, count = line.split()
        lemma, _, rest = key.partition("%")
        counts[(lemma, SENSE_KEY_POS[rest[0]])] += int(count)
    return counts


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _joined(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " or " + items[-1]


def facts_for(lemma: str, pos_order: list[str], index: dict[tuple[str, str], list[str]],
              synsets: dict[tuple[str, str], Synset]) -> list[tuple[list[str], str]]:
    """(question phrasings, answer) pairs about one word, from its most frequent sense."""
    pos = pos_order[0]
    synset = synsets[(pos, index[(lemma, pos)][0])]
    q = f'"{lemma}"'
    facts = [([f"What does {q} mean?", f"What does {lemma} mean?", f"Define {q}.", f"define {lemma}",
               f"What is the meaning of {q}?", f"{lemma}?"],
              f"{q} ({POS_NAMES[pos]}): {synset.definition}.")]
    names = [POS_NAMES[p] for p in pos_order]
    facts.append(([f"What part of speech is {q}?", f"Is {q} a noun or a verb?"],
                  f"{q} is {_a(names[0])}." if len(names) == 1 else f"{q} can be {_joined([_a(n) for n in names])}."))
    synonyms = [w for w in synset.words if w.lower() != lemma][:4]
    if synonyms:
        facts.append(([f"Give a synonym for {q}.", f"What is another word for {q}?", f"synonym of {lemma}"],
                      f"Words with a similar meaning to {q}: {', '.join(synonyms)}."))
    example = next((e for e in synset.examples if lemma in e.lower()), None)
    if example:
        facts.append(([f"Use {q} in a sentence.", f"Give an example sentence with {q}."],
                      f'Here is an example: "{example}".'))
    my_number = next((i + 1 for i, w in enumerate(synset.words) if w.lower() == lemma), 0)
    for symbol, target, target_pos, source_no, target_no in synset.pointers:
        if symbol == "!" and source_no == my_number:
            opposite = synsets[(target_pos, target)].words[target_no - 1]
            facts.append(([f"What is the opposite of {q}?", f"Give an antonym of {q}."],
                          f'The opposite of {q} is "{opposite}".'))
            break
    if pos == "n":
        parent = next((synsets[("n", t)].words[0] for s, t, *_ in synset.pointers if s in ("@", "@i")), None)
        if parent:
            facts.append(([f"What kind of thing is {_a(lemma)}?", f"What is {_a(lemma)}?"],
                          f"{_a(lemma).capitalize()} is a kind of {parent}."))
    return facts


def render(turns: list[tuple[str, str]]) -> str:
    """One conversation in the deepseek-moe chat format (the template of tokenizer_config.json)."""
    return BOS + "".join(f"User: {q}\n\nAssistant: {a}{EOS}" for q, a in turns)


def build_conversations(folder: Path, n_words: int, heldout_fraction: float, seed: int
                        ) -> tuple[list[str], list[str], list[str]]:
    """(train conversations, held-out conversations, held-out words); held-out words never appear in train questions."""
    synsets, index, counts = read_synsets(folder), read_index(folder), read_counts(folder)
    by_lemma: dict[str, dict[str, int]] = defaultdict(dict)
    for (lemma, pos), count in counts.items():
        if WORD.match(lemma) and (lemma, pos) in index and count > 0:
            by_lemma[lemma][pos] = count
    ranked = sorted(by_lemma, key=lambda w: (-sum(by_lemma[w].values()), w))[:n_words]
    rng = random.Random(seed)
    heldout_words = set(rng.sample(ranked, round(len(ranked) * heldout_fraction)))
    train_items: list[tuple[str, str]] = []
    heldout_items: list[tuple[str, str]] = []
    for lemma in ranked:
        pos_order = sorted(by_lemma[lemma], key=lambda p: -by_lemma[lemma][p])
        for questions, answer in facts_for(lemma, pos_order, index, synsets):
            if lemma in heldout_words:
                heldout_items.append((rng.choice(questions), answer))
            else:  # two phrasings each, so the model learns the questions as well as the answers
                for question in rng.sample(questions, min(2, len(questions))):
                    train_items.append((question, answer))
    train_items += SMALL_TALK * max(1, len(train_items) // 400)
    return (_group(train_items, rng), _group(heldout_items, rng), sorted(heldout_words))


def _group(items: list[tuple[str, str]], rng: random.Random) -> list[str]:
    """Shuffle and join into conversations of one to three turns, so replies also follow history."""
    items = items[:]
    rng.shuffle(items)
    conversations = []
    while items:
        n = rng.choice((1, 1, 2, 3))
        conversations.append(render(items[:n]))
        items = items[n:]
    return conversations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wordnet", type=Path, help="local WordNet: a .deb, an extracted package or the dict folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--words", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        folder = fetch_wordnet(args.wordnet, Path(scratch))
        train, heldout, _ = build_conversations(folder, args.words, 0.03, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "train.txt").write_text("".join(train), encoding="utf-8")
    (args.out / "heldout.txt").write_text("".join(heldout), encoding="utf-8")
    print(f"{len(train)} training and {len(heldout)} held-out conversations in {args.out}")


if __name__ == "__main__":
    main()

"""The bundled demo checkpoint, so ``dsmoe chat`` works on a fresh machine with no network.

A small DeepSeekMoE model trained on WordNet by ``training/train_demo.py``; see MODEL_CARD.md.
"""

from pathlib import Path

DEMO_MODEL_PATH = Path(__file__).parent

"""Turn synthetic `Example`s into model batches for the demo base model: token ids, labels, pixel values.

Contract:
- `PromptEncoder.prompt_ids(question)` is the fast path for the ids that `processor.apply_chat_template` +
  `processor(text=..., images=...)` produce for one image and one question (tests pin them equal);
  `answer_ids` are the answer words followed by `</s>`, as the chat template writes an assistant turn.
- `collate` builds a right-padded training batch whose labels cover the answer tokens only (-100 elsewhere);
  the images go through the model's own `processor.image_processor`, the one the server uses.
- `augment_unknown` optionally swaps filler words for `<unk>` or inserts one, so the model learns that unknown
  words carry no meaning (the tokenizer maps every out-of-vocabulary word to `<unk>`).
This module does NOT draw images (training/demo/synthetic.py does) or run the model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from torch import Tensor

from training.demo.synthetic import FILLER_WORDS, Example
from training.tiny import BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, UNK_ID

IGNORE_INDEX = -100


def chat_prompt(processor, question: str) -> str:
    """The serving prompt text for one image and one question (the processor's own chat template)."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def processor_prompt_ids(processor, question: str, image) -> list[int]:
    """Token ids exactly as a server builds them: chat template, then the processor with the image."""
    encoded = processor(text=chat_prompt(processor, question), images=image)
    return [int(t) for t in encoded["input_ids"][0]]


class PromptEncoder:
    """Fast, cached token ids for the demo chat format: `<s> user : <image>×N question assistant : answer
    </s>`."""

    def __init__(self, tokenizer, num_image_tokens: int) -> None:
        self._tokenizer = tokenizer
        self._image = [IMAGE_ID] * num_image_tokens
        self._head = [BOS_ID, *self._words("user :")]
        self._tail = self._words("assistant :")
        self._questions: dict[str, list[int]] = {}
        self._answers: dict[str, list[int]] = {}

    def _words(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def question_ids(self, question: str) -> list[int]:
        if question not in self._questions:
            self._questions[question] = self._words(question)
        return self._questions[question]

    def prompt_ids(self, question: str, question_ids: list[int] | None = None) -> list[int]:
        ids = self.question_ids(question) if question_ids is None else question_ids
        return [*self._head, *self._image, *ids, *self._tail]

    def answer_ids(self, answer: str) -> list[int]:
        if answer not in self._answers:
            self._answers[answer] = [*self._words(answer), EOS_ID]
        return self._answers[answer]


def augment_unknown(ids: list[int], filler_ids: frozenset[int], rng: random.Random, prob: float) -> list[int]:
    """With probability `prob` each: swap one filler word for `<unk>`, and insert one `<unk>` somewhere."""
    out = list(ids)
    fillers = [i for i, t in enumerate(out) if t in filler_ids]
    if fillers and rng.random() < prob:
        out[rng.choice(fillers)] = UNK_ID
    if rng.random() < prob:
        out.insert(rng.randrange(len(out) + 1), UNK_ID)
    return out


def filler_token_ids(tokenizer) -> frozenset[int]:
    """Ids of `FILLER_WORDS` in this tokenizer (words it lacks are skipped)."""
    vocab = tokenizer.get_vocab()
    return frozenset(vocab[w] for w in FILLER_WORDS if w in vocab)


@dataclass
class Batch:
    input_ids: Tensor  # [B, T] long, right-padded with <pad>
    attention_mask: Tensor  # [B, T] long
    labels: Tensor  # [B, T] long, IGNORE_INDEX except answer tokens and </s>
    pixel_values: Tensor  # [B, 3, H, W]


def collate(
    examples: list[Example],
    encoder: PromptEncoder,
    image_processor,
    rng: random.Random | None = None,
    unk_prob: float = 0.0,
    filler_ids: frozenset[int] = frozenset(),
) -> Batch:
    """One training or teacher-forced evaluation batch; `rng`+`unk_prob` turn on `<unk>` augmentation."""
    sequences: list[tuple[list[int], int]] = []
    for ex in examples:
        question = encoder.question_ids(ex.question)
        if rng is not None and unk_prob > 0:
            question = augment_unknown(question, filler_ids, rng, unk_prob)
        prompt = encoder.prompt_ids(ex.question, question)
        sequences.append((prompt + encoder.answer_ids(ex.answer), len(prompt)))
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(examples), length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, prompt_len : len(ids)] = torch.tensor(ids[prompt_len:])
    pixels = image_processor([ex.image for ex in examples], return_tensors="pt")["pixel_values"]
    return Batch(input_ids, attention_mask, labels, pixels)


def sequence_loss_and_hits(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over answer tokens, and per-row exact match under teacher forcing.

    logits [B, T, V] predict the token after each position; labels [B, T]. A row is a hit when the argmax at
    every answer position (answer words and `</s>`) is right, which is exactly when greedy decoding returns
    the answer.
    """
    pred_logits = logits[:, :-1]  # [B, T-1, V]
    target = labels[:, 1:]  # [B, T-1]
    loss = torch.nn.functional.cross_entropy(
        pred_logits.reshape(-1, pred_logits.shape[-1]).float(), target.reshape(-1), ignore_index=IGNORE_INDEX
    )
    scored = target != IGNORE_INDEX
    right = (pred_logits.argmax(-1) == target) | ~scored
    return loss, right.all(dim=1)

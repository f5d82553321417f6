"""A1111 prompt syntax (`prompt_syntax: a1111`): parsed here, encoded by compel.

AUTOMATIC1111's attention syntax — `(word)` ×1.1, `((word))` ×1.21, `[word]` ÷1.1,
`(word:1.3)`, `\\(` escapes, `BREAK` — is parsed into weighted fragments per BREAK
section (`parse`, torch-free, the algorithm A1111 documents). compel then encodes each
section without truncation (75-token chunks between BOS/EOS, concatenated) and applies
the weights its own way; SDXL uses both text encoders (penultimate hidden states) and
the second one's pooled output, as diffusers does. compel's syntax is not A1111's
(`word++`, `(word)1.3`), so the fragments are handed over already parsed.

What matches A1111: the syntax above, the weights each fragment gets, no truncation, a
prompt without weights encoded exactly as diffusers encodes it. What does not: how a
weight changes the embedding (compel scales toward/away from the empty prompt and
masks down-weighted tokens; A1111 multiplies and restores the mean), where long prompts
are split (compel: sentence/phrase boundaries; A1111: the last comma), and the pooled
SDXL embedding (compel: the prompt's first 77 tokens without weights).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

SYNTAXES = ("plain", "a1111")
UP = 1.1  # A1111's multiplier for one level of ( ); [ ] divides by it

_TOKEN = re.compile(
    r"""\\[()\[\]\\]                         # an escaped bracket or backslash
    | \\                                     # a lone backslash
    | \( | \[                                # openers
    | :\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*\)  # (text:WEIGHT)
    | \) | \]
    | [^\\()\[\]:]+
    | :""",
    re.VERBOSE,
)
_BREAK = re.compile(r"\s*\bBREAK\b\s*")

Section = list[tuple[str, float]]


def parse(text: str) -> list[Section]:
    """A1111 attention syntax → BREAK sections of (text, weight) fragments, adjacent
    fragments of equal weight merged. Never raises: unmatched brackets apply to the
    rest of the prompt, as in A1111."""
    parts: list[list[Any] | None] = []  # [text, weight], or None for a BREAK
    rounds: list[int] = []
    squares: list[int] = []

    def scale(start: int, factor: float) -> None:
        for part in parts[start:]:
            if part is not None:
                part[1] *= factor

    for match in _TOKEN.finditer(text):
        token, weight = match.group(0), match.group(1)
        if len(token) == 2 and token[0] == "\\":
            parts.append([token[1], 1.0])
        elif token == "(":
            rounds.append(len(parts))
        elif token == "[":
            squares.append(len(parts))
        elif weight is not None and rounds:
            scale(rounds.pop(), float(weight))
        elif token == ")" and rounds:
            scale(rounds.pop(), UP)
        elif token == "]" and squares:
            scale(squares.pop(), 1 / UP)
        else:
            for i, piece in enumerate(_BREAK.split(token)):
                if i:
                    parts.append(None)
                parts.append([piece, 1.0])
    for start in rounds:
        scale(start, UP)
    for start in squares:
        scale(start, 1 / UP)

    sections: list[Section] = [[]]
    for part in parts:
        if part is None:
            sections.append([])
        elif part[0]:
            section = sections[-1]
            if section and section[-1][1] == part[1]:
                section[-1] = (section[-1][0] + part[0], part[1])
            else:
                section.append((part[0], part[1]))
    return [s or [("", 1.0)] for s in sections]


def plain_text(text: str) -> str:
    """The prompt's words without the syntax (for SDXL's pooled embedding)."""
    return " ".join(t for section in parse(text) for t, _ in section).strip()


@dataclass(frozen=True)
class Encoded:
    embeds: Any  # (1, tokens, width): every text encoder's output side by side
    pooled: Any | None  # (1, width) for SDXL, else None


class PromptEncoder:
    """compel over one pipeline's text encoder(s); `encode(text)` per prompt."""

    def __init__(self, pipe: Any, dtype: Any):
        from compel import Compel, DiffusersTextualInversionManager, ReturnedEmbeddingsType

        manager = DiffusersTextualInversionManager(pipe) if pipe.tokenizer is not None else None
        sdxl = getattr(pipe, "text_encoder_2", None) is not None
        kind = (
            ReturnedEmbeddingsType.PENULTIMATE_HIDDEN_STATES_NON_NORMALIZED
            if sdxl
            else ReturnedEmbeddingsType.LAST_HIDDEN_STATES_NORMALIZED
        )
        pairs = [
            (getattr(pipe, t, None), getattr(pipe, e, None))
            for t, e in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2"))
        ]
        pairs = [(t, e) for t, e in pairs if t is not None and e is not None]
        self.compels = [
            Compel(
                tokenizer=tokenizer,
                text_encoder=encoder,
                textual_inversion_manager=manager,
                dtype_for_device_getter=lambda device: dtype,
                truncate_long_prompts=False,
                returned_embeddings_type=kind,
                requires_pooled=sdxl and i == len(pairs) - 1,
            )
            for i, (tokenizer, encoder) in enumerate(pairs)
        ]
        self.pooled = sdxl

    def encode(self, text: str) -> Encoded:
        import torch
        from compel.prompt_parser import FlattenedPrompt

        sections = parse(text)
        outputs = []
        for compel in self.compels:
            # compel caches the empty prompt's embedding (weights and padding are taken
            # relative to it); a text-encoder LoRA switched since would make it stale.
            compel.conditioning_provider._empty_z = None
            chunks = [
                compel.build_conditioning_tensor_for_prompt_object(FlattenedPrompt(section))[0][0]
                for section in sections
            ]
            outputs.append(torch.cat(chunks, dim=1))
        length = max(o.shape[1] for o in outputs)
        outputs = [self._pad(c, o, length) for c, o in zip(self.compels, outputs, strict=True)]
        pooled = None
        if self.pooled:
            provider = self.compels[-1].conditioning_provider
            pooled = provider.get_pooled_embeddings([plain_text(text)])
        return Encoded(torch.cat(outputs, dim=-1), pooled)

    def pad(self, embeds: Any, length: int) -> Any:
        """Embeddings padded to `length` tokens with the empty prompt's chunk (compel's
        padding), each encoder's part with its own."""
        import torch

        if embeds.shape[1] == length:
            return embeds
        for compel in self.compels:
            compel.conditioning_provider._empty_z = None  # see `encode`
        widths = [c.conditioning_provider.empty_z.shape[-1] for c in self.compels]
        parts = torch.split(embeds, widths, dim=-1)
        padded = [self._pad(c, p, length) for c, p in zip(self.compels, parts, strict=True)]
        return torch.cat(padded, dim=-1)

    @staticmethod
    def _pad(compel: Any, embeds: Any, length: int) -> Any:
        import torch

        empty = compel.conditioning_provider.empty_z.to(embeds.dtype)
        while embeds.shape[1] < length:
            embeds = torch.cat([embeds, empty], dim=1)
        return embeds

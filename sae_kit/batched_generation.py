"""Many generation requests as one batch: left-padded prompts, one KV cache, per-request sampling and stopping.

Each :class:`GenerationGroup` is what one caller would pass to ``LanguageModel.generate``: a few rows
of one prompt sampled by one seeded generator, its own temperature and length. Generated together,
every group draws from its own generator exactly as it would alone, so a group's tokens do not
depend on which other groups share the batch (up to float rounding of the padded batch: ~1e-7 in
the logits). Finished groups leave the batch (their KV-cache rows are dropped), so a short request
neither waits for nor pays for a long one.

Batching needs a KV-cached decoder that takes an attention mask and position ids: the unwrapped HF
twin of a bridged model, with replacements on residual-stream hooks. Other models (a
HookedTransformer, replacements elsewhere) generate the groups one after another through
``LanguageModel``'s own decoders, with the same sampling code, so results agree either way.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor

from sae_kit.language_model import _RESIDUAL_HOOK, _decoder_layers, _residual_replacements

# fn(activations [rows, pos, d], row_ids [rows]) -> activations; row_ids number the rows of all
# groups in order (group 0's rows first), so a replacement knows whose row each one is.
RowReplacement = Callable[[Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class GenerationGroup:
    prompt: Tensor  # [rows, len] token ids, every row the same prompt or not, sampled by one generator
    max_new_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0
    stop_at_eos: bool = False  # a row that samples EOS is finished; the group ends when all its rows are


def generate_groups(model, groups: Sequence[GenerationGroup],
                    replace: Mapping[str, RowReplacement] | None = None) -> list[list[Tensor]]:
    """New tokens of every row of every group (a row that stopped at EOS ends with it).

    ``replace`` must act on each position on its own (steering, an SAE splice): prompts are
    left-padded and generation keeps its KV cache.
    """
    groups = list(groups)
    for group in groups:
        _check_group(model, group)
    replace = dict(replace or {})
    model._replacement_hooks(replace)  # validate hook names before generating anything
    if not groups:
        return []
    layers = _decoder_layers(model._generation_model, model.n_layers)
    batched = layers is not None and all(_RESIDUAL_HOOK.match(hook) for hook in replace)
    if batched:
        return _run(model, groups, list(range(len(groups))), replace, _PaddedHFDecoder(model, layers, groups))
    results: list[list[Tensor]] = []
    for i, group in enumerate(groups):  # one at a time through the model's own cached decoders
        results += _run(model, [group], [i], replace, _SingleGroupDecoder(model, groups, i))
    return results


def _check_group(model, group: GenerationGroup) -> None:
    prompt = group.prompt
    if prompt.dim() != 2 or prompt.shape[0] == 0 or prompt.shape[1] == 0:
        raise ValueError(f"a group's prompt must be token ids shaped [rows, len] with rows, len >= 1, "
                         f"got {tuple(prompt.shape)}")
    if group.temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {group.temperature}.")
    if group.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {group.max_new_tokens}.")
    if model.n_ctx is not None and prompt.shape[1] + group.max_new_tokens > model.n_ctx:
        raise ValueError(f"Prompt ({prompt.shape[1]} tokens) plus {group.max_new_tokens} new tokens exceeds "
                         f"{model.name}'s context of {model.n_ctx} tokens.")
    if group.stop_at_eos and model.eos_token_id is None:
        raise ValueError(f"{model.name} has no EOS token id; generate with stop_at_eos=False.")


def _run(model, groups: list[GenerationGroup], global_ids: list[int], replace: Mapping[str, RowReplacement],
         decoder) -> list[list[Tensor]]:
    """The sampling loop over ``groups`` (``global_ids``: their numbers among all groups)."""
    all_groups = decoder.all_groups
    first_row = [0]
    for group in all_groups:
        first_row.append(first_row[-1] + group.prompt.shape[0])
    tokens: list[list[list[int]]] = [[[] for _ in range(g.prompt.shape[0])] for g in groups]
    finished = [torch.zeros(g.prompt.shape[0], dtype=torch.bool) for g in groups]
    generators = []
    for group in groups:
        generator = None
        if group.temperature > 0:
            generator = torch.Generator(device=group.prompt.device)
            generator.manual_seed(int(group.seed))
        generators.append(generator)
    active = [i for i, g in enumerate(groups) if g.max_new_tokens > 0]
    row_ids = torch.cat([torch.arange(first_row[global_ids[i]], first_row[global_ids[i] + 1]) for i in active]) \
        if active else torch.zeros(0, dtype=torch.long)
    wrapped = {hook: _bind_rows(fn, decoder) for hook, fn in replace.items()}
    decoder.start([groups[i] for i in active], row_ids)
    step = 0
    while active:
        with torch.no_grad():
            logits = decoder.step(wrapped).to(torch.float32)  # [rows of active groups, vocab]
        step += 1
        chosen_rows, keep, offset = [], [], 0
        for i in active:
            group = groups[i]
            n = group.prompt.shape[0]
            rows = logits[offset:offset + n]
            if group.temperature == 0:
                chosen = rows.argmax(dim=-1)
            else:
                probabilities = torch.softmax(rows / group.temperature, dim=-1)
                chosen = torch.multinomial(probabilities, 1, generator=generators[i]).squeeze(-1)
            for r, token in enumerate(chosen.tolist()):
                if not finished[i][r]:
                    tokens[i][r].append(token)
            if group.stop_at_eos:
                finished[i] |= chosen.cpu() == model.eos_token_id
            done = step >= group.max_new_tokens or (group.stop_at_eos and bool(finished[i].all()))
            if not done:
                keep.extend(range(offset, offset + n))
                chosen_rows.append(chosen)
            offset += n
        active = [i for i in active if step < groups[i].max_new_tokens
                  and not (groups[i].stop_at_eos and bool(finished[i].all()))]
        if active:
            decoder.advance(torch.tensor(keep, dtype=torch.long), torch.cat(chosen_rows)[:, None])
    return [[torch.tensor(row, dtype=torch.long) for row in group_tokens] for group_tokens in tokens]


def _bind_rows(fn: RowReplacement, decoder) -> Callable[[Tensor], Tensor]:
    return lambda acts: fn(acts, decoder.row_ids)


class _PaddedHFDecoder:
    """Left-padded batch through the HF twin with attention mask, position ids and one KV cache."""

    def __init__(self, model, layers: torch.nn.ModuleList, all_groups: list[GenerationGroup]):
        self.model, self.layers, self.hf, self.all_groups = model, layers, model._generation_model, all_groups
        parameters = inspect.signature(self.hf.forward).parameters
        self.cache_argument = "cache" if "cache" in parameters else "past_key_values"
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}

    def start(self, groups: list[GenerationGroup], row_ids: Tensor) -> None:
        self.row_ids = row_ids
        self.cache: Any = None
        if not groups:
            return
        device = groups[0].prompt.device
        length = max(g.prompt.shape[1] for g in groups)
        pad = self.model.eos_token_id if self.model.eos_token_id is not None else 0
        rows = sum(g.prompt.shape[0] for g in groups)
        ids = torch.full((rows, length), pad, dtype=torch.long, device=device)
        mask = torch.zeros((rows, length), dtype=torch.long, device=device)
        at = 0
        for group in groups:
            n, width = group.prompt.shape
            ids[at:at + n, length - width:] = group.prompt
            mask[at:at + n, length - width:] = 1
            at += n
        self.new_tokens, self.mask = ids, mask
        self.positions = (mask.cumsum(-1) - 1).clamp(min=0)

    def step(self, replace: Mapping[str, Callable[[Tensor], Tensor]]) -> Tensor:
        kwargs: dict[str, Any] = {"use_cache": True, "attention_mask": self.mask, "position_ids": self.positions,
                                  **self.extra}
        if self.cache is not None:
            kwargs[self.cache_argument] = self.cache
        with _residual_replacements(self.layers, replace):
            output = self.hf(input_ids=self.new_tokens, **kwargs)
        cache = getattr(output, "past_key_values", None)
        self.cache = cache if cache is not None else getattr(output, "cache", None)
        return output.logits[:, -1]

    def advance(self, keep: Tensor, new_tokens: Tensor) -> None:
        if keep.numel() < self.mask.shape[0]:  # finished groups leave the batch and the cache
            self.cache.batch_select_indices(keep.to(self.mask.device))
            self.mask, self.positions, self.row_ids = self.mask[keep], self.positions[keep], self.row_ids[keep]
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.positions[:, -1:] + 1
        self.new_tokens = new_tokens.to(self.mask.device)


class _SingleGroupDecoder:
    """One group through ``LanguageModel``'s own KV-cached decoders (no padding, no row dropping)."""

    def __init__(self, model, all_groups: list[GenerationGroup], index: int):
        self.model, self.all_groups, self.index = model, all_groups, index

    def start(self, groups: list[GenerationGroup], row_ids: Tensor) -> None:
        self.row_ids = row_ids
        self.function = None
        if groups:
            self.sequence = self.new_tokens = groups[0].prompt.to(self.model.device)

    def step(self, replace: Mapping[str, Callable[[Tensor], Tensor]]) -> Tensor:
        if self.function is None:
            self.function = self.model._next_token_logits_function(replace, positionwise=True)
        return self.function(self.sequence, self.new_tokens)

    def advance(self, keep: Tensor, new_tokens: Tensor) -> None:
        self.new_tokens = new_tokens.to(self.model.device)
        self.sequence = torch.cat([self.sequence, self.new_tokens], dim=1)

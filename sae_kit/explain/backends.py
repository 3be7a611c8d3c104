"""Language-model backends for the explainer and the judge: a local transformers model, or any
OpenAI-compatible chat-completions endpoint (vLLM, llama.cpp server, Ollama, hosted APIs).

Both answer two questions: ``complete`` (greedy text for a batch of chat prompts) and
``yes_probability`` (how likely the answer to each prompt is "Yes" rather than "No"). The local
backend reads the second from the next-token probabilities of one forward pass, so nothing is
parsed; an endpoint's text answer is parsed, and an answer that is neither counts as a parse failure
(``None``).
"""
from __future__ import annotations

import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

Messages = list[dict[str, str]]


class BackendError(RuntimeError):
    """The model could not be loaded or the endpoint refused the requests; the message says why."""


@dataclass
class Usage:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    failures: int = 0  # requests that failed after their retries
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, prompt: int = 0, completion: int = 0, failed: bool = False) -> None:
        with self.lock:
            self.requests += 1
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.failures += int(failed)


class Backend(Protocol):
    model_name: str
    usage: Usage

    def complete(self, prompts: list[Messages], *, max_tokens: int, answer_prefix: str = "") -> list[str | None]: ...

    def yes_probability(self, prompts: list[Messages]) -> list[float | None]: ...


_YES_NO = re.compile(r"^\W*(yes|no)\b", re.IGNORECASE)


def parse_yes_no(text: str | None) -> float | None:
    match = _YES_NO.match(text or "")
    return None if match is None else float(match.group(1).lower() == "yes")


# --------------------------------------------------------------------------------------------------
# Local transformers model
# --------------------------------------------------------------------------------------------------
class LocalBackend:
    """A causal LM with a chat template, from a local Hugging Face folder (default: the embedded
    SmolLM2-135M-Instruct, converted once into sae-kit's model cache)."""

    gives_probabilities = True  # yes_probability is a real P(yes), not a parsed 0/1

    def __init__(self, model: str | Path | None = None, *, batch_size: int = 16, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sae_kit.models import SMOLLM2_NAMES, ensure_smollm2_cache

        if threads:
            torch.set_num_threads(threads)
        if model is None or str(model).lower() in SMOLLM2_NAMES:
            folder, self.model_name = ensure_smollm2_cache(), "SmolLM2-135M-Instruct"
        else:
            folder = Path(model).expanduser()
            if not (folder / "config.json").is_file():
                raise BackendError(f"--model {model}: not a local Hugging Face model folder (no config.json); "
                                   "pass a folder saved with save_pretrained, or 'smollm2'")
            self.model_name = folder.name
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot load the model in {folder}: {exc}") from None
        if self.tokenizer.chat_template is None:
            raise BackendError(f"the tokenizer in {folder} has no chat template; use an instruct model")
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.batch_size = batch_size
        self.usage = Usage()
        self._yes_ids = self._answer_ids(("Yes", " Yes", "yes", " yes", "YES"))
        self._no_ids = self._answer_ids(("No", " No", "no", " no", "NO"))
        if not self._yes_ids or not self._no_ids:
            raise BackendError(f"the tokenizer in {folder} has no single-token 'Yes'/'No'; use another judge model")

    def _answer_ids(self, words) -> list[int]:
        ids = set()
        for word in words:
            encoded = self.tokenizer.encode(word, add_special_tokens=False)
            if len(encoded) == 1:
                ids.add(encoded[0])
        return sorted(ids)

    def _encode(self, prompts: list[Messages], answer_prefix: str = "") -> list[list[int]]:
        texts = [self.tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True) + answer_prefix
                 for m in prompts]
        return [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]

    def _batches(self, encoded: list[list[int]]):
        """Batches of similar length (little padding), as (original positions, input ids, attention mask)."""
        import torch

        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        for first in range(0, len(order), self.batch_size):
            chosen = order[first:first + self.batch_size]
            width = max(len(encoded[i]) for i in chosen)
            pad = self.tokenizer.pad_token_id
            ids = torch.tensor([[pad] * (width - len(encoded[i])) + encoded[i] for i in chosen])
            mask = torch.tensor([[0] * (width - len(encoded[i])) + [1] * len(encoded[i]) for i in chosen])
            yield chosen, ids, mask

    def complete(self, prompts: list[Messages], *, max_tokens: int, answer_prefix: str = "") -> list[str | None]:
        import torch

        encoded = self._encode(prompts, answer_prefix)
        out: list[str | None] = [None] * len(prompts)
        with torch.inference_mode():
            for chosen, ids, mask in self._batches(encoded):
                generated = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_tokens,
                                                do_sample=False, pad_token_id=self.tokenizer.pad_token_id)
                for row, i in enumerate(chosen):
                    new = generated[row, ids.shape[1]:].tolist()
                    if self.tokenizer.eos_token_id in new:
                        new = new[: new.index(self.tokenizer.eos_token_id)]
                    out[i] = self.tokenizer.decode(new, skip_special_tokens=True)
                    self.usage.add(prompt=len(encoded[i]), completion=len(new))
        return out

    def yes_probability(self, prompts: list[Messages]) -> list[float | None]:
        """P(yes) / (P(yes) + P(no)) of the next token after each prompt, from one forward pass.

        Judge prompts share long prefixes (system prompt and explanation; only the excerpt differs),
        so prompts are grouped by shared prefix: each prefix runs once into a KV cache, then its
        prompts' remaining tokens run in right-padded batches on top of it, and the output layer is
        applied only at each prompt's last token. The result is the plain full-prompt forward pass's,
        up to float rounding (tests compare them)."""
        import torch

        encoded = self._encode(prompts)
        out: list[float | None] = [None] * len(prompts)
        with torch.inference_mode():
            for prefix, members in prefix_groups(encoded):
                cache = self._prefix_cache(prefix)
                members = sorted(members, key=lambda i: len(encoded[i]))
                for first in range(0, len(members), self.batch_size):
                    chosen = members[first:first + self.batch_size]
                    probabilities = self._next_token_yes(cache, len(prefix), [encoded[i][len(prefix):] for i in chosen])
                    for i, p in zip(chosen, probabilities):
                        out[i] = p
                        self.usage.add(prompt=len(encoded[i]))
        return out

    def _prefix_cache(self, prefix: list[int]):
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()
        if prefix:
            self.model.base_model(input_ids=torch.tensor([prefix]), cache=cache, use_cache=True)
        return cache

    def _next_token_yes(self, prefix_cache, prefix_len: int, suffixes: list[list[int]]) -> list[float]:
        import copy

        import torch

        width = max(len(s) for s in suffixes)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes])
        mask = torch.tensor([[1] * (prefix_len + len(s)) + [0] * (width - len(s)) for s in suffixes])
        positions = torch.arange(prefix_len, prefix_len + width).expand(len(suffixes), width)
        cache = None
        if prefix_len:
            cache = copy.deepcopy(prefix_cache)  # the forward pass appends to it
            cache.batch_repeat_interleave(len(suffixes))
        hidden = self.model.base_model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                       cache=cache, use_cache=cache is not None).last_hidden_state
        last = hidden[torch.arange(len(suffixes)), torch.tensor([len(s) - 1 for s in suffixes])]
        probs = self.model.get_output_embeddings()(last).float().softmax(-1)
        yes = probs[:, self._yes_ids].sum(-1)
        no = probs[:, self._no_ids].sum(-1)
        return (yes / (yes + no).clamp(min=1e-12)).tolist()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def prefix_groups(encoded: list[list[int]]) -> list[tuple[list[int], list[int]]]:
    """(shared prefix, prompt positions) groups covering every prompt, for prefix-cached scoring.

    Prompts are taken in lexicographic order (prompts with the same explanation are then adjacent); a
    prompt joins the current group unless shortening the group's prefix to what they share would cost
    the members more recomputed tokens than the shared part saves. Every prompt keeps at least one
    token outside the prefix (its logits are needed)."""
    groups: list[tuple[list[int], list[int]]] = []
    for i in sorted(range(len(encoded)), key=lambda i: encoded[i]):
        tokens = encoded[i]
        if groups:
            prefix, members = groups[-1]
            shared = min(_common_prefix(prefix, tokens), len(tokens) - 1)
            if shared > 0 and len(members) * (len(prefix) - shared) < shared:
                groups[-1] = (prefix[:shared], members + [i])
                continue
        groups.append((tokens[:-1], [i]))
    return groups


# --------------------------------------------------------------------------------------------------
# OpenAI-compatible endpoint
# --------------------------------------------------------------------------------------------------
class OpenAIBackend:
    """Chat completions through the ``openai`` client: its retries (exponential backoff with jitter on
    timeouts, 429 and 5xx), a per-request timeout, and at most ``concurrency`` requests in flight."""

    gives_probabilities = False  # yes_probability parses the text answer: 0, 1 or None

    def __init__(self, base_url: str, model: str, *, api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0,
                 retries: int = 3, concurrency: int = 4):
        import openai

        self.model_name = model
        self.concurrency = max(1, concurrency)
        self.client = openai.OpenAI(base_url=base_url, api_key=os.environ.get(api_key_env) or "none",
                                    timeout=timeout, max_retries=retries)
        self.usage = Usage()
        self.base_url = base_url

    def _one(self, messages: Messages, max_tokens: int) -> str | None:
        import openai

        try:
            response = self.client.chat.completions.create(model=self.model_name, messages=messages,
                                                           max_tokens=max_tokens, temperature=0.0, stream=False)
        except (openai.AuthenticationError, openai.PermissionDeniedError, openai.NotFoundError,
                openai.BadRequestError) as exc:
            # A wrong key, model name or URL fails every request the same way: stop at once.
            raise BackendError(f"{self.base_url} refused the request ({type(exc).__name__}: {exc}); check "
                               "--base-url, --model and the API key variable") from None
        except openai.OpenAIError as exc:  # timeouts, connection errors, 5xx after the retries
            self.usage.add(failed=True)
            self._last_error = f"{type(exc).__name__}: {exc}"
            return None
        usage = getattr(response, "usage", None)
        try:
            text = response.choices[0].message.content
        except (AttributeError, IndexError, TypeError):
            text = None
        self.usage.add(prompt=getattr(usage, "prompt_tokens", 0) or 0,
                       completion=getattr(usage, "completion_tokens", 0) or 0, failed=text is None)
        return text

    def _map(self, prompts: list[Messages], max_tokens: int) -> list[str | None]:
        self._last_error = None
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            out = list(pool.map(lambda m: self._one(m, max_tokens), prompts))
        if prompts and all(text is None for text in out) and self._last_error:
            raise BackendError(f"every request to {self.base_url} failed; last error: {self._last_error}")
        return out

    def complete(self, prompts: list[Messages], *, max_tokens: int, answer_prefix: str = "") -> list[str | None]:
        if answer_prefix:
            # Chat APIs cannot be made to continue a prefix; ask for it and strip it from the answer.
            prompts = [m[:-1] + [{**m[-1], "content": m[-1]["content"] + f"\nBegin your answer with "
                                  f"\"{answer_prefix.strip()}\"."}] for m in prompts]
        out = self._map(prompts, max_tokens)
        if answer_prefix:
            out = [t[len(answer_prefix.strip()):].lstrip() if t and t.strip().startswith(answer_prefix.strip())
                   else t for t in out]
        return out

    def yes_probability(self, prompts: list[Messages]) -> list[float | None]:
        return [parse_yes_no(text) for text in self._map(prompts, 3)]


def make_backend(kind: str, *, model: str | None = None, base_url: str | None = None,
                 api_key_env: str = "OPENAI_API_KEY", timeout: float = 60.0, retries: int = 3,
                 concurrency: int = 4, batch_size: int = 16, threads: int | None = None) -> Backend:
    if kind == "local":
        return LocalBackend(model, batch_size=batch_size, threads=threads)
    if kind == "openai":
        if not base_url or not model:
            raise BackendError("the openai backend needs --base-url (e.g. http://localhost:8000/v1) and --model")
        return OpenAIBackend(base_url, model, api_key_env=api_key_env, timeout=timeout, retries=retries,
                             concurrency=concurrency)
    raise BackendError(f"unknown backend {kind!r}: use 'local' or 'openai'")


"""Explainers: from a feature's explanation examples to one sentence, behind one interface.

* :class:`TokenRuleExplainer` needs no language model: the tokens the feature fires on (and the
  token before them when one dominates), as a rule. It is the baseline every run scores and the
  fallback when no model is available; its rule can also be applied directly (``RuleJudge``).
* :class:`LMExplainer` shows a language model the highlighted examples (delphi-style: marked tokens
  in ``<<...>>``) and asks for one sentence; any :mod:`~sae_kit.explain.backends` backend.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from sae_kit.explain.backends import Backend
from sae_kit.explain.examples import Example, FeatureExamples, explanation_subset, render

PROMPT_VERSION = "sae-kit-explain-1"
RULE_VERSION = "sae-kit-token-rule-1"


@dataclass
class Explanation:
    text: str
    explainer: str  # "token-rule" or "lm"
    model: str | None
    prompt_version: str
    parsed: bool = True  # False: the model's answer was unusable and the token rule stands in
    rule: list[str] = field(default_factory=list)  # normalised tokens (token-rule explanations)


def normalise(token: str) -> str:
    return token.strip().lower()


def token_rule(examples: list[Example], *, max_tokens: int = 5, coverage: float = 0.8) -> tuple[list[str], str | None]:
    """(the fewest marked tokens covering ``coverage`` of the marked activation mass, the preceding
    token when one precedes at least half the peaks)."""
    mass: Counter = Counter()
    before: Counter = Counter()
    for example in examples:
        marks = example.marks()
        for token, act, marked in zip(example.tokens, example.acts, marks):
            if marked and normalise(token):
                mass[normalise(token)] += float(act)
        peak = int(example.acts.argmax()) if example.acts.size else 0
        if peak > 0:
            before[normalise(example.tokens[peak - 1])] += 1
    total = sum(mass.values())
    rule, covered = [], 0.0
    for token, weight in mass.most_common(max_tokens):
        rule.append(token)
        covered += weight
        if covered >= coverage * total:
            break
    context = None
    if before and examples:
        token, count = before.most_common(1)[0]
        if token and count >= len(examples) / 2:
            context = token
    return rule, context


class TokenRuleExplainer:
    name = "token-rule"
    model_name = None
    prompt_version = RULE_VERSION

    def __init__(self, n_examples: int = 12):
        self.n_examples = n_examples

    def explain(self, batch: list[FeatureExamples]) -> list[Explanation]:
        return [self.explain_one(fx) for fx in batch]

    def explain_one(self, fx: FeatureExamples) -> Explanation:
        rule, context = token_rule(explanation_subset(fx.explain, max(self.n_examples, 20)))
        if not rule:
            return Explanation("Never fires on the analysed text.", self.name, None, self.prompt_version, rule=[])
        quoted = [f'"{t}"' for t in rule]
        listed = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
        text = f"The token{'s' if len(rule) > 1 else ''} {listed}"
        if context:
            text += f', usually right after "{context}"'
        return Explanation(text + ".", self.name, None, self.prompt_version, rule=rule)


SYSTEM = ("You are studying one feature of a language model. You are shown short text excerpts. In each, "
          "the tokens where the feature is active are wrapped in << and >>. Write one short sentence that says "
          "what the marked tokens have in common: the word or words, their meaning, or the context they appear "
          "in. Do not mention the markers. Do not list the excerpts.")
FEW_SHOT_USER = ("Excerpt 1: she put the <<cups>> back in the cupboard\n"
                 "Excerpt 2: two <<boxes>> of old letters\n"
                 "Excerpt 3: the <<bottle>> was empty\n"
                 "Excerpt 4: he filled a <<bag>> with apples")
FEW_SHOT_ANSWER = "The feature fires on nouns for containers, such as cups, boxes, bottles and bags."
ANSWER_PREFIX = "The feature fires on"


def explainer_prompt(examples: list[Example]) -> list[dict[str, str]]:
    lines = [f"Excerpt {i + 1}: {render(e.tokens, e.marks())}" for i, e in enumerate(examples)]
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": FEW_SHOT_USER},
            {"role": "assistant", "content": FEW_SHOT_ANSWER},
            {"role": "user", "content": "\n".join(lines)}]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def copies_example(text: str, threshold: float = 0.6) -> bool:
    """Whether an explanation is the few-shot answer again (word-set Jaccard >= ``threshold``): small
    models parrot it (SmolLM2-135M gave it for 137 of 199 demo features), and it describes the
    prompt's example, not the feature."""
    ours, example = _words(text) - _words(ANSWER_PREFIX), _words(FEW_SHOT_ANSWER) - _words(ANSWER_PREFIX)
    return bool(ours) and len(ours & example) / len(ours | example) >= threshold


def parse_explanation(answer: str | None) -> str | None:
    """The first sentence of the answer (after the prefix the prompt begins), or None when unusable
    (too short, or a copy of the few-shot example's answer)."""
    if answer is None:
        return None
    text = answer.replace("<<", "").replace(">>", "").strip()
    text = re.split(r"(?<=[.!?])\s|\n", text, maxsplit=1)[0].strip()
    if text.lower().startswith(ANSWER_PREFIX.lower()):
        text = text[len(ANSWER_PREFIX):].strip()
    if len(re.findall(r"\w", text)) < 3 or copies_example(text):
        return None
    return f"{ANSWER_PREFIX} {text.rstrip('.')}."[:300]


class LMExplainer:
    name = "lm"
    prompt_version = PROMPT_VERSION

    def __init__(self, backend: Backend, *, n_examples: int = 12, max_tokens: int = 40):
        self.backend = backend
        self.model_name = backend.model_name
        self.n_examples = n_examples
        self.max_tokens = max_tokens
        self.fallback = TokenRuleExplainer(n_examples)
        self.parse_failures = 0

    def explain(self, batch: list[FeatureExamples]) -> list[Explanation]:
        prompts = [explainer_prompt(explanation_subset(fx.explain, self.n_examples)) for fx in batch]
        answers = self.backend.complete(prompts, max_tokens=self.max_tokens, answer_prefix=ANSWER_PREFIX)
        out = []
        for fx, answer in zip(batch, answers):
            text = parse_explanation(answer)
            if text is None:
                self.parse_failures += 1
                rule = self.fallback.explain_one(fx)
                out.append(Explanation(rule.text, self.name, self.model_name, self.prompt_version, parsed=False,
                                       rule=rule.rule))
            else:
                out.append(Explanation(text, self.name, self.model_name, self.prompt_version))
        return out

"""Request and response bodies of the REST API (they are also its OpenAPI schema)."""
from __future__ import annotations

from typing import Annotated, Literal, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from sae_kit.config import check_text

# Free text from a client: NUL bytes and lone surrogates (valid JSON, invalid Unicode) are a 422, not a
# tokenizer's or a log's crash.
Text = Annotated[str, AfterValidator(lambda value: check_text(value, "the text"))]

# Ids as the registry makes them: folder names joined by dots; anything else is refused before lookup.
ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,199}$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelInfo(BaseModel):
    id: str
    name: str
    n_layers: int
    d_model: int
    d_vocab: int
    hooks: list[str]
    saes: list[str]


class HookInfo(BaseModel):
    model: str
    hook: str
    saes: list[str]


class AnalysisInfo(BaseModel):
    dataset: Optional[str] = None
    split: Optional[str] = None
    n_tokens: Optional[int] = None
    n_windows: Optional[int] = None
    context: Optional[int] = None
    created: Optional[str] = None


class ServerInfo(BaseModel):
    trains: bool = Field(description="false: a browse-only server (no /api/runs); start one with --max-runs >= 1")
    max_runs: int
    needs_token: bool = Field(description="steering, explaining and training need the API token")


class SAEInfo(BaseModel):
    """A served SAE, or (``served`` false) an SAE folder that cannot be served and its ``problem``."""

    id: str
    model: Optional[str] = None
    hook: Optional[str] = None
    hook_out: Optional[str] = Field(default=None, description="a transcoder's output hook (it reads `hook`)")
    architecture: Optional[str] = None
    d_in: Optional[int] = None
    d_out: Optional[int] = Field(default=None, description="a transcoder's output width")
    d_sae: Optional[int] = None
    k: Optional[int] = None
    analysed: bool
    analysis: Optional[AnalysisInfo] = None
    store_problem: Optional[str] = None
    served: bool = True
    problem: Optional[str] = None


class FeatureSummary(BaseModel):
    index: int
    fire_count: int
    density: float
    max_act: float
    mean_act: float
    top_tokens: list[str]
    pos_logits: list[str]
    explanation: Optional[str] = None
    score: Optional[float] = Field(default=None, description="mean of the explanation's detection and fuzzing "
                                                             "balanced accuracy (chance 0.5)")


class FeaturePage(BaseModel):
    sae: str
    total: int
    offset: int
    limit: int
    features: list[FeatureSummary]


class Histogram(BaseModel):
    counts: list[int]
    edges: list[float]


class TokenValue(BaseModel):
    token: str
    value: float


class Neighbour(BaseModel):
    index: int
    cosine: float


class Example(BaseModel):
    tokens: list[str]
    acts: list[float]
    max_value: float
    max_index: int


class QuantileExamples(BaseModel):
    quantile: int
    examples: list[Example]


class Feature(BaseModel):
    sae: str
    index: int
    fire_count: int
    density: float
    max_act: float
    mean_act: float
    histogram: Histogram
    pos_logits: list[TokenValue]
    neg_logits: list[TokenValue]
    neighbours: list[Neighbour]
    top_examples: list[Example]
    quantile_examples: list[QuantileExamples]
    explanation: Optional[str] = None
    explanations: dict[str, "ExplanationInfo"] = Field(
        default_factory=dict, description="by role: explanation, token_rule (baseline), shuffled (chance control)")


class ScoredExample(BaseModel):
    scorer: Literal["detection", "fuzzing"]
    tokens: list[str]
    marks: Optional[list[bool]] = None
    label: bool = Field(description="true: the feature fires here (detection) / the marks are its tokens (fuzzing)")
    kind: str
    p_yes: Optional[float] = Field(default=None, description="the judge's probability of yes; null: unparseable")


class ExplanationInfo(BaseModel):
    text: str
    explainer: str
    model: Optional[str] = None
    prompt_version: str
    score: Optional[float] = None
    scores: Optional[dict] = None
    verdicts: list[ScoredExample] = []
    created: str


class ExplanationHit(BaseModel):
    index: int
    explanation: Optional[str] = None
    score: Optional[float] = None
    rank: float = Field(description="BM25 relevance, higher is better")
    density: float
    top_tokens: list[str]


class ExplanationSearch(BaseModel):
    sae: str
    q: str
    total: int
    offset: int
    limit: int
    results: list[ExplanationHit]


class ExplainRequest(Strict):
    explainer: Literal["token-rule", "lm"] = Field(
        default="token-rule", description="token-rule (instant, no model) or lm (the server's local explainer model)")


class ExplanationBrief(BaseModel):
    index: int
    explanation: Optional[str] = None
    score: Optional[float] = None


class DensityDistribution(BaseModel):
    sae: str
    edges: list[float] = Field(description="log10(density) bin edges")
    counts: list[int]
    dead: int = Field(description="features that never fired (not in the bins)")


Feature.model_rebuild()


class TextRequest(Strict):
    sae: str = Field(pattern=ID_PATTERN, description="SAE id, as listed by GET /api/saes")
    text: Text = Field(min_length=1, max_length=4000)
    top_k: int = Field(default=5, ge=1, le=50, description="features shown per token")
    top_features: int = Field(default=20, ge=1, le=200, description="features ranked over the whole text")


class EncodeRequest(Strict):
    sae: str = Field(pattern=ID_PATTERN)
    text: Text = Field(min_length=1, max_length=4000)
    features: Optional[list[int]] = Field(default=None, max_length=64,
                                          description="only these features' activations (dense per token)")


class FeatureValue(BaseModel):
    index: int
    value: float


class TextFeature(BaseModel):
    index: int
    max_value: float
    max_token: int
    count: int
    sum: float


class SearchResponse(BaseModel):
    sae: str
    tokens: list[str]
    token_features: list[list[FeatureValue]]
    top_features: list[TextFeature]


class EncodeResponse(BaseModel):
    sae: str
    tokens: list[str]
    token_ids: list[int]
    active: Optional[list[list[FeatureValue]]] = None
    features: Optional[list[int]] = None
    values: Optional[list[list[float]]] = Field(default=None, description="[token][feature], with `features`")


class SteerFeatureRequest(Strict):
    sae: str = Field(pattern=ID_PATTERN)
    index: int = Field(ge=0)
    strength: float = Field(ge=-1000, le=1000, allow_inf_nan=False)


class SteerRequest(Strict):
    prompt: Text = Field(min_length=1, max_length=2000)
    features: list[SteerFeatureRequest] = Field(min_length=1, max_length=16)
    max_new_tokens: int = Field(default=32, ge=1, le=128)
    temperature: float = Field(default=0.7, ge=0, le=2, allow_inf_nan=False)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    method: Literal["additive", "clamp"] = "additive"


class SteerResponse(BaseModel):
    model: str
    prompt: str
    prompt_tokens: int
    default: str
    steered: str
    method: str
    seed: int


class ErrorResponse(BaseModel):
    """Every 4xx answer: a sentence saying what is wrong and what to do."""

    detail: str = Field(description="what is wrong and what to do")
    errors: Optional[list[dict]] = Field(default=None, description="for invalid requests: each problem found")


def error_responses(*codes: int) -> dict:
    return {code: {"model": ErrorResponse} for code in codes}

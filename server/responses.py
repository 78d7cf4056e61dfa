"""The JSON bodies the API returns, as pydantic models: /openapi.json and /docs show them.

data.py builds the bodies as plain dicts (encoding them needs no model);
these declare their shape, every field closed (extra="forbid"), and
tests/test_openapi.py checks with schemathesis that what the server sends
conforms. Names come from gluscope.schema, so a new quadrant, value or
geometry column changes the documentation with the data.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, create_model

from gluscope.server.queries import FILTER_FIELDS, GATE_POS_COUNT
from gluscope.schema import (EXAMPLE_KINDS, EXAMPLE_ROLES, GEOMETRY, HISTOGRAM_HOOKS, HOOKS, QUADRANT_SLUGS, QUADRANTS,
                             RELATED_VIA, WEIGHT_KINDS)

QuadrantLabel = Literal[QUADRANTS]  # type: ignore[valid-type]
QuadrantSlug = Literal[QUADRANT_SLUGS]  # type: ignore[valid-type]
Hook = Literal[HOOKS]  # type: ignore[valid-type]
WeightKind = Literal[WEIGHT_KINDS]  # type: ignore[valid-type]
ExampleKind = Literal[EXAMPLE_KINDS]  # type: ignore[valid-type]
ExampleRole = Literal[EXAMPLE_ROLES]  # type: ignore[valid-type]
Via = Literal[RELATED_VIA]  # type: ignore[valid-type]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


# What every neuron object adds to `layer` and `neuron` (the flat index within the layer) in a file with
# mixture-of-experts layers (server/experts.py); a file without experts sends neither, as before.
ADDRESS_FIELDS = {
    "expert": (int | None, Field(None, description="a file with experts: the neuron's expert (null: a dense "
                                                   "neuron); absent in a file without experts")),
    "expert_neuron": (int | None, Field(None, description="a file with experts: the neuron's index within its "
                                                          "expert (null: a dense neuron)")),
    "address": (str | None, Field(None, description="a file with experts: `layer.neuron`, or `layer.expert.index` "
                                                    "for an expert neuron, as its page's URL takes it")),
}


class Addressed(Body):
    """A neuron object's expert and address, in a file with experts (ADDRESS_FIELDS)."""

    expert: int | None = ADDRESS_FIELDS["expert"][1]
    expert_neuron: int | None = ADDRESS_FIELDS["expert_neuron"][1]
    address: str | None = ADDRESS_FIELDS["address"][1]


class ModelInfo(Body):
    """What was recorded, and how (the metadata table), with the id URLs use and the file's name."""

    id: str
    model_name: str
    model_source: str = Field(description="hub name, local folder or .gguf file the recording was given")
    model_revision: str | None
    weights_file: str | None = Field(description="the GGUF file the weights were dequantized from, if any")
    quantization: str | None = Field(description="that file's GGUF type, e.g. Q4_1")
    architecture: str
    act_fn: str
    n_layers: int
    d_model: int | None
    d_mlp: int
    vocab_size: int
    dtype: str
    weights_fingerprint: str = Field(description="identifies the weights: a process that loads the model again "
                                                 "checks it before it answers for this file")
    tokenizer_fingerprint: str = Field(description="identifies the vocabulary, likewise")
    dataset: str
    text_column: str | None
    max_length: int
    n_texts: int
    n_tokens: int
    k: int
    window_before: int
    window_after: int
    refactor_glu: bool
    weight_convention: str
    created_at: str = Field(description="ISO 8601")
    tool_version: str
    schema_version: int
    imported_from: str | None = Field(description="null: recorded by GLUScope; else the paper's layout and the "
                                      "folders it was imported from (no windows, samples or distributions; "
                                      "examples without positions unless located_with)")
    bos_counted: bool = Field(description="true (an import of the original's numbers): frequencies, means and "
                              "top lists count the BOS position, and n_tokens includes it")
    located_with: str | None = Field(description="an import's: the model that replayed the texts to locate the "
                                     "examples' tokens")
    examples_located: int | None = Field(description="how many examples that replay located")
    file: str


class Models(Body):
    models: list[ModelInfo]


# One number per quadrant, keyed by slug.
Frequencies = create_model("Frequencies", __base__=Body,
                           **{slug: (float | None, ...) for slug in QUADRANT_SLUGS})  # type: ignore[call-overload]


class LayerRouter(Body):
    """A layer's experts and router (schema.sql, layers): fields a file with experts adds (absent otherwise)."""

    n_experts: int | None = Field(None, description="routed experts; 0: a dense layer")
    n_shared_experts: int | None = Field(None, description="shared experts (every token passes through them)")
    top_k: int | None = Field(None, description="experts each token is routed to; 0 for a dense layer")
    router: str | None = Field(None, description="the model's router class and how its weights are computed")
    imbalance: float | None = Field(None, description="the busiest routed expert's tokens over the mean of the "
                                                      "layer's routed experts: 1 is even")


class LayerSummary(LayerRouter):
    layer: int
    n_neurons: int
    frequency: Frequencies = Field(description="mean frequency of each quadrant over the layer's neurons (an "
                                               "expert neuron's over the tokens routed to its expert; an import's "
                                               "without counts: the layout's own)")
    frac_flipped: float | None
    r_gate_pos_cos_in_out: float | None = Field(
        description="§5.1 of the paper: Pearson correlation across the layer's neurons between the frequency of "
                    f"x_gate > 0, ({GATE_POS_COUNT}) / n_tokens, and cos(w_in, w_out); null if either is constant")


class LayerScatter(Body):
    """The §5.1 scatter of one layer: per neuron (in neuron order) its frequency of x_gate > 0 and cos(w_in, w_out)."""

    model: str
    layer: int
    n_neurons: int
    r: float | None = Field(description="Pearson correlation of freq_gate_pos and cos_in_out over the layer")
    neuron: list[int]
    freq_gate_pos: list[float | None] = Field(description=f"({GATE_POS_COUNT}) / n_tokens (an expert neuron's "
                                                          "over the tokens routed to its expert)")
    cos_in_out: list[float | None]
    address: list[str] | None = Field(None, description="a file with experts: each neuron's address")


class ModelDetail(ModelInfo):
    layers: list[LayerSummary]


class Stat(Body):
    min: float | None
    max: float | None
    mean: float | None


HookStats = create_model("HookStats", __base__=Body, **{h: (Stat, ...) for h in HOOKS})  # type: ignore[call-overload]


class QuadrantSummary(Body):
    quadrant: QuadrantLabel
    slug: QuadrantSlug
    count: int | None = Field(description="null: not known (an import whose frequencies give no exact count)")
    frequency: float | None = Field(description="count / the tokens the neuron's statistics are over (an expert "
                                                "neuron's: those routed to its expert); an import without counts: "
                                                "the layout's own frequency (over n_tokens)")
    stats: HookStats = Field(description="min, max and mean of each value over the quadrant's tokens (null if none)")
    routed: Stat | None = Field(None, description="a file with experts: router weight × hook_post over the "
                                "quadrant's tokens, what an expert neuron adds to the residual stream along w_out "
                                "(schema.sql, routed_values); null for a dense neuron")


class ExpertSummary(Body):
    """One expert's router statistics (schema.sql, experts)."""

    layer: int
    expert: int = Field(description="0 .. n_experts-1 routed, then the shared ones")
    shared: bool
    first_neuron: int = Field(description="the flat index of its neuron 0 within the layer")
    n_neurons: int
    tokens: int = Field(description="counted tokens routed to it (a shared expert: every counted token)")
    share: float | None = Field(description="tokens / the model's n_tokens: how often it was chosen")
    weight_sum: float | None = Field(description="its router weight summed over its tokens")
    mean_weight: float | None = Field(description="weight_sum / tokens; null when it received none")


class NeuronRouter(ExpertSummary, LayerRouter):
    """The expert of an expert neuron, and its layer's router."""


Geometry = create_model("Geometry", __base__=Body, flipped=(bool | None, ...),
                        **{name: (float | None, ...) for name in GEOMETRY})  # type: ignore[call-overload]


class NeuronSummary(Addressed):
    model: str
    layer: int
    neuron: int
    n_tokens: int
    quadrants: list[QuadrantSummary]
    weights: Geometry
    counted_tokens: int | None = Field(None, description="a file with experts: the tokens the statistics are over, "
                                       "n_tokens or, for an expert neuron, those routed to its expert")
    router: NeuronRouter | None = Field(None, description="a file with experts: an expert neuron's expert and "
                                        "how often it was chosen; null for a dense neuron")


class LayerNeuron(Geometry):  # type: ignore[misc, valid-type]
    neuron: int
    frequency: Frequencies = Field(description="each quadrant's frequency, as the neuron's own body gives it")
    expert: int | None = ADDRESS_FIELDS["expert"][1]
    expert_neuron: int | None = ADDRESS_FIELDS["expert_neuron"][1]
    address: str | None = ADDRESS_FIELDS["address"][1]


class TokenAtExpert(Body):
    token_id: int
    token: str
    tokens: int = Field(description="occurrences of the token routed to the expert")
    weight_sum: float | None
    mean_weight: float | None
    share: float | None = Field(description="tokens / the token's occurrences in the corpus: how much of it the "
                                            "expert gets (top_k experts share each token)")
    occurrences: float | None = Field(description="the token's counted occurrences in the corpus")


class TopTokens(Body):
    count: list[TokenAtExpert] = Field(description="most tokens first")
    weight: list[TokenAtExpert] = Field(description="largest summed router weight first")
    share: list[TokenAtExpert] = Field(description="largest share first, among tokens that occur at least 5 times")


class ExpertDetail(ExpertSummary):
    top_tokens: TopTokens = Field(description="the tokens routed to it most (empty for a shared expert)")


class LayerPage(LayerRouter):
    model: str
    layer: int
    n_neurons: int = Field(description="the layer's neurons (with expert=, the expert's)")
    sort: str
    order: Literal["asc", "desc"]
    offset: int
    limit: int
    neurons: list[LayerNeuron]
    expert: int | None = Field(None, description="a file with experts: the expert the rows are restricted to")
    experts: list[ExpertDetail] | None = Field(None, description="a file with experts: the layer's experts, routed "
                                                                 "then shared (empty for a dense layer)")


class WeightHistogram(Body):
    first_bin: int = Field(description="histogram_bins.bin (axis 'value') of counts[0]")
    edges: list[float | None] = Field(description="bin edges, one more than counts (both empty when no token "
                                                  "was routed); null: open end")
    counts: list[int]


class ExpertExample(Body):
    rank: int = Field(description="0 = the largest router weight")
    weight: float | None = Field(description="the router weight at the token of interest")
    text_id: int
    source_index: int
    source: str | None
    position: int
    window_start: int
    token_ids: list[int]
    tokens: list[str]


class ExpertPage(ExpertDetail, LayerRouter):
    """One expert of a mixture-of-experts layer, and one page of its neurons."""

    model: str
    weights: WeightHistogram = Field(description="the distribution of its router weight over its tokens")
    examples: list[ExpertExample] = Field(description="the texts where its router weight was largest")
    sort: str
    order: Literal["asc", "desc"]
    offset: int
    limit: int
    neurons: list[LayerNeuron]


Activations = create_model("Activations", __base__=Body,
                           **{h: (list[float | None], ...) for h in HOOKS})  # type: ignore[call-overload]


class Example(Body):
    rank: int = Field(description="0 = most extreme")
    value: float | None = Field(description="the ranked value at the token of interest")
    text_id: int
    source_index: int = Field(description="row in the source dataset")
    source: str | None = Field(description="where the text came from, when the dataset says (a path, a URL)")
    position: int | None = Field(description="the token of interest; null: not known (an imported example: "
                                 "the layout keeps the text, not the token)")
    window_start: int | None
    text: str | None = Field(None, description="where position is null: the whole text, as its dataset gives it")
    token_ids: list[int]
    tokens: list[str]
    activations: Activations = Field(description="each value at every token of the window")
    interval: list[float | None] | None = Field(None, min_length=2, max_length=2, description=(
        "kind=interval only: [lo, hi], the bounds of |hook_post| of this example's interval (null: unbounded)"))


class IntervalBounds(Body):
    interval: int = Field(description="0 = typical, the last = extreme")
    lo: float | None = Field(description="|hook_post| >= lo")
    hi: float | None = Field(description="|hook_post| < hi; null: unbounded")


class ExampleListBody(Addressed):
    model: str
    layer: int
    neuron: int
    quadrant: QuadrantLabel
    slug: QuadrantSlug
    hook: Hook = Field(description="kind=top: the value the list is ranked by; else the value `value` holds")
    kind: ExampleKind = Field(description="top: top-k by |hook|, rank 0 the most extreme; random: drawn uniformly "
                              "from the quadrant's tokens, one per text at most; interval: drawn likewise from each "
                              "interval of |hook_post|, ordered by interval, then rank")
    interval: int | None = Field(description="the one interval asked for (interval=), else null")
    intervals: list[IntervalBounds] = Field(description="kind=interval: the quadrant's intervals; else empty")
    examples: list[Example]


class WeightToken(Body):
    token_id: int
    token: str
    score: float | None


class Writes(Body):
    quadrant: QuadrantLabel
    slug: QuadrantSlug
    promotes: WeightKind
    suppresses: WeightKind


WeightTokenKinds = create_model("WeightTokenKinds", __base__=Body,
                                **{k: (list[WeightToken], ...) for k in WEIGHT_KINDS})  # type: ignore[call-overload]


class WeightTokens(Addressed):
    model: str
    layer: int
    neuron: int
    tokens: WeightTokenKinds = Field(description="by kind (schema.sql, weight_kinds), most extreme first")
    writes: list[Writes] = Field(description="per quadrant, which output kind the neuron promotes")


class Text(Body):
    model: str
    text_id: int
    source_index: int
    source: str | None
    token_ids: list[int]
    tokens: list[str]
    text: str = Field(description="the text as its dataset gave it (an import's), else decoded from the "
                                  "vocabulary after the BOS")


# One neuron of a whole-model filter: its key, and the fields the request bounded or sorted by (absent
# otherwise; null where a quadrant never occurred). queries.FILTER_FIELDS names them.
FilterRow = create_model("FilterRow", __base__=Body, layer=(int, ...), neuron=(int, ...), **ADDRESS_FIELDS,
                         **{name: (float | None, None) for name in FILTER_FIELDS})  # type: ignore[call-overload]


class FilterPage(Body):
    model: str
    layers: list[int] = Field(description="the first and last layer searched")
    bounds: dict[str, float] = Field(description="the bounds given, by parameter name (min_<field>, max_<field>)")
    sort: str
    order: Literal["asc", "desc"]
    offset: int
    limit: int
    total: int = Field(description="neurons within every bound, over all pages")
    fields: list[str] = Field(description="the fields each row holds besides layer and neuron")
    neurons: list[FilterRow]  # type: ignore[valid-type]
    expert: int | None = Field(None, description="a file with experts: the expert= the rows are restricted to")


class NeuronRef(Addressed):
    layer: int
    neuron: int


class RelatedPair(Body):
    writer: NeuronRef = Field(description="the earlier neuron, whose w_out is read")
    reader: NeuronRef = Field(description="the later neuron, which reads it through w_gate or w_in")
    via: Literal[RELATED_VIA]  # type: ignore[valid-type]
    score: float | None = Field(description="cos(w_out of writer, g * w_via of reader), schema.sql `related`")
    downstream: bool = Field(description="kept among the writer's 16 strongest downstream neurons")
    upstream: bool = Field(description="kept among the reader's 16 strongest upstream neurons")


class RelatedBetween(Body):
    recorded: bool = Field(description="whether this file holds related neurons at all")
    pairs: list[RelatedPair] = Field(description="pairs where one is among the other's 16 strongest, by |score|")


class HistogramOverlay(Body):
    quadrant: QuadrantLabel
    hook: Hook
    edges: list[float | None] = Field(description="bin edges (histogram_bins, axis 'value'), one more than each "
                                                  "row of counts; null: unbounded")
    counts: list[list[int]] = Field(description="per compared neuron, in order: tokens of the quadrant per bin")


class Comparison(Body):
    model: str
    neurons: list[NeuronRef]
    quadrant: QuadrantLabel
    slug: QuadrantSlug
    hook: Hook
    summaries: list[NeuronSummary]
    related: RelatedBetween
    histograms: HistogramOverlay | None = Field(description="null where the file holds no histograms of these "
                                                           "neurons, or for act (which has none)")
    examples: list[ExampleListBody] = Field(description="the chosen list of each neuron, in the order given")

class TokenRef(Body):
    token_id: int
    token: str


class WeightHit(Addressed):
    layer: int
    neuron: int
    token_id: int = Field(description="the searched token this score is for")
    token: str
    score: float | None = Field(description="the dot product of the weight kind (schema.sql, weight_kinds)")


class ExampleHit(Addressed):
    layer: int
    neuron: int
    quadrant: QuadrantLabel
    slug: QuadrantSlug
    hook: Hook = Field(description="the list's value; samples (kinds random, interval) are listed as hook_post")
    kind: ExampleKind
    matches: int = Field(description="examples of the list holding the token in the searched role")
    best_rank: int = Field(description="the place of the first of them in its list: the rank (0 = most extreme, or first drawn), for interval lists interval × n_per_interval + rank")
    best_value: float | None = Field(description="that example's value (samples: hook_post)")


class TokenSearch(Body):
    model: str
    side: Literal["weights", "examples"]
    token_id: int | None
    token: str | None
    loose: bool
    kind: str | None = Field(description="a weight kind (side=weights) or an example kind (side=examples; null: all)")
    role: ExampleRole | None = Field(description="side=examples: the token of interest (focus) or the next token")
    quadrant: QuadrantSlug | None
    hook: Hook | None
    layers: str | None
    limit: int
    tokens: list[TokenRef] = Field(description="the vocabulary entries searched for")
    results: list[WeightHit] | list[ExampleHit] = Field(description="most extreme first (weights); by matches, "
                                                                    "then |value| (examples)")


class Suggestions(Body):
    model: str
    token: str = Field(description="the text the suggestions start with")
    suggestions: list[TokenRef]


class RelatedNeuron(Addressed):
    layer: int
    neuron: int
    via: Via = Field(description="which weights of the reading neuron: gate or in")
    score: float | None = Field(description="cos(w_out of the writer, g * w_via of the reader)")


class Related(Addressed):
    model: str
    layer: int
    neuron: int
    downstream: list[RelatedNeuron] = Field(description="later neurons reading what this one writes, by |score|")
    upstream: list[RelatedNeuron] = Field(description="earlier neurons whose output this one reads, by |score|")


class HistogramValue(Body):
    first_bin: int = Field(description="histogram_bins.bin (axis 'value') of the first bin shown: the bins are "
                           "those from the first to the last that holds a token in any quadrant")
    edges: list[float | None] = Field(description="signed bin edges, one more than the counts (both empty when "
                                      "no token was counted): bin i holds edges[i] <= v < edges[i+1]; null: open end")
    counts: dict[QuadrantLabel, list[int]] = Field(description="per quadrant, tokens in each bin; they sum to the "
                                                   "quadrant's count")


HistogramValues = create_model("HistogramValues", __base__=Body,
                               **{h: (HistogramValue, ...) for h in HISTOGRAM_HOOKS})  # type: ignore[call-overload]


class Density(Body):
    first_gate_bin: int = Field(description="histogram_bins.bin (axis 'density') of gate_edges[0]")
    first_in_bin: int = Field(description="histogram_bins.bin (axis 'density') of in_edges[0]")
    gate_edges: list[float | None] = Field(description="x_gate bin edges, trimmed like a value's; null: open end")
    in_edges: list[float | None] = Field(description="x_in bin edges (after the weight convention)")
    counts: list[list[int]] = Field(description="counts[i][j]: tokens with x_gate in bin i and x_in in bin j")


class IntervalCount(IntervalBounds):
    count: int | None = Field(description="the quadrant's tokens in the interval, from the hook_post histogram "
                              "(interval bounds are bin edges); null if a bound falls inside a non-empty bin")


class QuadrantDistribution(Body):
    quadrant: QuadrantLabel
    slug: QuadrantSlug
    count: int | None = Field(description="tokens of the quadrant: the sum of each of its histograms; an import's "
                              "(distributions_known false) as its neuron's body gives it, null where not known")
    frequency: float | None = Field(description="the quadrant's frequency, as the neuron's body gives it")
    intervals: list[IntervalCount] = Field(description="the intervals of |hook_post| that kind=interval draws from")


class Histograms(Addressed):
    model: str
    layer: int
    neuron: int
    n_tokens: int
    counted_tokens: int | None = Field(None, description="a file with experts: the tokens the frequencies are "
                                       "over (an expert neuron's: those routed to its expert)")
    distributions_known: bool | None = Field(None, description="false: an import of the paper's layout, which has "
                                             "no distributions, so values, density and intervals are empty (not "
                                             "zero); absent in a recording")
    values: HistogramValues = Field(description="per value (hook), its bins and each quadrant's counts")
    density: Density = Field(description="the joint distribution of (x_gate, x_in) over the counted tokens")
    quadrants: list[QuadrantDistribution]


class ErrorDetail(Body):
    status: int
    parameter: str | None
    message: str
    valid: str | list[str] | None = Field(description="a range such as 0..31, the valid choices, or null")


class Error(Body):
    error: ErrorDetail

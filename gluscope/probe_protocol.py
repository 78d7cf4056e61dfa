"""What the web server and the probe say to each other: the requests, their limits and the answers' shapes.

The probe (probe/) runs the model a database was recorded from; the web server
(server/) forwards the browser's probe requests to it and renders the answers.
Both import this module, which imports no torch, so the names,
the defaults and the bodies are written once, as schema.sql is for the files.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from gluscope.schema import QUADRANT_SLUGS
from gluscope.server.validate import LAYERS_PATTERN

# The probe's endpoints (POST, JSON body), by the name of the answer.
ANSWERS: tuple[str, ...] = ("activations", "fire", "ablate")

# Defaults of the limits a public instance needs (gluscope probe --max-tokens ...).
MAX_TOKENS = 512        # tokens per text, BOS not counted
MAX_NEURONS = 64        # neurons per request
QUEUE_SIZE = 16         # requests waiting for the model, beyond which the probe answers 503
TIMEOUT_S = 30.0        # a request's whole time in the probe, queue included
BATCH_TOKENS = 4096     # padded tokens in one forward pass, when waiting requests are batched

TOP_TOKENS = 10         # next tokens shown before and after an intervention
CHANGED_TOKENS = 5      # next tokens that lost and gained most probability, per position
FIRE_TOP = 10           # neurons per quadrant in the neurons-that-fire answer, by default
FIRE_TOP_MAX = 50

ABLATION_MODES: tuple[str, ...] = ("zero", "scale", "clamp")

PROBE_URL_ENV = "GLUSCOPE_PROBE_URL"  # gluscope serve --probe, for a container
START_HINT = ("start one beside the server with `gluscope probe FILE.duckdb --port 8001` and serve with "
              "`gluscope serve FILE.duckdb --probe http://127.0.0.1:8001`")

TEXT_DESCRIPTION = f"the text to run the model on (BOS is put first, as when recording); at most the probe's " \
                   f"token limit ({MAX_TOKENS} by default)"
NEURONS_DESCRIPTION = f"layer.neuron, comma-separated (at most the probe's neuron limit, {MAX_NEURONS} by default)"


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _json_number(value: Any) -> Any:
    # To the schema, JSON true and "2" are no numbers; lax pydantic would read them as 1 and 2.
    if isinstance(value, (bool, str)):
        raise ValueError(f"{value!r} is not a number")
    return value


Integer = Annotated[int, BeforeValidator(_json_number)]
Number = Annotated[float, BeforeValidator(_json_number)]


# What the schema says a request holds (json_schema_extra: documented, not enforced by pydantic), so that a
# fuzzer's requests are those the probe can answer; probe/answers.py checks each field itself, with messages
# that name the limits. The neuron pattern counts up to the default limit.
TEXT_SCHEMA = {"minLength": 1, "pattern": r"\S"}
# What JSON Schema's \s (ECMAScript's) matches: Python's str.isspace says more (\x1c-\x1f, \x85), and a text
# the schema admits must not be refused as empty.
SCHEMA_SPACE = frozenset(" \t\n\v\f\r\u00a0\u1680\u2028\u2029\u202f\u205f\u3000\ufeff"
                         + "".join(chr(c) for c in range(0x2000, 0x200b)))


def blank(text: str | None) -> bool:
    """No character outside the schema's white space: what TEXT_SCHEMA's pattern refuses."""
    return not text or all(c in SCHEMA_SPACE for c in text)


# A neuron is layer.neuron, or layer.expert.index in a mixture-of-experts layer.
NEURON_REF = r"[0-9]{1,9}\.[0-9]{1,12}(\.[0-9]{1,12})?"
NEURONS_SCHEMA = {"pattern": rf"^ *{NEURON_REF} *(, *{NEURON_REF} *){{0,{MAX_NEURONS - 1}}}$"}
LAYERS_SCHEMA = {"pattern": LAYERS_PATTERN}


class ActivationsRequest(Request):
    text: str = Field(description=TEXT_DESCRIPTION, json_schema_extra=TEXT_SCHEMA)
    neurons: str = Field(description=NEURONS_DESCRIPTION, json_schema_extra=NEURONS_SCHEMA)


class FireRequest(Request):
    text: str = Field(description=TEXT_DESCRIPTION, json_schema_extra=TEXT_SCHEMA)
    position: Integer | None = Field(None, description="the token, by position (0 is BOS, 1 the first token); "
                                                   "default, or past the end: the last token",
                                 json_schema_extra={"minimum": 1})
    layers: str | None = Field(None, description="layers A-B (inclusive) or one layer A; default: every layer",
                               json_schema_extra=LAYERS_SCHEMA)
    top: Integer = Field(FIRE_TOP, description=f"neurons per quadrant, 1..{FIRE_TOP_MAX}",
                     json_schema_extra={"minimum": 1, "maximum": FIRE_TOP_MAX})


class AblateRequest(Request):
    text: str = Field(description=TEXT_DESCRIPTION, json_schema_extra=TEXT_SCHEMA)
    neurons: str = Field(description=NEURONS_DESCRIPTION, json_schema_extra=NEURONS_SCHEMA)
    mode: str = Field("zero", description="zero: remove the neurons' contribution; scale: multiply it by factor; "
                                          "clamp: set hook_post to value",
                      json_schema_extra={"enum": list(ABLATION_MODES)})
    quadrant: str | None = Field(None, description="only at tokens where the neuron is in this quadrant (a slug: "
                                                   "pp, pn, np, nn); default or empty: at every token but BOS",
                                 json_schema_extra={"enum": ["", *QUADRANT_SLUGS, None]})
    factor: Number = Field(0.0, description="mode=scale: the factor, finite (default 0: the same as zero)")
    value: Number = Field(0.0, description="mode=clamp: hook_post's value, in the file's weight convention "
                                          "(default 0)")
    position: Integer | None = Field(None, description="answer for this position only (the prediction of the token "
                                                   "after it; past the end: the last); default: every position",
                                 json_schema_extra={"minimum": 0})
    target: str | None = Field(None, description="a token whose log-probability is reported before and after at "
                                                 "every position: a vocabulary entry's text (e.g. ' again'), else "
                                                 "the first token of this text")


REQUESTS: dict[str, type[BaseModel]] = {"activations": ActivationsRequest, "fire": FireRequest,
                                         "ablate": AblateRequest}


# --- answers --------------------------------------------------------------------

class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Token(Body):
    token_id: int
    token: str


class QuadrantRecord(Body):
    quadrant: str
    slug: str
    count: int | None = Field(description="tokens of the recorded corpus in this quadrant; null where not known "
                              "(an import whose layout states only the frequency)")
    max_abs: float | None = Field(description="the largest |hook_post| recorded in this quadrant")


class NeuronOnText(Body):
    layer: int
    neuron: int
    values: dict[str, list[float | None]] = Field(description="per hook (hook_post, hook_pre_linear, hook_pre, "
                                                              "act), one value per token, in the weight convention")
    quadrants: list[str | None] = Field(description="each token's quadrant label (null: BOS or a zero)")
    relative: list[float | None] = Field(description="|hook_post| over the largest |hook_post| recorded in the "
                                                     "token's quadrant")
    recorded: list[QuadrantRecord]
    scales: dict[str, float] = Field(description="per hook, the largest |value| recorded in any quadrant")


class Activations(Body):
    model: str
    text: str
    tokens: list[Token]
    neurons: list[NeuronOnText]


class FiringNeuron(Body):
    layer: int
    neuron: int
    x_gate: float
    x_in: float
    act: float
    hook_post: float
    recorded_max_abs: float
    relative: float = Field(description="|hook_post| over recorded_max_abs")


class FiringQuadrant(Body):
    quadrant: str
    slug: str
    in_quadrant: int = Field(description="neurons of the chosen layers in this quadrant at the token")
    unrecorded: int = Field(description="of them, neurons never recorded in this quadrant (no scale; not ranked)")
    neurons: list[FiringNeuron]


class Firing(Body):
    model: str
    text: str
    tokens: list[Token]
    position: int
    layers: list[int] = Field(description="[first, last], inclusive")
    quadrants: list[FiringQuadrant]


# Where an edit overflows the model (a huge factor or value makes inf or NaN logits), the numbers it
# touches are null rather than refused: the request was valid, and the answer says what the model did.
class TokenProbability(Body):
    token_id: int
    token: str
    prob: float | None


class LogProbs(Body):
    token_id: int
    token: str
    before: float | None
    after: float | None


class ProbabilityChange(Body):
    token_id: int
    token: str
    before: float | None
    after: float | None


class PositionChange(Body):
    position: int = Field(description="the position whose next token is predicted")
    token: str
    kl: float | None = Field(description="KL(before || after) of the next-token distribution, in nats; null "
                                         "where the edited pass overflowed (then first)")
    next: LogProbs | None = Field(description="the text's own next token (null at the last position)")
    target: LogProbs | None
    before: list[TokenProbability]
    after: list[TokenProbability]
    lost: list[ProbabilityChange] = Field(description="the next tokens whose probability fell most")
    gained: list[ProbabilityChange] = Field(description="the next tokens whose probability rose most")


class EditedNeuron(Body):
    layer: int
    neuron: int
    edited: int = Field(description="tokens where the intervention applied")


class Ablation(Body):
    model: str
    text: str
    tokens: list[Token]
    mode: Literal["zero", "scale", "clamp"]
    quadrant: str | None
    factor: float | None
    value: float | None
    neurons: list[EditedNeuron]
    positions: list[PositionChange] = Field(description="largest KL first")


class HeldModel(Body):
    model: str
    weights_fingerprint: str
    tokenizer_fingerprint: str
    device: str
    dtype: str


class ProbeStatus(Body):
    models: list[HeldModel]
    limits: dict[str, int | float]

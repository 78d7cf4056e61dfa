-- GLUScope database schema: the contract between the recorder (which writes
-- a file with exactly these tables) and the server (which only reads them).
-- Layers, neurons, text ids and positions are zero-based. Position 0 of every
-- text is its BOS token; it is stored but never counted in any statistic
-- (except in a file imported from the paper's layout: metadata.bos_counted).
-- Quadrant and hook codes are small integers; the lookup tables `quadrants`
-- and `hooks` below say what each code means, so the file describes itself.

-- One row: what was recorded, how, and with which conventions.
CREATE TABLE metadata (
    schema_version   INTEGER   NOT NULL,
    tool_version     VARCHAR   NOT NULL,
    created_at       TIMESTAMP NOT NULL,
    model_name       VARCHAR   NOT NULL,  -- display name: record --name, else model_source
    model_source     VARCHAR   NOT NULL,  -- hub name, local folder or .gguf file as given
    model_revision   VARCHAR,             -- commit hash when known
    weights_file     VARCHAR,             -- the GGUF file the weights were dequantized from, if any
    weights_sha256   VARCHAR,             -- its SHA-256
    quantization     VARCHAR,             -- its GGUF file type (e.g. Q4_1); NULL for float checkpoints
    architecture     VARCHAR   NOT NULL,  -- e.g. LlamaForCausalLM
    act_fn           VARCHAR   NOT NULL,  -- the config's name, e.g. silu, gelu_pytorch_tanh; quick_gelu: gpt-oss's experts
    n_layers         INTEGER   NOT NULL,
    d_model          INTEGER,             -- NULL: not known (an import without --model)
    d_mlp            INTEGER   NOT NULL,  -- neurons per layer; the largest layer's when they differ (see `layers`)
    vocab_size       INTEGER   NOT NULL,
    dtype            VARCHAR   NOT NULL,  -- dtype the model ran in
    dataset          VARCHAR   NOT NULL,  -- where the texts came from
    text_column      VARCHAR,
    max_length       INTEGER   NOT NULL,  -- tokens per text, BOS included
    bos_token_id     INTEGER   NOT NULL,  -- the id put first in every text (EOS if no BOS)
    n_texts          INTEGER   NOT NULL,
    n_tokens         BIGINT    NOT NULL,  -- tokens counted: no BOS, no padding
    batch_size       INTEGER   NOT NULL,  -- texts per forward pass (it decides which texts a shard holds)
    corpus_fingerprint VARCHAR NOT NULL,  -- hash of the whole corpus's token ids, shared by its shards
    weights_fingerprint VARCHAR NOT NULL, -- hash of every parameter's name, shape, dtype and a sample of its bytes
    tokenizer_fingerprint VARCHAR NOT NULL, -- hash of the vocabulary: whoever loads the model again (a live
                                          -- probe) checks both before answering for this file
    shard_index      INTEGER,             -- this file holds shard shard_index of shard_count
    shard_count      INTEGER,             -- (NULL, NULL): the whole corpus, recorded at once or merged
    layer_first      INTEGER,             -- a part (record --layers, --experts; recorder/parts.py) holds layers
    layer_last       INTEGER,             -- layer_first .. layer_last and of MoE layers the routed experts
    expert_first     INTEGER,             -- expert_first .. expert_last (shared experts and dense layers go with
    expert_last      INTEGER,             -- the part from expert 0); NULL: all. `gluscope merge` joins parts
    k                INTEGER   NOT NULL,  -- examples kept per (neuron, quadrant, hook)
    window_before    INTEGER   NOT NULL,  -- a window spans position-before ..
    window_after     INTEGER   NOT NULL,  -- .. position+after, clipped to the text
    refactor_glu     BOOLEAN   NOT NULL,  -- true: w_in and w_out of each neuron multiplied by sign(w_gate . w_in)
    weight_convention VARCHAR  NOT NULL,  -- a sentence saying the same for humans
    sample_seed      BIGINT    NOT NULL,  -- seed of the sampling hash (see `samples`)
    n_random         INTEGER   NOT NULL,  -- random examples kept per (neuron, quadrant)
    n_per_interval   INTEGER   NOT NULL,  -- examples kept per interval of |hook_post|
    calibration_batches INTEGER NOT NULL, -- the run's first batches that fixed the intervals (see `intervals`):
                                          -- 4, or all of a run with fewer; 0: none (default bounds)
    -- A file imported from the paper's dataset layout (`gluscope import-gluscope`) holds what that layout
    -- has: frequencies (`imported_frequencies`; counts only where they follow exactly), means, top lists
    -- of texts and, from the lists, each value's extreme in its quadrant. It has no windows, samples,
    -- histograms, density, intervals, weight tokens, related or token neurons; its examples have no
    -- position unless a model replayed their texts (located_with).
    imported_from    VARCHAR,             -- NULL: recorded by GLUScope; else the layout and the folders read
    bos_counted      BOOLEAN   NOT NULL,  -- true: frequencies, means and top lists count the BOS position and
                                          -- n_tokens includes it (the original's convention, kept on import)
    located_with     VARCHAR,             -- the model whose replay of the texts gave the examples' positions
    examples_located BIGINT               -- how many examples that replay located (position not NULL)
);

-- Code tables, written with the schema.
CREATE TABLE quadrants (
    quadrant  TINYINT PRIMARY KEY,  -- 0..3
    label     VARCHAR NOT NULL,     -- gate+_in+ ...
    slug      VARCHAR NOT NULL,     -- pp, pn, np, nn (URL-safe)
    gate_sign TINYINT NOT NULL,
    in_sign   TINYINT NOT NULL
);
INSERT INTO quadrants VALUES
    (0, 'gate+_in+', 'pp',  1,  1),
    (1, 'gate+_in-', 'pn',  1, -1),
    (2, 'gate-_in+', 'np', -1,  1),
    (3, 'gate-_in-', 'nn', -1, -1);

CREATE TABLE hooks (
    hook        TINYINT PRIMARY KEY,  -- 0..3
    name        VARCHAR NOT NULL,
    description VARCHAR NOT NULL
);
INSERT INTO hooks VALUES
    (0, 'hook_post',       'act(x_gate) * x_in, what the neuron writes (times w_out)'),
    (1, 'hook_pre_linear', 'x_in = w_in . x'),
    (2, 'hook_pre',        'x_gate = w_gate . x'),
    (3, 'act',             'act_fn(x_gate): swish for SiLU models, GELU for Gemma');

-- One row per layer: its neurons and, for a mixture-of-experts layer, its router.
CREATE TABLE layers (
    layer     SMALLINT NOT NULL,
    n_neurons INTEGER  NOT NULL,  -- neurons 0 .. n_neurons-1 (metadata.d_mlp is the largest of any layer)
    n_experts INTEGER  NOT NULL,  -- routed experts; 0: a dense MLP (then `experts` has no row of the layer)
    top_k     INTEGER  NOT NULL,  -- experts each token is routed to; 0 for a dense MLP
    router    VARCHAR,            -- the model's router class, and how its weights are computed
    imbalance DOUBLE              -- the busiest routed expert's tokens / the mean over routed experts (1: even)
);

-- The experts of mixture-of-experts layers. A layer's neurons are numbered
-- expert after expert: the routed experts 0 .. n_experts-1, then the shared
-- experts (gated MLPs that every token passes through). So every table keyed
-- by (layer, neuron) holds expert neurons too, with
-- neuron = first_neuron + the neuron's index within its expert, and a
-- neuron's address is layer.expert.index. An expert neuron's statistics are
-- over the counted tokens routed to its expert (`tokens`): its quadrant
-- counts sum to at most that, its examples and samples are such tokens, and
-- its windows hold NaN (float16 0x7E00) at positions not routed to it.
CREATE TABLE experts (
    layer        SMALLINT NOT NULL,
    expert       SMALLINT NOT NULL,  -- 0 .. n_experts-1 routed, then the shared ones
    shared       BOOLEAN  NOT NULL,
    first_neuron INTEGER  NOT NULL,
    n_neurons    INTEGER  NOT NULL,
    tokens       BIGINT   NOT NULL,  -- counted tokens routed to it (no BOS, no padding); shared: every counted token
    weight_sum   DOUBLE   NOT NULL,  -- the sum of its router weight over them, exactly as the model computed it
                                     -- (the expert's output is multiplied by it); a shared expert's gate, else 1
    weight_first_bin SMALLINT,       -- the router weight's distribution on the 'value' bins of histogram_bins,
    weight_counts    BIGINT[]        -- stored as in `histograms`; NULL when no token was routed to it
);

-- How many counted tokens of each vocabulary entry each routed expert
-- received, and their summed router weight: every (expert, token) that
-- occurred, so shards add up. A token's share at an expert is tokens over
-- that token's count in the corpus (which is sum(tokens) / top_k over the layer's experts).
CREATE TABLE expert_tokens (
    layer      SMALLINT NOT NULL,
    expert     SMALLINT NOT NULL,
    token_id   INTEGER  NOT NULL,
    tokens     BIGINT   NOT NULL,
    weight_sum DOUBLE   NOT NULL
);

-- Per routed expert, the k texts (metadata.k) in which its router weight
-- was largest, each at its own largest position; ties go to the lower
-- text_id, then the lower position. Rank 0 is the largest.
CREATE TABLE expert_examples (
    layer    SMALLINT NOT NULL,
    expert   SMALLINT NOT NULL,
    rank     TINYINT  NOT NULL,
    weight   FLOAT    NOT NULL,
    text_id  INTEGER  NOT NULL,
    position SMALLINT NOT NULL
);

-- What an expert neuron adds to the residual stream along w_out: its router
-- weight times hook_post (after the weight convention), over each quadrant's
-- tokens: min, max and mean, NULL when the quadrant never occurred. hook_post
-- alone is in value_stats. One row per expert neuron and quadrant.
CREATE TABLE routed_values (
    layer    SMALLINT NOT NULL,
    neuron   INTEGER  NOT NULL,
    quadrant TINYINT  NOT NULL,
    min      FLOAT,
    max      FLOAT,
    mean     DOUBLE
);

-- Every recorded text, in text_id order.
CREATE TABLE texts (
    text_id      INTEGER   NOT NULL,  -- 0 .. n_texts-1
    source_index BIGINT    NOT NULL,  -- row index in the source dataset
    source       VARCHAR,             -- where the text came from (a path), when the dataset says
    n_tokens     INTEGER   NOT NULL,  -- length including BOS
    token_ids    INTEGER[] NOT NULL,
    text         VARCHAR              -- an import's text as its dataset gives it; NULL: decode token_ids (vocab)
);

-- The tokenizer's vocabulary, so texts decode without the tokenizer.
CREATE TABLE vocab (
    token_id    INTEGER NOT NULL,
    token       VARCHAR NOT NULL,  -- what the tokenizer decodes this id to alone
    token_bytes BLOB    NOT NULL   -- the raw bytes it contributes to a text; concatenate and decode UTF-8
);

-- One row per neuron: quadrant counts and weight geometry (after the weight convention). Only an
-- import leaves them NULL: counts its frequencies do not give exactly, weights it was not given.
CREATE TABLE neurons (
    layer        SMALLINT NOT NULL,
    neuron       INTEGER  NOT NULL,
    count_pp     BIGINT,   -- tokens with x_gate > 0 and x_in > 0
    count_pn     BIGINT,   -- x_gate > 0, x_in < 0
    count_np     BIGINT,   -- x_gate < 0, x_in > 0
    count_nn     BIGINT,   -- x_gate < 0, x_in < 0
    flipped      BOOLEAN,  -- w_in, w_out were multiplied by -1
    cos_gate_in  FLOAT,
    cos_gate_out FLOAT,
    cos_in_out   FLOAT,
    norm_gate    FLOAT,
    norm_in      FLOAT,
    norm_out     FLOAT
);

-- An import's frequencies as its layout states them (Q_freq: tokens of the quadrant over metadata.n_tokens,
-- which holds the BOS where metadata.bos_counted); one row per neuron and quadrant. Empty in a recording,
-- whose frequencies are neurons.count_* / n_tokens.
CREATE TABLE imported_frequencies (
    layer     SMALLINT NOT NULL,
    neuron    INTEGER  NOT NULL,
    quadrant  TINYINT  NOT NULL,
    frequency FLOAT    NOT NULL
);

-- The tokens a neuron's weights point at, read off the embeddings (the
-- direct path only; attention and layer norms are ignored): the top tokens
-- of w_out . W_U (what the neuron writes towards the logits; promoted when
-- hook_post > 0, i.e. in gate+_in+ and gate-_in-), of -w_out . W_U (promoted
-- when hook_post < 0), and of +-w_gate . W_E and +-w_in . W_E (input tokens
-- that push x_gate or x_in up or down). After the weight convention.
CREATE TABLE weight_kinds (
    kind        TINYINT PRIMARY KEY,
    name        VARCHAR NOT NULL,
    description VARCHAR NOT NULL
);
INSERT INTO weight_kinds VALUES
    (0, 'out+',  'largest w_out . W_U: promoted when hook_post > 0'),
    (1, 'out-',  'smallest w_out . W_U: promoted when hook_post < 0'),
    (2, 'gate+', 'largest w_gate . W_E: input tokens that push x_gate up'),
    (3, 'gate-', 'smallest w_gate . W_E: input tokens that push x_gate down'),
    (4, 'in+',   'largest w_in . W_E: input tokens that push x_in up'),
    (5, 'in-',   'smallest w_in . W_E: input tokens that push x_in down');

CREATE TABLE weight_tokens (
    layer    SMALLINT NOT NULL,
    neuron   INTEGER  NOT NULL,
    kind     TINYINT  NOT NULL,
    rank     TINYINT  NOT NULL,  -- 0 = most extreme
    token_id INTEGER  NOT NULL,
    score    FLOAT    NOT NULL   -- the dot product
);

-- Min, max and mean of each hook over the tokens of each quadrant (NULL when
-- the quadrant never occurred). 16 rows per neuron.
CREATE TABLE value_stats (
    layer    SMALLINT NOT NULL,
    neuron   INTEGER  NOT NULL,
    quadrant TINYINT  NOT NULL,
    hook     TINYINT  NOT NULL,
    min      FLOAT,
    max      FLOAT,
    mean     DOUBLE
);

-- Top-k texts per (neuron, quadrant, hook) by absolute value; each text at
-- most once per list, at its own most extreme position. Rank 0 is the most
-- extreme; ties go to the lower text_id, then the lower position.
CREATE TABLE examples (
    layer    SMALLINT NOT NULL,
    neuron   INTEGER  NOT NULL,
    quadrant TINYINT  NOT NULL,
    hook     TINYINT  NOT NULL,
    rank     TINYINT  NOT NULL,
    value    FLOAT    NOT NULL,
    text_id  INTEGER  NOT NULL,
    position SMALLINT           -- NULL: not known (an import's example that no model replay located)
);

-- x_gate and x_in of one neuron around each distinct example token (of
-- `examples` and of `samples`), stored once per (layer, neuron, text_id,
-- position) however many lists it is in. A token only in `samples` has a
-- shorter window: at most 8 tokens before it and 2 after (within
-- window_before and window_after), to keep the file small.
-- Values are IEEE float16 bit patterns (decode with f16 below, or in NumPy
-- with np.asarray(x, np.int16).view(np.float16)); act and hook_post follow
-- from them. The window covers window_start .. window_start+len(x_gate)-1.
CREATE TABLE windows (
    layer        SMALLINT   NOT NULL,
    neuron       INTEGER    NOT NULL,
    text_id      INTEGER    NOT NULL,
    position     SMALLINT   NOT NULL,
    window_start SMALLINT   NOT NULL,
    x_gate       SMALLINT[] NOT NULL,
    x_in         SMALLINT[] NOT NULL
);

-- The fixed bins of `histograms` (axis 'value') and of each axis of
-- `density` (axis 'density'): the same in every file, so the counts of a
-- corpus's shards add up. Within a quadrant every value has one sign, so the
-- bins are log-spaced in |value|, mirrored around 0. 'value': two per octave
-- (edges 2^e and 1.5 * 2^e, read off a float32's exponent and top mantissa
-- bit) from 2^-16 to 2^12; 'density': one per two octaves, edges 2^-12,
-- 2^-10, ... 2^8. The bins next to 0 are [-2^-16, 0) and [0, 2^-16) (resp.
-- 2^-12); the outermost are open. Bin `bin` holds lo <= v < hi; NULL is an
-- unbounded end.
CREATE TABLE histogram_bins (
    axis VARCHAR  NOT NULL,  -- 'value' or 'density'
    bin  SMALLINT NOT NULL,  -- 0 .. in increasing order of value
    lo   DOUBLE,
    hi   DOUBLE
);

-- Per neuron, quadrant and hook (hook_post, hook_pre_linear, hook_pre; no
-- `act`): how many of the quadrant's tokens fall in each 'value' bin, as one
-- list: counts[i] (1-based) is the count of bin first_bin + i - 1, from the
-- first bin with a count to the last (zeros between them are kept); a list
-- that would be empty is not stored. Rows of (bin, count):
--   SELECT first_bin + generate_subscripts(counts, 1) - 1 AS bin, unnest(counts) AS count
-- A quadrant's counts sum to its count in `neurons`. Within a quadrant every
-- value has the quadrant's sign, except that a hook_post which underflowed to
-- 0 (act(x_gate) = 0 far below zero, as GELU gives) counts in the bin
-- [0, 2^-16) whatever the quadrant.
CREATE TABLE histograms (
    layer     SMALLINT NOT NULL,
    neuron    INTEGER  NOT NULL,
    quadrant  TINYINT  NOT NULL,
    hook      TINYINT  NOT NULL,
    first_bin SMALLINT NOT NULL,
    counts    BIGINT[] NOT NULL  -- first and last > 0
);

-- The joint distribution of (x_gate, x_in) per neuron over the counted
-- tokens (those in a quadrant), on the 'density' bins of each axis; x_in
-- after the weight convention. One row per gate_bin with a count: counts[i]
-- is the cell (gate_bin, first_in_bin + i - 1), as in `histograms`.
CREATE TABLE density (
    layer        SMALLINT NOT NULL,
    neuron       INTEGER  NOT NULL,
    gate_bin     SMALLINT NOT NULL,
    first_in_bin SMALLINT NOT NULL,
    counts       BIGINT[] NOT NULL  -- first and last > 0
);

-- Per neuron and quadrant, intervals of |hook_post| from typical to extreme:
-- [0, b1), [b1, b2), [b2, b3), [b3, inf), where b1 < b2 < b3 are the
-- 'value' bin edges at which the quadrant's tokens in the run's first
-- calibration_batches batches reach 50 %, 90 % and 99 % (the calibration,
-- done before the pass so that shards agree; recorder/rules.py says how):
-- b_i is the smallest edge E with (tokens with |hook_post| < E) >= that
-- share, then b2 and b3 are pushed up to at least the next edge (down from
-- 2^12 if they run out). A quadrant with no calibration token takes the
-- neuron's tokens of all quadrants; a neuron with none, or a run with
-- calibration_batches = 0, has 2^-4, 2^-2 and 1.
CREATE TABLE intervals (
    layer    SMALLINT NOT NULL,
    neuron   INTEGER  NOT NULL,
    quadrant TINYINT  NOT NULL,
    interval TINYINT  NOT NULL,  -- 0 .. 3, typical first
    lo       FLOAT    NOT NULL,  -- |hook_post| >= lo
    hi       FLOAT               -- |hook_post| < hi; NULL: unbounded
);

-- Examples drawn at random, per neuron and quadrant (not per hook). Every
-- (neuron, token) has a 31-bit hash of (sample_seed, layer, neuron,
-- text_id, position) (recorder/rules.py; not stored: it follows from the key):
--   token_hash = fmix32(fmix32(seed ^ text_id) ^ position)
--   salt       = fmix32(fmix32(seed ^ layer) ^ neuron)
--   hash       = (((token_hash ^ salt) * 0x9E3779B1) mod 2^32) >> 1
-- with fmix32 MurmurHash3's 32-bit finalizer; a list keeps the
-- tokens of smallest hash, at most one per text (a text's token of smallest
-- hash, ties to the lower position; across texts ties go to the lower
-- text_id). Kind 0 (random): up to n_random over the quadrant's tokens, a
-- uniform sample. Kind 1 (interval): up to n_per_interval over the tokens
-- whose |hook_post| is in one interval. Selection depends on no state, so
-- shards merge to the single run's lists exactly. Windows are in `windows`.
CREATE TABLE samples (
    layer    SMALLINT NOT NULL,
    neuron   INTEGER  NOT NULL,
    quadrant TINYINT  NOT NULL,
    kind     TINYINT  NOT NULL,  -- 0 random, 1 interval
    interval TINYINT  NOT NULL,  -- kind 1: the interval; kind 0: 0
    rank     TINYINT  NOT NULL,  -- 0 = smallest hash
    text_id  INTEGER  NOT NULL,
    position SMALLINT NOT NULL,
    x_gate   FLOAT    NOT NULL,  -- the token's values; hook_post = act * x_in
    x_in     FLOAT    NOT NULL,  -- (after the weight convention)
    act      FLOAT    NOT NULL
);

-- For each token and weight kind, the 32 neurons of the whole model with
-- the most extreme score: the transpose of weight_tokens (the same
-- [neurons, vocab] products, reduced along the neuron axis).
CREATE TABLE token_neurons (
    token_id INTEGER  NOT NULL,
    kind     TINYINT  NOT NULL,  -- weight_kinds
    rank     TINYINT  NOT NULL,  -- 0 = most extreme
    layer    SMALLINT NOT NULL,
    neuron   INTEGER  NOT NULL,
    score    FLOAT    NOT NULL
);

-- Neurons connected along the direct residual path: score(A -> B) =
-- cos(w_out of A, g_B * w_via of B) for B in a later layer, where g_B is the
-- gain of B's pre-MLP norm and via is B's gate or in weights (after the
-- weight convention). Per neuron, direction and via: the 16 largest |score|.
CREATE TABLE related (
    layer        SMALLINT NOT NULL,
    neuron       INTEGER  NOT NULL,
    direction    TINYINT  NOT NULL,  -- 0: downstream (later neurons reading this one's output), 1: upstream
    via          TINYINT  NOT NULL,  -- 0: gate, 1: in (the reading neuron's weights)
    rank         TINYINT  NOT NULL,  -- 0 = largest |score|
    other_layer  SMALLINT NOT NULL,
    other_neuron INTEGER  NOT NULL,
    score        FLOAT    NOT NULL
);

-- The activation-side token index: for each token, the lists whose examples
-- (`examples`, the top lists) or samples (`samples`: random and interval,
-- indexed under hook_post) have it as the token of interest (role 0, focus)
-- or right after it (role 1, next: what the model was about to predict). One
-- row per (token, role, list); built from examples, samples and texts when
-- the file is written (and merged).
--
-- A list is one integer, example_list(layer, neuron, quadrant, source, d_mlp),
-- its source being the hook (0 .. 3) of a top list and 4 + samples.kind of a
-- sampled one. A row's token, role and list are one integer too,
-- example_token_key, and the table is sorted by it: a token's rows (and
-- within them a range of layers) are one range of keys, and the file stores
-- the differences between keys, a few bits each, rather than each column in
-- full. The examples' values are not repeated here: best_rank says which
-- example of the list to read. example_token_rows and the view
-- example_token_lists decode the keys.
CREATE TABLE example_tokens (
    key       BIGINT   NOT NULL,  -- example_token_key(token_id, role, list, n_layers, d_mlp)
    matches   SMALLINT NOT NULL,  -- examples of the list with this token in this role
    best_rank TINYINT  NOT NULL   -- the first of them: its place in the list, the rank (top, random) or interval * n_per_interval + rank (interval)
);

CREATE MACRO example_list(layer, neuron, quadrant, source, d_mlp) AS
    ((layer::BIGINT * d_mlp + neuron) * 4 + quadrant) * 6 + source;
CREATE MACRO example_token_key(token_id, role, list, n_layers, d_mlp) AS
    (token_id::BIGINT * 2 + role) * (n_layers * d_mlp * 24) + list;

-- example_tokens' rows with keys in lo .. hi - 1, decoded, given the file's
-- n_layers and d_mlp; a token's rows in layers a .. b are the keys from
-- example_token_key(token_id, role, example_list(a, 0, 0, 0, d_mlp), ...) up
-- to that of layer b + 1.
CREATE MACRO example_token_rows(lo, hi, n_layers, d_mlp) AS TABLE
SELECT (key // (n_layers * d_mlp * 24) // 2)::INTEGER AS token_id,
       (key // (n_layers * d_mlp * 24) % 2)::TINYINT AS role,
       (key % (n_layers * d_mlp * 24) // (d_mlp * 24))::SMALLINT AS layer,
       (key // 24 % d_mlp)::INTEGER AS neuron,
       (key // 6 % 4)::TINYINT AS quadrant,
       (CASE WHEN key % 6 < 4 THEN key % 6 ELSE 0 END)::TINYINT AS hook,      -- the list's hook; 0 for samples
       (CASE WHEN key % 6 < 4 THEN 0 ELSE key % 6 - 3 END)::TINYINT AS kind,  -- 0 top, 1 random, 2 interval
       matches, best_rank, key
FROM example_tokens
WHERE key >= lo AND key < hi;

-- Every row of example_tokens, decoded.
CREATE VIEW example_token_lists AS
SELECT * FROM example_token_rows(0, 9223372036854775807, (SELECT n_layers FROM metadata), (SELECT d_mlp FROM metadata));

-- float16 bit pattern (as SMALLINT) -> FLOAT, for reading windows in SQL.
CREATE MACRO f16(h) AS (
    CASE
        WHEN ((h::INTEGER & 32767) >> 10) = 0
            THEN (1 - 2 * ((h::INTEGER >> 15) & 1)) * ((h::INTEGER & 1023) / 1024.0) * pow(2, -14)
        WHEN ((h::INTEGER & 32767) >> 10) = 31
            THEN CASE WHEN (h::INTEGER & 1023) = 0
                      THEN (1 - 2 * ((h::INTEGER >> 15) & 1)) * 'inf'::DOUBLE
                      ELSE 'nan'::DOUBLE END
        ELSE (1 - 2 * ((h::INTEGER >> 15) & 1)) * (1 + (h::INTEGER & 1023) / 1024.0)
             * pow(2, ((h::INTEGER & 32767) >> 10) - 15)
    END
)::FLOAT;

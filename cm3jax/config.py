"""Shared config defaults and the validation every CLI runs before anything compiles.

Experiment files under `experiments/` start from `base_config()` and change what
they need. `validate()` turns every combination that cannot work (a mesh that does
not divide the devices, a batch that does not split, a sequence longer than the
model) into a `ConfigError` naming the field, which the CLIs print as one line.
"""

from __future__ import annotations

import math

import ml_collections

from cm3jax import vocab as vocab_lib
from cm3jax.errors import ConfigError
from cm3jax.retrieval.policy import base_retrieval_config

KNOWN_TASKS = ("lm", "vqgan", "retriever")
# Config sections a task reads besides the common ones (their experiment files add them).
TASK_SECTIONS = {"vqgan": ("vqgan", "vqgan_train"), "retriever": ("retriever",)}
MESH_AXES = ("data", "fsdp", "tensor")
REMAT_POLICIES = ("none", "full", "dots", "dots_with_no_batch_dims")
DTYPES = ("float32", "bfloat16", "float16")
# The model's vocab is padded to a multiple of this so the embedding shards evenly.
VOCAB_PAD_MULTIPLE = 128


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every experiment; each experiment file overrides what it needs."""
    c = ml_collections.ConfigDict()
    c.task = "lm"  # what cm3jax.train trains: one of KNOWN_TASKS
    c.seed = 0  # seeds parameter init, data order and the step RNG
    c.total_steps = 1000  # optimizer steps to train for
    c.log_every = 10  # steps between progress lines / TensorBoard writes (metrics.jsonl gets every step)
    c.eval_every = 500  # steps between eval-loss passes (0 = never)
    c.eval_steps = 4  # batches per eval pass
    c.peak_flops_per_device = -1.0  # for MFU; -1 = measure (CPU) or look up by device kind (GPU/TPU)
    c.init_from = ""  # LM workdir whose newest checkpoint's parameters start this run ('' = fresh init)
    c.freeze = ()  # parameter path prefixes that get no updates, e.g. ('embed',) or ('blocks/attention',)

    c.vocab = ml_collections.ConfigDict()
    c.vocab.text_size = 56320  # text (BPE) ids; CM3leon's tokenizer has 56,320
    c.vocab.image_codes = 8192  # VQGAN codebook size
    c.vocab.num_masks = 16  # CM3 sentinels <mask:0..15>

    c.model = ml_collections.ConfigDict()
    c.model.vocab_size = -1  # -1 = vocab size rounded up to a multiple of 128
    c.model.max_len = 4096  # longest sequence (size of the learned position table)
    c.model.num_layers = 24  # transformer blocks
    c.model.d_model = 1024  # residual width
    c.model.num_heads = 16  # attention heads
    c.model.head_dim = -1  # -1 = d_model // num_heads
    c.model.mlp_dim = -1  # -1 = 4 * d_model
    c.model.activation = "gelu"  # 'gelu' (OPT/CM3leon) or 'swiglu' (Chameleon)
    c.model.position = "learned"  # 'learned' absolute positions (CM3leon) or 'rope' (Chameleon)
    c.model.rope_theta = 10000.0  # RoPE base frequency
    c.model.image_grid = 0  # > 0: learned row + column embeddings of an image_grid^2-code image added to its codes
    c.model.norm = "layernorm"  # 'layernorm' or 'rmsnorm'
    c.model.norm_params = False  # learned norm scale (CM3leon: parameter-free LayerNorm)
    c.model.norm_eps = 1e-5  # epsilon of every norm
    c.model.norm_placement = "pre"  # 'pre' (x + f(norm(x))) or 'swin' (x + norm(f(x)), Chameleon-34B)
    c.model.qk_norm = False  # per-head LayerNorm on queries and keys (Chameleon)
    c.model.tie_embeddings = True  # output projection = input embedding transposed (OPT)
    c.model.init_std = 0.006  # truncated-normal init std (CM3leon)
    c.model.pos_init_std = 0.0002  # learned-position init std (CM3leon)
    c.model.zero_init_output = True  # residual-branch output projections start at zero (CM3leon)
    c.model.dtype = "bfloat16"  # compute dtype; parameters stay float32
    c.model.param_dtype = "float32"  # master weights
    c.model.scan_layers = True  # stack blocks with lax.scan (fast compile); False = unrolled loop
    c.model.remat_policy = "full"  # one of REMAT_POLICIES
    c.model.attention_impl = "xla"  # jax.nn.dot_product_attention implementation: 'xla' or 'cudnn'

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # 'prepared:DIR' (shards written by cm3jax.data.prepare) or 'synthetic'
    c.data.seq_len = 4096  # tokens per packed training row
    c.data.global_batch_size = 2048  # rows per optimizer step, over all hosts
    c.data.num_threads = 2  # Grain reader threads per host
    c.data.prefetch = 4  # batches Grain keeps ready per host
    c.data.num_workers = 0  # Grain worker processes per host (0 = reader threads only)
    c.data.packing_bins = 8  # open rows the first-fit packer fills at once
    c.data.image_first_probability = 0.5  # documents laid out image-first (image-to-text) vs caption-first
    c.data.retrieved_in_loss = True  # retrieved documents' tokens are trained on (CM3leon) or not (RA-CM3)
    c.data.max_bad_fraction = 0.01  # prepare stops when more records than this cannot be read
    c.data.prepare_if_missing = False  # train runs cm3jax.data.prepare first when 'prepared:DIR' is empty
    c.data.cm3 = ml_collections.ConfigDict()
    c.data.cm3.mask_probability = 1.0  # fraction of documents given the causal-masked transform
    c.data.cm3.mask_rate = 1.0  # Poisson mean of the number of masked spans (CM3)
    c.data.cm3.max_spans = 16  # at most this many spans (and at most vocab.num_masks)
    c.data.cm3.whole_image = False  # an image is masked whole or not at all

    c.retrieval = base_retrieval_config()  # retrieval-augmented documents (off by default)

    c.sft = ml_collections.ConfigDict()  # supervised fine-tuning (cm3jax/data/tasks.py); empty mixture = off
    c.sft.mixture = ml_collections.ConfigDict()  # task -> sampling weight, e.g. {'vqa': 0.3, 'edit': 0.3}
    c.sft.sources = ml_collections.ConfigDict()  # task -> 'shapes' or 'jsonl:DIR' (cm3jax.data.prepare)
    c.sft.shapes_records = ml_collections.ConfigDict()  # task -> {split: records}; default prepare.shapes_records
    c.sft.target_only = True  # loss on the target tokens only (the answer, the edited image), not the prompt

    c.prepare = ml_collections.ConfigDict()  # used by cm3jax.data.prepare only
    c.prepare.sources = ml_collections.ConfigDict({"train": "shapes", "validation": "shapes"})  # split -> spec ('' = skip)
    c.prepare.shapes_records = ml_collections.ConfigDict({"train": 20000, "validation": 1000})  # 'shapes' sizes
    c.prepare.resolution = 32  # images are resized / centre-cropped to this
    c.prepare.image_tokenizer = "palette"  # 'palette' (colour quantiser) or 'vqgan:WORKDIR' (a trained VQGAN)
    c.prepare.palette = "shapes"  # palette of the palette tokenizer
    c.prepare.downsample = 1  # pixels per code side (1 = exact on the shapes palette)
    c.prepare.records_per_shard = 2000  # records per ArrayRecord shard (the unit of parallelism and resume)
    c.prepare.num_workers = 2  # worker processes
    c.prepare.tokenizer_records = 50000  # captions the BPE tokenizer is trained on
    c.prepare.tfds_data_dir = ""  # data_dir of 'tfds:' sources ('' = TFDS default)
    c.prepare.tfds_image_key = "image"  # image feature of 'tfds:' sources
    c.prepare.tfds_text_key = "caption"  # text feature of 'tfds:' sources

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = -1  # pure data parallelism; -1 = whatever the other axes leave
    c.mesh.fsdp = 1  # parameters and optimizer state sharded over this axis (ZeRO-3)
    c.mesh.tensor = 1  # tensor (Megatron) parallelism over heads / mlp / vocab

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 6e-4  # peak LR (CM3leon 350M)
    c.optim.warmup_steps = 1500  # linear warmup (CM3)
    c.optim.schedule = "cosine"  # decay after warmup: 'cosine', 'linear' or 'constant'
    c.optim.min_lr_ratio = 0.1  # final LR as a fraction of the peak
    c.optim.schedule_steps = -1  # steps the LR schedule spans; -1 = total_steps (run part of a schedule)
    c.optim.b1 = 0.9  # Adam beta1 (CM3)
    c.optim.b2 = 0.98  # Adam beta2 (CM3)
    c.optim.eps = 1e-8  # Adam epsilon
    c.optim.weight_decay = 0.1  # AdamW decay on matrices only (not norms)
    c.optim.clip_norm = 1.0  # global gradient-norm clip (CM3)
    c.optim.grad_accum_steps = 1  # microbatches per optimizer step

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every_steps = 500  # steps between saves (plus one at the end and on SIGTERM)
    c.checkpoint.keep = 3  # newest checkpoints kept
    c.checkpoint.async_save = True  # save in a background thread while training continues
    return c


SHAPES_VQGAN_WORKDIR = "workdirs/shapes_vqgan"  # where experiments/shapes_vqgan.py trains by default
SHAPES_VQGAN_CODES = 512  # its codebook size


def use_shapes_benchmark(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Vocab and prepare settings of the shapes benchmark, shared by its prepare and train configs.

    48x48 scenes, tokenized by the f8 VQGAN of experiments/shapes_vqgan.py into 6x6 = 36 codes,
    four per object cell (CM3leon's 256x256 images are 32x32 codes of an f8 VQGAN). The text BPE gets up to
    512 pieces. For tests, `prepare.image_tokenizer='palette'` with `vocab.image_codes=16`
    quantises pixels to the shapes palette instead (exact, no trained model needed).
    """
    c.vocab.text_size = 512  # BPE pieces (the shapes captions need fewer; spare ids stay unused)
    c.vocab.image_codes = SHAPES_VQGAN_CODES  # the shapes VQGAN's codebook
    c.vocab.num_masks = 8  # CM3 sentinels
    c.prepare.sources = ml_collections.ConfigDict({"train": "shapes", "validation": "shapes"})
    c.prepare.shapes_records = ml_collections.ConfigDict({"train": 20000, "validation": 1000})
    c.prepare.resolution = 48  # shapes render size: 16 px grid cells, 2x2 codes each
    c.prepare.image_tokenizer = f"vqgan:{SHAPES_VQGAN_WORKDIR}"  # trained by experiments/shapes_vqgan.py
    c.prepare.palette = "shapes"  # used only with image_tokenizer='palette'
    c.prepare.downsample = 8  # palette pixels per code side: 6x6 codes, as the VQGAN (one colour per block)
    return c


def cm3leon_config(num_layers: int, d_model: int, num_heads: int, learning_rate: float):
    """A CM3leon pretraining config of the given shape (paper Appendix B.2, Table 3).

    All sizes share seq 4096, 8M-token batches (2048 rows) and 1500 warmup steps; heads are
    not stated in the paper, the GPT-3/OPT shape of each size is used.
    """
    c = base_config()
    c.total_steps = 200_000  # 8M-token steps; the paper trained 1.4T-2.4T tokens
    c.model.num_layers = num_layers  # Table 3
    c.model.d_model = d_model  # Table 3
    c.model.num_heads = num_heads  # the GPT-3/OPT shape of this size (not in the paper)
    c.model.max_len = 4096  # Table 3 sequence length
    c.data.seq_len = 4096  # Table 3
    c.data.global_batch_size = 2048  # 2048 x 4096 = 8M tokens per step (Table 3)
    c.optim.learning_rate = learning_rate  # Table 3 peak LR
    c.optim.warmup_steps = 1500  # Table 3
    c.mesh.data = 1  # parameters and optimizer state sharded over every device by default
    c.mesh.fsdp = -1  # ZeRO-3 over all devices; add mesh.tensor for the 7B on GPUs
    return c


def model_vocab_size(config: ml_collections.ConfigDict) -> int:
    """The model's vocab size: explicit, or the vocab's size padded to VOCAB_PAD_MULTIPLE."""
    if config.model.vocab_size > 0:
        return int(config.model.vocab_size)
    size = vocab_lib.from_config(config.vocab).size
    return int(math.ceil(size / VOCAB_PAD_MULTIPLE) * VOCAB_PAD_MULTIPLE)


def mesh_shape(mesh_config: ml_collections.ConfigDict, num_devices: int) -> dict[str, int]:
    """Resolves the mesh sizes (one may be -1) against the device count, or raises ConfigError."""
    sizes = {axis: int(mesh_config[axis]) for axis in MESH_AXES}
    for axis, size in sizes.items():
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}", f"must be >= 1 or -1 (fill), got {size}")
    fill = [axis for axis, size in sizes.items() if size == -1]
    if len(fill) > 1:
        raise ConfigError(f"mesh.{fill[1]}", f"only one mesh axis may be -1, got {', '.join(fill)}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if num_devices % fixed:
        named = [f"{a}={s}" for a, s in sizes.items() if s not in (-1, 1)]
        worst = next((a for a, s in sizes.items() if s not in (-1, 1) and num_devices % s), None)
        field = f"mesh.{worst or named[-1].split('=')[0]}"
        raise ConfigError(
            field, f"mesh {' x '.join(named)} = {fixed} does not divide the {num_devices} devices"
        )
    if fill:
        sizes[fill[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            "mesh.data", f"mesh uses {fixed} devices but {num_devices} are present (set one axis to -1)"
        )
    return sizes


def _check_choice(config: ml_collections.ConfigDict, field: str, choices) -> None:
    value = config
    for part in field.split("."):
        value = value[part]
    if value not in choices:
        raise ConfigError(field, f"{value!r} is not one of {', '.join(map(repr, choices))}")


def _check_fine_tuning(config: ml_collections.ConfigDict) -> None:
    """`init_from` and `freeze`: well-formed, and only for the LM task."""
    if not isinstance(config.init_from, str):
        raise ConfigError("init_from", f"must be a workdir path or '', got {config.init_from!r}")
    freeze = config.freeze
    if not isinstance(freeze, (tuple, list)) or not all(isinstance(p, str) and p.strip("/") for p in freeze):
        raise ConfigError("freeze", f"must be a tuple of parameter path prefixes like ('embed',), "
                                    f"got {freeze!r}")
    for field in ("init_from", "freeze"):
        if config[field] and config.task != "lm":
            raise ConfigError(field, f"only config.task='lm' supports it, not {config.task!r}")


def _check_sft(config: ml_collections.ConfigDict) -> None:
    """`sft.mixture`: known tasks with positive weights, no retrieval, only for the LM."""
    from cm3jax.data.tasks import TASKS  # lazy: the data package imports this module

    mixture = config.sft.mixture
    if not mixture:
        return
    if config.task != "lm":
        raise ConfigError("sft.mixture", f"only config.task='lm' fine-tunes, not {config.task!r}")
    for task, weight in mixture.items():
        if task not in TASKS:
            raise ConfigError(f"sft.mixture.{task}", f"unknown task; known tasks are {', '.join(TASKS)}")
        if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"sft.mixture.{task}", f"weight must be a positive number, got {weight!r}")
    if config.retrieval.enabled:
        raise ConfigError("retrieval.enabled", "fine-tuning examples are not retrieval-augmented; "
                          "set it False when sft.mixture is set")


def validate(config: ml_collections.ConfigDict, num_devices: int, process_count: int = 1) -> dict:
    """Checks a config against the devices it will run on; returns the resolved mesh shape.

    Raises:
      ConfigError: naming the first field whose value cannot work.
    """
    _check_choice(config, "task", KNOWN_TASKS)
    _check_fine_tuning(config)
    _check_sft(config)
    for section in TASK_SECTIONS.get(config.task, ()):
        if section not in config:
            raise ConfigError(section, f"missing: config.task={config.task!r} needs this section "
                              f"(see experiments/shapes_{config.task}.py)")
    for field, choices in (
        ("model.activation", ("gelu", "swiglu")),
        ("model.position", ("learned", "rope")),
        ("model.norm", ("layernorm", "rmsnorm")),
        ("model.norm_placement", ("pre", "swin")),
        ("model.remat_policy", REMAT_POLICIES),
        ("model.dtype", DTYPES),
        ("model.param_dtype", DTYPES),
        ("model.attention_impl", ("xla", "cudnn")),
        ("optim.schedule", ("cosine", "linear", "constant")),
    ):
        _check_choice(config, field, choices)
    if config.data.source != "synthetic" and not config.data.source.startswith("prepared:"):
        raise ConfigError("data.source", f"{config.data.source!r} is neither 'synthetic' nor 'prepared:DIR'")

    mesh = mesh_shape(config.mesh, num_devices)
    m, d = config.model, config.data
    for field in ("total_steps", "log_every", "checkpoint.every_steps", "checkpoint.keep",
                  "data.seq_len", "data.global_batch_size", "optim.grad_accum_steps",
                  "model.num_layers", "model.d_model", "model.num_heads", "model.max_len"):
        value = config
        for part in field.split("."):
            value = value[part]
        if value < 1:
            raise ConfigError(field, f"must be >= 1, got {value}")

    if m.image_grid < 0:
        raise ConfigError("model.image_grid", f"must be >= 0 (0 = no 2-D code positions), got {m.image_grid}")
    if config.eval_every > 0 and config.eval_steps < 1:
        raise ConfigError("eval_steps", f"must be >= 1 when eval_every > 0, got {config.eval_steps}")
    if d.seq_len > m.max_len:
        raise ConfigError("data.seq_len", f"{d.seq_len} is longer than model.max_len={m.max_len}")
    vocab_size = vocab_lib.from_config(config.vocab).size
    if m.vocab_size != -1 and m.vocab_size < vocab_size:
        raise ConfigError(
            "model.vocab_size", f"{m.vocab_size} is smaller than the tokenizer vocab ({vocab_size} ids)"
        )

    batch_shards = mesh["data"] * mesh["fsdp"]
    accum = config.optim.grad_accum_steps
    if d.global_batch_size % (batch_shards * accum):
        raise ConfigError(
            "data.global_batch_size",
            f"{d.global_batch_size} is not divisible by data x fsdp = {batch_shards} devices"
            + (f" times grad_accum_steps={accum}" if accum > 1 else ""),
        )
    if d.global_batch_size % process_count:
        raise ConfigError(
            "data.global_batch_size", f"{d.global_batch_size} does not split over {process_count} hosts"
        )

    head_dim = m.head_dim if m.head_dim > 0 else m.d_model // m.num_heads
    if m.head_dim <= 0 and m.d_model % m.num_heads:
        raise ConfigError("model.num_heads", f"{m.num_heads} does not divide d_model={m.d_model}")
    if m.position == "rope" and head_dim % 2:
        raise ConfigError("model.head_dim", f"RoPE needs an even head_dim, got {head_dim}")
    mlp_dim = m.mlp_dim if m.mlp_dim > 0 else 4 * m.d_model
    for field, size, axis in (
        ("model.num_heads", m.num_heads, "tensor"),
        ("model.mlp_dim", mlp_dim, "tensor"),
        ("model.vocab_size", model_vocab_size(config), "tensor"),
        ("model.d_model", m.d_model, "fsdp"),
    ):
        if size % mesh[axis]:
            raise ConfigError(field, f"{size} is not divisible by mesh.{axis}={mesh[axis]}")
    return mesh

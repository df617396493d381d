r"""SyCoCa pretraining (and its CoCa / CLIP baselines from the same code).

Tiny run on the embedded dataset, 2 CPU cores, a few minutes:

  python -m sycoca_jax.main --config=configs/sycoca.py:tiny --workdir=/tmp/sycoca_tiny

CoCa-Base/16 on CC3M prepared with `python -m sycoca_jax.data.prepare local ...`:

  python -m sycoca_jax.main --config=configs/sycoca.py:size=B/16,objective=coca,data=cc3m \
      --config.data.data_dir=gs://bucket/tfds --workdir=gs://bucket/runs/coca_b16_cc3m

Arguments (comma separated ``key=value``; a bare word is the size):
  size       tiny | S/16 | B/16 | B/32 | L/14   (CoCa Table 1 widths; ``tiny`` for CPUs)
  objective  sycoca | coca | clip
  data       shapes | shapes_clutter | cc3m | cc12m
             (``shapes`` is the embedded default dataset; ``shapes_clutter`` the same scenes
             among caption-unrelated distractors on textured backgrounds)
"""

from __future__ import annotations

import ml_collections

from sycoca_jax.config_args import parse_arg
from sycoca_jax.evaluation import registry
from sycoca_jax.models import vit


def image_tower(variant: str) -> dict:
    """``SyCoCa``'s image-tower fields of a ViT variant (``"B/16"``) from the one variant table,
    ``sycoca_jax.models.vit.VIT_VARIANTS``."""
    v = vit.decode_variant(variant)
    return dict(
        patch_size=v["patch_size"],
        image_width=v["width"],
        image_depth=v["depth"],
        image_heads=v["num_heads"],
        image_mlp_dim=v["mlp_dim"],
    )


# Text side and heads per ViT width: CoCa Table 1 (Base: 12 + 12 layers, width 768, 12 heads;
# Large: width 1024, 16 heads). S is our scaled-down point: ViT-S with a 6 + 6 layer text side.
TEXT_SIDES = {
    "S": dict(
        text_width=384,
        text_depth=6,
        multimodal_depth=6,
        text_heads=6,
        text_mlp_dim=1536,
        embed_dim=384,
        caption_queries=256,
        pooler_heads=6,
    ),
    "B": dict(
        text_width=768,
        text_depth=12,
        multimodal_depth=12,
        text_heads=12,
        text_mlp_dim=3072,
        embed_dim=512,
        caption_queries=256,
        pooler_heads=8,
    ),
    "L": dict(
        text_width=1024,
        text_depth=12,
        multimodal_depth=12,
        text_heads=16,
        text_mlp_dim=4096,
        embed_dim=768,
        caption_queries=256,
        pooler_heads=16,
    ),
}

# Every model size: ``tiny`` (for CPUs) spelled out, the others a ViT variant at 224 px plus the
# text side of its width.
SIZES = {
    "tiny": dict(
        image_size=64,
        patch_size=8,
        image_width=64,
        image_depth=2,
        image_heads=2,
        image_mlp_dim=256,
        text_width=64,
        text_depth=2,
        multimodal_depth=2,
        text_heads=2,
        text_mlp_dim=256,
        embed_dim=64,
        caption_queries=16,
        pooler_heads=2,
        decoder_width=64,
        decoder_depth=1,
        decoder_heads=2,
        decoder_mlp_dim=256,
        vocab_size=512,
        max_text_len=24,
        dtype="float32",
        scan=False,
    ),
    **{
        variant: dict(image_size=224, **image_tower(variant), **TEXT_SIDES[variant.split("/")[0]])
        for variant in ("S/16", "B/16", "B/32", "L/14")
    },
}

# Defaults of every non-tiny size (tiny spells out its own values in SIZES).
LARGE_DEFAULTS = dict(
    vocab_size=64_000,
    max_text_len=76,
    decoder_width=512,
    decoder_depth=4,
    decoder_heads=16,
    decoder_mlp_dim=2048,
    dtype="bfloat16",
    scan=True,
    # cuDNN flash attention on GPUs, splash attention on TPUs where shapes allow, else XLA
    # (sycoca_jax.models.attention.choose).
    attention_impl="auto",
)

OBJECTIVES = {
    # objective: model switches and loss weights (SyCoCa: L = ITC + 2 caption + TG-MIM).
    "sycoca": dict(
        model=dict(
            use_captioning=True,
            use_tgmim=True,
            caption_masking="attentive",
            tgmim_masking="attentive",
        ),
        loss=dict(itc_weight=1.0, caption_weight=2.0, tgmim_weight=1.0),
    ),
    "coca": dict(
        model=dict(use_captioning=True, use_tgmim=False, caption_masking="none"),
        loss=dict(itc_weight=1.0, caption_weight=2.0, tgmim_weight=0.0),
    ),
    "clip": dict(
        model=dict(use_captioning=False, use_tgmim=False, caption_masking="none"),
        loss=dict(itc_weight=1.0, caption_weight=0.0, tgmim_weight=0.0),
    ),
}


def model_config(size: str, objective: str) -> ml_collections.ConfigDict:
    """Fields of ``sycoca_jax.models.sycoca.SyCoCa`` for a size and objective."""
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; known: {', '.join(SIZES)}")
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
    fields = dict(
        pad_id=0,  # the tokenizer's special ids (checked against it by the input pipeline)
        bos_id=1,
        eos_id=2,
        posemb="learn",
        pooler="cascade",
        temperature_init=1 / 0.07,
        temperature_max=100.0,
        score_mode="max_sim",
        caption_masking="attentive",
        caption_keep_ratio=0.5,
        # Old spellings of the two above (deprecated; set, they override with a warning).
        ic_masking=ml_collections.config_dict.placeholder(str),
        ic_keep_ratio=ml_collections.config_dict.placeholder(float),
        tgmim_masking="attentive",
        tgmim_mask_ratio=0.5,
        branch_encoding="reencode",
        text_guided=True,
        norm_pix_loss=True,
        attention_impl="xla",
        remat="none",
        # Scanned stacks: layers per iteration of the scan's loop; 0 runs them with no loop
        # (parameters still stacked), which XLA's GPU compiler handles with fewer copies.
        scan_unroll=1,
    )
    if size != "tiny":
        fields.update(LARGE_DEFAULTS)
    fields.update(SIZES[size])
    fields.update(OBJECTIVES[objective]["model"])
    return ml_collections.ConfigDict(fields)


# The embedded datasets (generated on first use): data=<key> reads sycoca_shapes/<config>.
SHAPES_DATA = {"shapes": "sycoca_shapes", "shapes_clutter": "sycoca_shapes/clutter"}


def data_config(name: str) -> ml_collections.ConfigDict:
    """``config.data`` for ``data=shapes|shapes_clutter|cc3m|cc12m`` (``sycoca_jax.data.pipeline``
    reads it).

    Image size and caption length come from ``config.model`` (image_size, max_text_len).
    """
    placeholder = ml_collections.config_dict.placeholder
    common = dict(
        data_dir=placeholder(str),  # unset: $SYCOCA_DATA_DIR, else ~/tensorflow_datasets
        tokenizer=placeholder(str),  # SentencePiece .model; unset: the dataset's bundled one
        train_split="train",
        eval_split=placeholder(str),
        shuffle_seed=0,
        num_workers=2,  # threads or processes preprocessing the input; 0 = inline
        prefetch="thread",  # "thread" | "process" (grain worker processes)
        prefetch_buffer_size=2,  # batches buffered ahead (per worker with "process")
        device_prefetch=2,  # batches sent to the devices while the step runs; 0: none
        crop_scale=(0.9, 1.0),  # random-resized-crop area fraction, training only
        min_image_size=32,  # shorter side in pixels; smaller images are skipped
        max_skipped_fraction=0.01,  # stop if more records than this are bad at load time
        image_decoder="pil",  # "pil": we decode (bad images skipped); "tfds": TFDS decodes
    )
    if name in SHAPES_DATA:
        # 64 px PNGs decode fast: one background thread keeps up (~2k examples/s on 2 cores),
        # more threads only contend for the GIL.
        fields = dict(
            common,
            name=SHAPES_DATA[name],
            eval_split="validation",
            min_image_size=16,
            max_skipped_fraction=0.0,
            num_workers=1,
        )
    elif name in ("cc3m", "cc12m"):
        # Built with `python -m sycoca_jax.data.prepare local --name=cc3m ...`; cc12m has no
        # official validation split (give one with --source=validation=... to set eval_split).
        fields = dict(
            common,
            name=name,
            num_workers=16,
            prefetch="process",
            eval_split="validation" if name == "cc3m" else placeholder(str),
        )
    else:
        raise ValueError(f"unknown data {name!r}; known: {', '.join(SHAPES_DATA)}, cc3m, cc12m")
    return ml_collections.ConfigDict(fields)


def eval_entry(
    kind: str, split: str, dataset: str | None = None, **fields
) -> ml_collections.ConfigDict:
    """One ``config.evals`` entry: ``kind`` and every field of that evaluator's ``Settings``
    (``sycoca_jax.evaluation.registry``; an unknown field is an error), defaults overridden by
    ``fields``. ``dataset`` unset = the training data's dataset; ``every_steps`` > 0 also runs it
    during training (and at the end); ``required`` True fails before training when the model
    cannot run it (otherwise such an entry is dropped with one log line)."""
    return registry.entry_config(kind, split=split, dataset=dataset, **fields)


def evals_config(size: str, data: str) -> ml_collections.ConfigDict:
    """Downstream evaluations (``python -m sycoca_jax.evaluate``, and during training for the
    entries with ``every_steps``). Real datasets are read from ``config.data.data_dir``."""
    if data == "shapes":
        # Offline: the embedded test split (it holds compositional, unseen colour/kind pairs).
        every = 500 if size == "tiny" else 0
        evals = dict(
            shapes_zeroshot=eval_entry("zeroshot", "test", templates="shapes", every_steps=every),
            shapes_retrieval=eval_entry("retrieval", "test", every_steps=every),
            shapes_captioning=eval_entry(
                "captioning", "test", decode="greedy", every_steps=every, num_examples=512
            ),
            # Does relevance find the described objects? (sycoca_jax.evaluation.mechanism)
            shapes_mechanism=eval_entry("mechanism", "test", every_steps=every),
        )
    else:
        evals = dict(
            coco_retrieval=eval_entry("retrieval", "test", "coco_captions"),  # Karpathy 5k
            coco_captioning=eval_entry("captioning", "test", "coco_captions"),
            imagenet_zeroshot=eval_entry("zeroshot", "validation", "imagenet2012"),
            cifar10_zeroshot=eval_entry("zeroshot", "test", "cifar10"),
            cifar100_zeroshot=eval_entry("zeroshot", "test", "cifar100"),
        )
    return ml_collections.ConfigDict(evals)


def train_fields(size: str, data: str) -> dict:
    """Duration, optimiser, mesh, logging and checkpointing (``sycoca_jax.train`` reads them).

    Durations take one unit each: ``total_steps`` / ``total_epochs`` / ``total_examples`` (and
    ``optim.warmup_*`` likewise).
    """
    placeholder = ml_collections.config_dict.placeholder
    tiny = size == "tiny"
    optim = dict(
        # open_clip's CoCa defaults; lr scaled for the batch. Weight decay skips biases, norms,
        # position embeddings, learned tokens and the temperature (sycoca_jax.optim).
        lr=2e-3 if tiny else 5e-4,
        b1=0.9,
        b2=0.98,
        eps=1e-6,
        weight_decay=0.05 if tiny else 0.2,
        grad_clip=1.0,
        schedule="cosine",  # cosine | linear | constant, after a linear warmup from 0
        end_lr_fraction=0.0,
        warmup_steps=100 if tiny else 2000,
        warmup_epochs=placeholder(float),
        warmup_examples=placeholder(int),
    )
    epochs = {"shapes": 20.0, "cc3m": 30.0, "cc12m": 20.0}[data]  # paper: 20 epochs of CC12M
    return dict(
        seed=0,
        total_steps=1500 if tiny else placeholder(int),
        total_epochs=placeholder(float) if tiny else epochs,
        total_examples=placeholder(int),
        microbatches=1,  # >1: accumulate gradients (ITC then sees only each microbatch)
        optim=ml_collections.ConfigDict(optim),
        # Mesh axes (data, fsdp, tensor), one size may be -1; rules: data_parallel | fsdp |
        # fsdp_tensor (sycoca_jax.sharding).
        mesh=ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules="fsdp")),
        log_every_steps=50 if tiny else 100,
        eval_every_steps=500 if tiny else 5000,  # validation losses; 0 = never
        eval_batches=8 if tiny else 50,
        checkpoint_every_steps=500 if tiny else 2000,
        keep_checkpoints=3,
        profile_steps="",  # "a,b": jax.profiler trace of steps a..b into <workdir>/profile
        tensorboard_pictures=4,  # images drawn to TensorBoard when evals run (train/pictures.py)
        resume=placeholder(str),  # a checkpoint to continue from when the workdir has none
        # Resuming with fields that define the run changed (batch size, data, model, optimiser,
        # ...) is refused; list the dotted keys accepted anyway, e.g. "optim.lr,batch_size".
        allow_config_change="",
        # Persistent compilation cache (local or gs://); unset: $JAX_COMPILATION_CACHE_DIR, which
        # the launchers set, else none.
        compilation_cache_dir=placeholder(str),
        # Transfer init: copy these parameter subtrees from a checkpoint before training.
        init=ml_collections.ConfigDict(
            dict(checkpoint=placeholder(str), subtrees=("image_encoder",))
        ),
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, positional="size", size="tiny", objective="sycoca", data="shapes")
    config = ml_collections.ConfigDict()
    config.size = args.size
    config.objective = args.objective
    config.model = model_config(args.size, args.objective)
    config.loss = ml_collections.ConfigDict(
        dict(
            **OBJECTIVES[args.objective]["loss"],
            label_smoothing=0.0,
            caption_chunk_len=8,  # positions per chunk of the caption loss (losses.py); 0: all
        )
    )
    config.data = data_config(args.data)
    config.batch_size = 32 if args.size == "tiny" else 2048  # global, over all processes
    family = "shapes" if args.data in SHAPES_DATA else args.data  # schedule and evals
    config.update(train_fields(args.size, family))
    config.evals = evals_config(args.size, family)
    return config

r"""Transfer of a pretraining checkpoint: linear probe, fine-tuned classifier, VQA (CoCa App. A/B).

On the embedded dataset from the tiny pretraining (0.5, 1 and 2 minutes on 2 CPU cores):

  python -m sycoca_jax.transfer --config=configs/transfer.py:task=linear_probe \
      --init=/tmp/sycoca_tiny --workdir=/tmp/sycoca_tiny_probe
  python -m sycoca_jax.transfer --config=configs/transfer.py:task=finetune \
      --init=/tmp/sycoca_tiny --workdir=/tmp/sycoca_tiny_finetune
  python -m sycoca_jax.transfer --config=configs/transfer.py:task=vqa \
      --init=/tmp/sycoca_tiny --workdir=/tmp/sycoca_tiny_vqa

VQAv2 converted with `python -m sycoca_jax.data.prepare vqa ... --name=coco_vqa`:

  python -m sycoca_jax.transfer --config=configs/transfer.py:task=vqa,data=local \
      --config.data.name=coco_vqa --init=gs://bucket/runs/sycoca_b16 --workdir=...

Arguments (comma separated ``key=value``; a bare word is the task):
  task  linear_probe | finetune | vqa
  data  shapes (default) | cifar10 | cifar100 | imagenet2012 (classification) | local (VQA data
        from the converter; set --config.data.name)

``--init`` (or ``config.init``) is the pretraining workdir; ``init_step`` picks a step (default
the latest). The model is rebuilt from the checkpoint's own config; ``config.model`` may change
only how it computes (dtype, attention_impl, remat, scan_unroll). The tokenizer is the
pretraining run's unless ``data.tokenizer`` is set.

Recipes:
  linear_probe  frozen features (``linear_probe.feature``: mean of the patch states, the
                contrastive embedding, or both), standardised; multinomial logistic regression
                (Adam, full batch or ``linear_probe.batch_size``) for each ``l2_grid`` value at
                once; the best on ``data.select_split`` is reported on every ``data.eval_splits``.
  finetune      a new single-query attentional pooler over the patch states + a zero-initialised
                linear classifier; softmax cross-entropy with ``head.label_smoothing``; the image
                tower trains at ``optim.tower_lr`` (head: ``optim.lr``), or is frozen with
                ``optim.freeze_tower`` (CoCa's frozen-feature evaluation). Augmentation: random
                resized crop (``data.crop_scale``); RandAugment is not implemented.
  vqa           image -> image encoder -> captioning pooler; question -> unimodal text decoder
                -> multimodal decoder cross-attending to the image; a new single-query pooler
                over the decoder states + a classifier over the ``vqa.answer_vocab_size`` most
                frequent training answers; soft-target cross-entropy on the human answers'
                accuracies; ``vqa.caption_weight`` > 0 co-trains captioning on "question answer".
                All towers fine-tune at ``optim.tower_lr`` unless ``optim.freeze_tower``.

Reported (``<workdir>/transfer_results.json``): top-1/top-5 or VQA accuracy (``vqa.accuracy``:
``vqav2`` averages min(#matches/3, 1) over the leave-one-out answer subsets as the official
evaluation does; ``simple`` is min(#matches/3, 1); a single reference answer, as in the embedded
data, scores exact match) per split, with chance levels. On the embedded data the ``test`` split
is compositional: a quarter of its scenes have a colour/kind pair never seen in training, whose
class a classifier trained on ``train`` cannot predict (so test top-1 is at most about 0.75).
"""

from __future__ import annotations

import ml_collections

from sycoca_jax.config_args import parse_arg

TASKS = ("linear_probe", "finetune", "vqa")
CLASSIFICATION_DATA = ("shapes", "cifar10", "cifar100", "imagenet2012")
VQA_DATA = ("shapes", "local")
SHAPES_SLOTS = ("colour", "kind", "count", "position")  # the embedded data's 4 questions


def data_config(data: str, task: str) -> ml_collections.ConfigDict:
    """``config.data``: which dataset, splits and input pipeline settings."""
    placeholder = ml_collections.config_dict.placeholder
    allowed = VQA_DATA if task == "vqa" else CLASSIFICATION_DATA
    if data not in allowed:
        raise ValueError(f"task {task} runs on data {allowed}, not {data!r}")
    fields = dict(
        data_dir=placeholder(str),  # unset: $SYCOCA_DATA_DIR, else ~/tensorflow_datasets
        train_split="train",
        shuffle_seed=0,
        num_workers=16,
        prefetch="process",
        prefetch_buffer_size=2,
        min_image_size=32,
        max_skipped_fraction=0.01,
        image_decoder="pil",
    )
    if data == "shapes":
        fields.update(
            name="sycoca_shapes",
            eval_splits=("validation", "test"),
            num_workers=1,  # 64 px PNGs: one thread keeps up on 2 cores
            prefetch="thread",
            min_image_size=16,
            max_skipped_fraction=0.0,
        )
        if task == "linear_probe":
            fields["select_split"] = "validation"
    elif data == "local":
        fields.update(name="coco_vqa", eval_splits=("validation",))
    elif data == "imagenet2012":
        fields.update(name=data, eval_splits=("validation",))
        if task == "linear_probe":
            fields.update(train_split="train[:99%]", select_split="train[99%:]")
    else:  # cifar
        fields.update(name=data, eval_splits=("test",), min_image_size=16)
        if task == "linear_probe":
            fields.update(train_split="train[:90%]", select_split="train[90%:]")
    if task != "linear_probe":
        fields["crop_scale"] = (0.9, 1.0) if data == "shapes" else (0.5, 1.0)
    if task == "vqa":
        fields["tokenizer"] = placeholder(str)  # unset: the pretraining run's tokenizer
    return ml_collections.ConfigDict(fields)


def optim_config(task: str, shapes: bool) -> ml_collections.ConfigDict:
    """AdamW for the head (``lr``) and the tower (``tower_lr``), warmup + cosine decay."""
    placeholder = ml_collections.config_dict.placeholder
    return ml_collections.ConfigDict(
        dict(
            lr=2e-3 if shapes else 1e-3,
            tower_lr=(5e-4 if task == "vqa" else 2e-4) if shapes else 5e-5,
            freeze_tower=False,
            b1=0.9,
            b2=0.999,
            eps=1e-8,
            weight_decay=0.05 if shapes else 0.01,
            grad_clip=1.0,
            schedule="cosine",
            end_lr_fraction=0.0,
            warmup_steps=30 if shapes else placeholder(int),
            warmup_epochs=placeholder(float) if shapes else 0.5,
            warmup_examples=placeholder(int),
        )
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    args = parse_arg(arg, positional="task", task="linear_probe", data="shapes")
    if args.task not in TASKS:
        raise ValueError(f"unknown task {args.task!r}; known: {', '.join(TASKS)}")
    placeholder = ml_collections.config_dict.placeholder
    shapes = args.data == "shapes"
    config = ml_collections.ConfigDict()
    config.task = args.task
    config.init = placeholder(str)  # the pretraining workdir; --init sets it
    config.init_step = placeholder(int)  # default: its latest checkpoint
    config.seed = 0
    # Resuming with fields that define the run changed is refused; list the dotted keys
    # accepted anyway, e.g. "optim.lr,batch_size".
    config.allow_config_change = ""
    # How the pretrained model computes (None: as in pretraining); what it computes is fixed.
    config.model = ml_collections.ConfigDict(
        dict(
            dtype=placeholder(str),
            attention_impl=placeholder(str),
            remat=placeholder(str),
            scan_unroll=placeholder(int),
        )
    )
    config.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1), rules="fsdp"))
    config.data = data_config(args.data, args.task)
    config.eval_batch_size = 256 if shapes else 1024  # global, over all processes
    if args.task == "linear_probe":
        config.save_checkpoint = True  # the probe under <workdir>/checkpoints/0
        config.linear_probe = ml_collections.ConfigDict(
            dict(
                feature="mean_patch+embedding",  # | mean_patch | embedding
                l2_grid=(0.0, 1e-4, 1e-3),
                steps=300,
                lr=3e-2,
                batch_size=0 if shapes else 16_384,  # 0: full batch
            )
        )
        return config
    config.batch_size = (64 if args.task == "finetune" else 32) if shapes else 512
    config.total_steps = (300 if args.task == "finetune" else 250) if shapes else placeholder(int)
    config.total_epochs = placeholder(float) if shapes else 10.0
    config.total_examples = placeholder(int)
    config.log_every_steps = 50 if shapes else 100
    # As in pretraining: the trained head (and tower) with the data position under
    # <workdir>/checkpoints, also at the last step and on SIGTERM; a run resumes from them.
    config.checkpoint_every_steps = 100 if shapes else 1000
    config.keep_checkpoints = 2
    config.optim = optim_config(args.task, shapes)
    config.head = ml_collections.ConfigDict(
        dict(num_heads=placeholder(int))  # the pooler's heads; unset: the pretrained poolers'
    )
    if args.task == "finetune":
        config.head.label_smoothing = 0.1
    else:
        config.vqa = ml_collections.ConfigDict(
            dict(
                max_questions=4 if shapes else 8,  # per image; more are dropped
                max_answers=1 if shapes else 10,  # human answers kept per question
                answer_vocab_size=3129,  # CoCa / VQAv2: the 3,129 most frequent answers
                answer_vocab=placeholder(str),  # a saved answer_vocab.json instead
                accuracy="vqav2",  # vqav2 | simple
                caption_weight=0.0,  # > 0: co-train captioning on "question answer" texts
                slot_names=SHAPES_SLOTS if shapes else (),  # name question slots to report them
            )
        )
    return config

"""Transfer of a pretrained SyCoCa checkpoint to downstream tasks (CoCa App. A/B).

``python -m sycoca_jax.transfer --config=configs/transfer.py:task=... --init=CKPT --workdir=DIR``

- ``linear_probe``: frozen features, a linear classifier (``linear_probe.py``);
- ``finetune``: a new attentional pooler + linear head over the image encoder, tower fine-tuned
  or frozen (``finetune.py``);
- ``vqa``: question through the text decoders and the multimodal decoder with the image, a new
  pooler + classifier over the answer vocabulary (``vqa.py``).

``towers.py`` restores the needed parameter subtrees and runs them; ``heads.py`` holds the new
modules; ``trainer.py`` trains a head with the pretraining loop (``sycoca_jax.train.loop``);
``run.py`` ties a run together and writes ``transfer_results.json``.
"""

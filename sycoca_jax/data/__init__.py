"""The data layer: datasets, tokenizer, preprocessing and grain input pipelines.

  shapes.py          generator of the embedded captioned-shapes scenes (pure Python + PIL)
  shapes_builder.py  its TFDS builder (ArrayRecord, generated on first use, no download)
  clutter.py         caption-unrelated distractors and textures of the ``clutter`` builds
  sources.py         data_dir resolution, opening TFDS data sources without TensorFlow
  tokenizer.py       SentencePiece with fixed pad/bos/eos/unk ids; ``train`` CLI; loading by
                     reference (``config.data.tokenizer``)
  clip_bpe.py        CLIP's byte-level BPE (open_clip's tokenizer), same interface
  images.py          image decoding: every PIL mode to 8-bit RGB, size limits, crop + resize
  transforms.py      per-record grain transforms (image, caption, tokens, label, eval masks)
  vqa_transforms.py  VQA's per-record step (question tokens, answer targets)
  skipping.py        bad records at load time: replaced, counted, carried in the stream
  stream.py          the training stream: global positions, per-record randomness, any layout
  iterator_state.py  the checkpointed data-iterator state, restorable on another process count
  pipeline.py        train/eval pipelines, per-process slicing, global arrays
  task_pipelines.py  labelled pipelines for transfer (classification, VQA)
  vqa_answers.py     VQA answer normalisation, answer vocabulary, VQA accuracy
  readers.py         local image-caption inputs (webdataset tars, JSONL, CSV)
  converter.py       converter of local image-caption data to ArrayRecord; skips counted
  vqa_converter.py   VQA converter (image, question, human answers), built on ``converter``
  prepare.py         the converters' command line: ``local`` / ``vqa`` / ``shapes``
  benchmark.py       examples/s of the training input pipeline

Nothing is imported here, so importing one module does not pull in the others (or TFDS).
"""

"""The data layer: datasets, tokenizer, preprocessing and grain input pipelines.

  shapes.py          generator of the embedded captioned-shapes scenes (pure Python + PIL)
  shapes_builder.py  its TFDS builder (ArrayRecord, generated on first use, no download)
  clutter.py         caption-unrelated distractors and textures of the ``clutter`` builds
  sources.py         data_dir resolution, opening TFDS data sources without TensorFlow
  tokenizer.py       SentencePiece with fixed pad/bos/eos/unk ids; ``train`` CLI
  transforms.py      per-record numpy/PIL grain transforms (decode, crop, tokenise, ...)
  skipping.py        bad records at load time: dropped, counted, carried in the stream
  pipeline.py        train/eval pipelines, per-process slicing, global arrays
  task_pipelines.py  labelled pipelines for transfer (classification, VQA)
  vqa_answers.py     VQA answer normalisation, answer vocabulary, VQA accuracy
  readers.py         local image-caption inputs (webdataset tars, JSONL, CSV)
  prepare.py         converter to ArrayRecord TFDS datasets; ``local`` / ``vqa`` / ``shapes`` CLI
  prepare_vqa.py     VQA converter (image, question, human answers); ``prepare vqa``
  benchmark.py       examples/s of the training input pipeline

Nothing is imported here, so importing one module does not pull in the others (or TFDS).
"""

"""The data layer: datasets, tokenizer, preprocessing and grain input pipelines.

  shapes.py          generator of the embedded captioned-shapes scenes (pure Python + PIL)
  shapes_builder.py  its TFDS builder (ArrayRecord, generated on first use, no download)
  sources.py         data_dir resolution, opening TFDS data sources without TensorFlow
  tokenizer.py       SentencePiece with fixed pad/bos/eos/unk ids; ``train`` CLI; loading by
                     reference (``config.data.tokenizer``)
  clip_bpe.py        CLIP's byte-level BPE (open_clip's tokenizer), same interface
  transforms.py      per-record numpy/PIL grain transforms (decode, crop, tokenise, ...)
  skipping.py        bad records at load time: dropped, counted, carried in the stream
  pipeline.py        train/eval pipelines, per-process slicing, global arrays
  readers.py         local image-caption inputs (webdataset tars, JSONL, CSV)
  prepare.py         converter to ArrayRecord TFDS datasets; ``local`` / ``shapes`` CLI
  benchmark.py       examples/s of the training input pipeline

Nothing is imported here, so importing one module does not pull in the others (or TFDS).
"""

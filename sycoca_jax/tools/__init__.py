"""Command-line tools: model summary, benchmarks, checkpoint inspection, open_clip CoCa weights
in (``import_open_clip``) and out (``export_open_clip``)."""

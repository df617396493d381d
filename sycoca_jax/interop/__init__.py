"""Interoperability with open_clip's CoCa: its model configs as SyCoCa fields
(``open_clip_config``), its released models (``open_clip_presets``), and its weights as SyCoCa
parameters and back (``open_clip_weights``)."""

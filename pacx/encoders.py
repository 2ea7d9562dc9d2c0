"""Deprecated: split into :mod:`pacx.weights.formats` (reading), :mod:`pacx.models.load` (building)
and :func:`pacx.share.export_encoder` (exporting); each old name warns and resolves there
(:mod:`pacx.deprecated`).
"""

from pacx.deprecated import moved_names

_FORMATS = "pacx.weights.formats"
__getattr__ = moved_names(__name__, {
    **dict.fromkeys([
        "AUTHORS_LORA_SCALING", "AUTHORS_STAGE2_NORM_EPS", "AUTHORS_STAGE2_PREFIX", "CHECKPOINT_FORMATS",
        "EXPORT_FORMAT_VERSION", "MODEL_FOLDER_WEIGHTS", "STAGE_ENCODER_EXTRACTORS", "EncoderWeights",
        "read_encoder_weights", "read_mae_state", "register_checkpoint_format", "register_stage_extractor",
    ], _FORMATS),
    "HEAD_KEY_PREFIXES": "pacx.weights.layout",
    "build_encoder": "pacx.models.load",
    "load_encoder": "pacx.models.load",
    "export_encoder": "pacx.share",
})

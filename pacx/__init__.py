"""pacx: PaCX-MAE — physiology-augmented chest X-ray masked autoencoder.

Stage 1 (MAE on CheXpert), Stage 2 (cross-modal distillation on Symile-MIMIC) and Stage 3
(unimodal evaluation). ``pacx.load_encoder(path)`` loads any encoder pacx produces or accepts.
Nothing here does work on import.
"""

__version__ = "0.1.0"


def load_encoder(path, cfg=None, which: str = "last", allow_debug: bool | None = None):
    """Load an encoder from a run directory, checkpoint, export or third-party file (eval mode). Weights of a
    debug run (fast_dev_run / overfit_batches / limit_*) are refused unless ``allow_debug=True``."""
    # here, not above: every `import pacx.x` runs this file, and this import pulls in torch and timm
    from pacx.models.load import load_encoder as _load

    return _load(path, cfg=cfg, which=which, allow_debug=allow_debug)


__all__ = ["__version__", "load_encoder"]

"""Weight files without networks: safe loading (:mod:`~pacx.weights.checkpoint`), the timm ViT tensor layout
(:mod:`~pacx.weights.layout`) and the encoder formats pacx reads and writes (:mod:`~pacx.weights.formats`).
Needs torch, safetensors and pacx's base modules only; :mod:`pacx.models.load` builds networks.
"""

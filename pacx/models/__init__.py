"""Plain ``nn.Module``s (no Lightning): the shared ViT encoder and the MAE."""

from pacx.models.mae import MAE_ARCHS, MaskedAutoencoderViT, create_mae
from pacx.models.vit import VIT_ARCHS, ViTConfig, ViTEncoder, create_vit

__all__ = ["MAE_ARCHS", "VIT_ARCHS", "MaskedAutoencoderViT", "ViTConfig", "ViTEncoder", "create_mae",
           "create_vit"]

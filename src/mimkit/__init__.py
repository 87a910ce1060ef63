"""mimkit: masked-image-modeling pretraining of vision backbones on timm, trained with Lightning Fabric."""

__version__ = "0.1.0"

"""mimkit: masked-image-modeling pretraining of vision backbones on timm, trained with Lightning Fabric."""

import time

__version__ = "0.1.0"
IMPORTED_AT = time.perf_counter()
"""When the package was first imported: the engine reports the start-up time of a run from it."""

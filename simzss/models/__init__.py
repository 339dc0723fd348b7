"""SimZSS model parts: the frozen vision tower, the trainable text tower and the full model."""

from simzss.models.simzss import SimZSS, SimZSSOutput
from simzss.models.text import TextTower
from simzss.models.vision import FrozenVisionTower, vision_embed_dim

__all__ = ["SimZSS", "SimZSSOutput", "TextTower", "FrozenVisionTower", "vision_embed_dim"]

"""SimZSS: open-vocabulary zero-shot segmentation by concept alignment (Stegmüller, Lebailly et al., ICLR 2025)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # `from simzss import SimZSS` without importing torch at package import time.
    if name == "SimZSS":
        from simzss.models.simzss import SimZSS

        return SimZSS
    raise AttributeError(name)

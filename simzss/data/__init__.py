"""Data stage: shards (safe tar IO), concept annotation (``prepare``), tokenisation, transforms, the training
stream, the frozen-feature cache and converters from raw datasets."""

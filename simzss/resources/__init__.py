"""Data files shipped with simzss: ``classnames/*.txt``, ``synonyms.txt``, ``templates.json``.

Read them through :func:`simzss.concepts.load_classnames` and :func:`simzss.concepts.load_templates`.
"""

"""Converters from raw dataset downloads to the layouts simzss reads (training shards, benchmark folders)."""
